#include "ep_view.hpp"

#include <algorithm>
#include <optional>

#include "moe/dispatch_plan.hpp"
#include "moe/ep_plan.hpp"
#include "util/check.hpp"

namespace eplab::viz {

const char* map_choice_name(MapChoice m) {
  switch (m) {
    case MapChoice::Linear: return "linear";
    case MapChoice::RoundRobin: return "round-robin";
    case MapChoice::FromTrace: return "trace";
  }
  return "?";
}

namespace {
// The sub-routing of the tokens that start on one GPU.
Routing tokens_of(const Routing& r, const std::vector<int>& rank_of_token, int rank) {
  Routing out;
  out.k = r.k;
  for (int t = 0; t < r.tokens; ++t) {
    if (rank_of_token[t] != rank) continue;
    ++out.tokens;
    for (int j = 0; j < r.k; ++j) {
      out.ids.push_back(r.id(t, j));
      out.weights.push_back(r.weight(t, j));
    }
  }
  return out;
}
}  // namespace

EpView make_ep_view(const RoutingFrame& f, const EpSettings& s) {
  const int E = f.num_experts;
  EpView v;
  v.num_experts = E;
  std::optional<Placement> placement;
  if (s.map == MapChoice::FromTrace) {
    require(!f.rank_of_expert.empty(), "this step has no \"rank_of_expert\": pick linear or round-robin");
    v.ep_size = f.ep_size;
    v.owner = f.rank_of_expert;
    // A standard map is rebuilt as a Placement so the traffic comes from the same EP plan code.
    for (PlacementKind k : {PlacementKind::Linear, PlacementKind::RoundRobin}) {
      Placement p(k, E, v.ep_size);
      bool same = true;
      for (int e = 0; e < E && same; ++e) same = p.owner(e) == v.owner[e];
      if (same) {
        placement.emplace(p);
        break;
      }
    }
    v.map_label = placement ? std::string("trace's map (") + placement_name(placement->kind()) + ")"
                            : std::string("trace's own map");
  } else {
    require(s.ep_size >= 1 && s.ep_size <= E, "--ep-size ", s.ep_size, ": must be 1..", E,
            " (the layer has ", E, " experts)");
    v.ep_size = s.ep_size;
    placement.emplace(s.map == MapChoice::Linear ? PlacementKind::Linear : PlacementKind::RoundRobin, E, s.ep_size);
    v.map_label = placement_name(placement->kind());
    for (int e = 0; e < E; ++e) v.owner.push_back(placement->owner(e));
  }
  const int N = v.ep_size;
  const int T = f.T();

  std::vector<int> rank_of_token = f.rank_of_token;
  if (rank_of_token.empty() || f.ep_size != N) {
    rank_of_token.assign(T, 0);
    const int base = T / N, extra = T % N;
    for (int r = 0, t = 0; r < N; ++r)
      for (int i = 0; i < base + (r < extra ? 1 : 0); ++i) rank_of_token[t++] = r;
  }
  v.tokens_on_gpu.assign(N, 0);
  for (int r : rank_of_token) ++v.tokens_on_gpu[r];

  v.expert_rows = make_dispatch_plan(f.routing, E).counts;
  v.experts_on_gpu.assign(N, 0);
  for (int e = 0; e < E; ++e) ++v.experts_on_gpu[v.owner[e]];

  if (placement) {
    // Every GPU builds its send plan from its own tokens; the allgather of slot counts gives the matrix.
    std::vector<int> all_counts;
    for (int r = 0; r < N; ++r) {
      EpPlan p = make_ep_send_plan(tokens_of(f.routing, rank_of_token, r), *placement, r);
      all_counts.insert(all_counts.end(), p.slot_counts.begin(), p.slot_counts.end());
    }
    EpPlan p0 = make_ep_send_plan(tokens_of(f.routing, rank_of_token, 0), *placement, 0);
    finish_ep_plan(p0, *placement, all_counts);
    v.traffic = p0.traffic;
  } else {
    // A map that is neither linear nor round-robin (e.g. EPLB's): Placement cannot express it, so count
    // the rows per (source, owner) pair directly.
    v.traffic.assign(std::size_t(N) * N, 0);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < f.routing.k; ++j) ++v.traffic[std::size_t(rank_of_token[t]) * N + v.owner[f.routing.id(t, j)]];
  }

  v.rows_on_gpu.assign(N, 0);
  for (int s2 = 0; s2 < N; ++s2)
    for (int d = 0; d < N; ++d) v.rows_on_gpu[d] += v.traffic[std::size_t(s2) * N + d];
  v.bytes_per_row = 2.0 * f.hidden;
  for (int s2 = 0; s2 < N; ++s2)
    for (int d = 0; d < N; ++d) {
      const double b = v.traffic[std::size_t(s2) * N + d] * v.bytes_per_row;
      if (s2 == d) v.local_bytes += b;
      else if (v.node_of(s2, s.gpus_per_node) == v.node_of(d, s.gpus_per_node)) v.intra_bytes += b;
      else v.inter_bytes += b;
    }
  v.load_max = *std::max_element(v.rows_on_gpu.begin(), v.rows_on_gpu.end());
  double sum = 0;
  for (int x : v.rows_on_gpu) sum += x;
  v.load_mean = sum / N;
  return v;
}

}  // namespace eplab::viz
