// The dispatch plan: where every (token, choice) pair goes. Computed once from the routing and handed
// to dispatch and combine (the DeepEP "layout" step). Every path uses this same code: the CPU reference,
// the GPU grouped path's host-side checks, expert parallelism's send/recv counts, the visualizer.
//
// Rows of the permuted buffer are grouped by expert: expert e owns rows [offsets[e], offsets[e+1]).
// Inside an expert, rows keep token order (stable), so the plan is deterministic.
#pragma once
#include <vector>

#include "moe/routing.hpp"

namespace eplab {

struct DispatchPlan {
  int tokens = 0, k = 0, num_experts = 0;
  std::vector<int> counts;      // [E] rows per expert
  std::vector<int> offsets;     // [E+1] exclusive prefix sum of counts
  std::vector<int> row_of;      // [T*k] assignment (t*k + j) -> row in the permuted buffer
  std::vector<int> assignment;  // [T*k] row -> assignment (t*k + j); token = assignment / k
  int rows() const { return tokens * k; }
};

DispatchPlan make_dispatch_plan(const Routing& routing, int num_experts);

}  // namespace eplab
