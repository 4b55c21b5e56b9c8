#include "moe/dispatch_plan.hpp"

#include "util/check.hpp"

namespace eplab {

DispatchPlan make_dispatch_plan(const Routing& r, int E) {
  DispatchPlan p;
  p.tokens = r.tokens;
  p.k = r.k;
  p.num_experts = E;
  const int n = r.tokens * r.k;
  p.counts.assign(E, 0);
  // 1. histogram
  for (int a = 0; a < n; ++a) {
    const int e = r.ids[a];
    require(e >= 0 && e < E, "routing names expert ", e, " but the layer has ", E, " experts");
    ++p.counts[e];
  }
  // 2. exclusive scan
  p.offsets.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) p.offsets[e + 1] = p.offsets[e] + p.counts[e];
  // 3. stable scatter
  std::vector<int> cursor(p.offsets.begin(), p.offsets.end() - 1);
  p.row_of.resize(n);
  p.assignment.resize(n);
  for (int a = 0; a < n; ++a) {
    const int row = cursor[r.ids[a]]++;
    p.row_of[a] = row;
    p.assignment[row] = a;
  }
  return p;
}

}  // namespace eplab
