#include "report.hpp"

#include <algorithm>
#include <numeric>

#include "util/report.hpp"

namespace eplab {

std::string join_ints(const std::vector<int>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s.empty() ? "none" : s;
}

std::string expert_load_table(const std::vector<double>& tokens, const std::vector<int>& replicas) {
  const int E = int(tokens.size());
  const double total = std::accumulate(tokens.begin(), tokens.end(), 0.0);
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return tokens[x] > tokens[y]; });
  Table t({"expert", "tokens", "share", "vs mean", "replicas"});
  for (int e : order)
    t.add_row({std::to_string(e), strf("%.0f", tokens[e]), strf("%.1f%%", total > 0 ? 100.0 * tokens[e] / total : 0.0),
               strf("%.2fx", total > 0 ? tokens[e] * E / total : 0.0), std::to_string(replicas[e])});
  return "\nmeasured load of the window (rows routed to each expert, all ranks) and EPLB's replicas:\n" + t.str();
}

BalanceReport balance_report(const PhaseResult& a, const PhaseResult& b, const Placement& before,
                             const Placement& after, bool gpu, double expert_bytes) {
  BalanceReport r;
  const int N = int(a.rank_rows.size());
  r.balancedness_before = balancedness(a.rank_rows);
  r.balancedness_after = balancedness(b.rank_rows);
  r.imbalance_before = imbalance(a.rank_rows);
  r.imbalance_after = imbalance(b.rank_rows);
  Table t({"rank", "rows before", "rows after", "slots before", "slots after", "expert memory after"});
  for (int q = 0; q < N; ++q)
    t.add_row({std::to_string(q), strf("%.0f", a.rank_rows[q]), strf("%.0f", b.rank_rows[q]),
               std::to_string(before.num_local(q)), std::to_string(after.num_local(q)),
               human_bytes(expert_bytes * after.num_local(q))});
  r.text = "\nrows each rank's experts computed over the window (the busiest rank sets the pace):\n" + t.str();
  r.text += strf("balancedness (mean/max, vLLM's): %.3f -> %.3f    max/mean: %.2f -> %.2f\n", r.balancedness_before,
                 r.balancedness_after, r.imbalance_before, r.imbalance_after);
  r.text += strf("memory: %d redundant slots, +%s of expert weights per rank (%d slots of %s instead of %d)\n",
                 after.num_slots() - after.num_experts(),
                 human_bytes(expert_bytes * (after.max_local() - before.max_local())).c_str(), after.max_local(),
                 human_bytes(expert_bytes).c_str(), before.max_local());
  r.text += strf("time over the window (slowest rank, median per step, summed; %s): experts %.3f -> %.3f ms, "
                 "whole layer %.3f -> %.3f ms\n",
                 gpu ? "GPU" : "CPU ranks: the counts are the lesson, these times are not a GPU's", a.experts_ms,
                 b.experts_ms, a.total_ms, b.total_ms);
  r.summary = strf("max/mean %.2f -> %.2f", r.imbalance_before, r.imbalance_after);
  return r;
}

nlohmann::json balance_json(const BalanceReport& r, const PhaseResult& a, const PhaseResult& b, const EplbPlan& plan,
                            const Skew& skew, int ranks, int tokens, int steps, bool gpu, bool pass) {
  return {{"chapter", "06_load_balancing"},
          {"ranks", ranks},
          {"device", gpu ? "gpu" : "cpu"},
          {"tokens_per_rank", tokens},
          {"steps", steps},
          {"hot_experts", skew.hot},
          {"skew", skew.strength},
          {"expert_tokens", a.expert_tokens},
          {"phy2log", plan.phy2log[0]},
          {"logcnt", plan.logcnt[0]},
          {"rank_rows_before", a.rank_rows},
          {"rank_rows_after", b.rank_rows},
          {"balancedness_before", r.balancedness_before},
          {"balancedness_after", r.balancedness_after},
          {"imbalance_before", r.imbalance_before},
          {"imbalance_after", r.imbalance_after},
          {"experts_ms_before", a.experts_ms},
          {"experts_ms_after", b.experts_ms},
          {"total_ms_before", a.total_ms},
          {"total_ms_after", b.total_ms},
          {"pass", pass}};
}

}  // namespace eplab
