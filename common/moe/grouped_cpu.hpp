// The grouped MoE layer on the CPU: the same three steps as the GPU path of chapter 02, so a laptop
// without a GPU runs the lesson and the step structure can be read in plain C++.
//
//   plan    = make_dispatch_plan(routing)          counts, offsets, stable permutation
//   xp      = x[assignment[row] / k]               permute: rows grouped by expert
//   yp[r]   = expert_e(xp[r]) for r in expert e    one batched matmul per expert (w1|w3, SwiGLU, w2)
//   y[t]    = sum_j w[t,j] * yp[row_of[t*k+j]]     weighted unpermute
#pragma once
#include <span>
#include <vector>

#include "moe/dispatch_plan.hpp"
#include "model/checkpoint.hpp"

namespace eplab {

// Runs the experts of `w` (local expert i holds rows [offsets[i], offsets[i+1]) of xp) on a batch of rows.
// h is rounded to bf16 when round_h is set, as the GPU stores it. Threads split the work by expert.
void grouped_experts_cpu(const MoeLayerWeights& w, std::span<const float> xp, std::span<const int> offsets,
                         std::span<float> yp, bool round_h, int threads = 0);

// Whole expert part of a layer on the CPU with a given routing: plan, permute, grouped experts, combine.
std::vector<float> moe_grouped_cpu(const MoeLayerWeights& w, std::span<const float> x, const Routing& routing,
                                   bool round_h, DispatchPlan* plan_out = nullptr);

}  // namespace eplab
