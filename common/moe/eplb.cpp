// EPLB (eplb.hpp): DeepSeek's rebalance_experts, written for one layer at a time.
#include "moe/eplb.hpp"

#include <algorithm>
#include <numeric>

#include "util/check.hpp"

namespace eplab {

Packing balanced_packing(const std::vector<double>& weight, int num_packs) {
  const int n = int(weight.size());
  require(num_packs >= 1 && n % num_packs == 0, "balanced packing: ", n, " items do not split evenly into ",
          num_packs, " packs");
  const int per = n / num_packs;
  Packing out{std::vector<int>(n, -1), std::vector<int>(n, -1)};
  if (per == 1) {  // one item per pack: item i is pack i (DeepSeek's shortcut; the order then stays put)
    std::iota(out.pack.begin(), out.pack.end(), 0);
    std::fill(out.rank_in_pack.begin(), out.rank_in_pack.end(), 0);
    return out;
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return weight[a] > weight[b]; });
  std::vector<double> load(num_packs, 0.0);
  std::vector<int> items(num_packs, 0);
  for (int i : order) {
    int best = -1;
    for (int p = 0; p < num_packs; ++p)
      if (items[p] < per && (best < 0 || load[p] < load[best])) best = p;
    out.pack[i] = best;
    out.rank_in_pack[i] = items[best]++;
    load[best] += weight[i];
  }
  return out;
}

Replication replicate_experts(const std::vector<double>& weight, int num_slots) {
  const int E = int(weight.size());
  require(num_slots >= E, "replicate experts: ", num_slots, " slots cannot hold ", E, " experts");
  Replication r;
  r.phy2log.resize(num_slots);
  r.rank.assign(num_slots, 0);
  r.logcnt.assign(E, 1);
  std::iota(r.phy2log.begin(), r.phy2log.begin() + E, 0);
  for (int s = E; s < num_slots; ++s) {
    int hot = 0;  // the most tokens per replica so far
    for (int e = 1; e < E; ++e)
      if (weight[e] / r.logcnt[e] > weight[hot] / r.logcnt[hot]) hot = e;
    r.phy2log[s] = hot;
    r.rank[s] = r.logcnt[hot]++;
  }
  return r;
}

namespace {

std::vector<int> inverse(const std::vector<int>& perm) {
  std::vector<int> inv(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) inv[std::size_t(perm[i])] = int(i);
  return inv;
}

// One layer of the hierarchical policy: phy2log and the replica index of every slot.
void hierarchical(const std::vector<double>& w, int R, int groups, int nodes, int gpus, std::vector<int>& phy2log,
                  std::vector<int>& phy_rank) {
  const int E = int(w.size()), group_size = E / groups, groups_per_node = groups / nodes;
  const int experts_per_node = E / nodes, slots_per_node = R / nodes, slots_per_gpu = R / gpus;

  // 1. groups -> nodes. "mlog" numbers the experts node after node (meta-logical order).
  std::vector<double> group_tokens(groups, 0.0);
  for (int e = 0; e < E; ++e) group_tokens[e / group_size] += w[e];
  const Packing gp = balanced_packing(group_tokens, nodes);
  std::vector<int> log2mlog(E);
  for (int e = 0; e < E; ++e) {
    const int g = e / group_size;
    log2mlog[e] = (gp.pack[g] * groups_per_node + gp.rank_in_pack[g]) * group_size + e % group_size;
  }
  const std::vector<int> mlog2log = inverse(log2mlog);

  phy2log.assign(R, -1);
  phy_rank.assign(R, 0);
  for (int node = 0; node < nodes; ++node) {
    // 2. replicas inside the node
    std::vector<double> tokens(experts_per_node);
    for (int m = 0; m < experts_per_node; ++m) tokens[m] = w[mlog2log[node * experts_per_node + m]];
    const Replication rep = replicate_experts(tokens, slots_per_node);
    // 3. the node's slots -> its GPUs, by tokens per replica
    std::vector<double> per_slot(slots_per_node);
    for (int p = 0; p < slots_per_node; ++p) per_slot[p] = tokens[rep.phy2log[p]] / rep.logcnt[rep.phy2log[p]];
    const Packing sp = balanced_packing(per_slot, gpus / nodes);
    std::vector<int> phy2pphy(slots_per_node);
    for (int p = 0; p < slots_per_node; ++p) phy2pphy[p] = sp.pack[p] * slots_per_gpu + sp.rank_in_pack[p];
    const std::vector<int> pphy2phy = inverse(phy2pphy);
    for (int q = 0; q < slots_per_node; ++q) {
      const int p = pphy2phy[q];
      phy2log[node * slots_per_node + q] = mlog2log[node * experts_per_node + rep.phy2log[p]];
      phy_rank[node * slots_per_node + q] = rep.rank[p];
    }
  }
}

}  // namespace

EplbPlan rebalance_experts(const std::vector<std::vector<double>>& weight, int R, int groups, int nodes, int gpus) {
  require(!weight.empty() && !weight[0].empty(), "EPLB: the load has no layers or no experts");
  const int L = int(weight.size()), E = int(weight[0].size());
  for (const auto& row : weight) {
    require(int(row.size()) == E, "EPLB: every layer must have ", E, " experts, one has ", row.size());
    for (double v : row) require(v >= 0, "EPLB: loads must be >= 0, got ", v);
  }
  require(gpus >= 1 && nodes >= 1 && groups >= 1, "EPLB: GPUs, nodes and groups must be >= 1");
  require(R >= E, "EPLB: ", R, " physical slots cannot hold ", E, " experts");
  require(R % gpus == 0, "EPLB: ", R, " slots do not split evenly over ", gpus, " GPUs");
  require(E % groups == 0, "EPLB: ", E, " experts do not split into ", groups, " groups");
  const bool hier = groups % nodes == 0;
  if (hier) {
    require(gpus % nodes == 0, "EPLB: ", gpus, " GPUs do not split evenly over ", nodes, " nodes");
    require(R % nodes == 0, "EPLB: ", R, " slots do not split evenly over ", nodes, " nodes");
  }
  const int g = hier ? groups : 1, n = hier ? nodes : 1;  // the global policy: one group, one node

  EplbPlan plan;
  plan.layers = L;
  plan.experts = E;
  plan.slots = R;
  plan.gpus = gpus;
  std::vector<std::vector<int>> ranks(L);
  plan.phy2log.resize(L);
  plan.logcnt.assign(L, std::vector<int>(E, 0));
  for (int l = 0; l < L; ++l) {
    hierarchical(weight[l], R, g, n, gpus, plan.phy2log[l], ranks[l]);
    for (int e : plan.phy2log[l]) ++plan.logcnt[l][e];
    plan.max_replicas = std::max(plan.max_replicas, *std::max_element(plan.logcnt[l].begin(), plan.logcnt[l].end()));
  }
  plan.log2phy.assign(L, std::vector<std::vector<int>>(E, std::vector<int>(plan.max_replicas, -1)));
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < R; ++s) plan.log2phy[l][plan.phy2log[l][s]][ranks[l][s]] = s;
  return plan;
}

std::vector<double> gpu_load(const std::vector<double>& tokens, const std::vector<int>& phy2log, int gpus) {
  const int R = int(phy2log.size()), E = int(tokens.size());
  require(gpus >= 1 && R % gpus == 0, "gpu_load: ", R, " slots do not split evenly over ", gpus, " GPUs");
  std::vector<int> cnt(E, 0);
  for (int e : phy2log) {
    require(e >= 0 && e < E, "gpu_load: slot names expert ", e, ", outside [0, ", E, ")");
    ++cnt[e];
  }
  std::vector<double> load(gpus, 0.0);
  for (int s = 0; s < R; ++s) load[s / (R / gpus)] += tokens[phy2log[s]] / cnt[phy2log[s]];
  return load;
}

double balancedness(const std::vector<double>& g) {
  const double mx = g.empty() ? 0 : *std::max_element(g.begin(), g.end());
  if (mx <= 0) return 1.0;
  return std::accumulate(g.begin(), g.end(), 0.0) / double(g.size()) / mx;
}

double imbalance(const std::vector<double>& g) { return 1.0 / balancedness(g); }

}  // namespace eplab
