// The CPU reference of one MoE layer, in fp32. Every GPU kernel, every chapter and every EP backend is
// checked against this; this in turn is checked against HF transformers' PhimoeSparseMoeBlock.
//
//   logits = x gate^T                     [T, E]
//   (ids, w) = route(logits)              [T, k]
//   for each (t, j):  e = ids[t, j]
//     h = silu(w1_e x_t) * (w3_e x_t)     [I]     SiLU on the w1 branch only
//     y_t += w[t, j] * (w2_e h)           [H]
#pragma once
#include <span>
#include <vector>

#include "model/checkpoint.hpp"
#include "moe/routing.hpp"

namespace eplab {

struct MoeRefOptions {
  RouterCfg router;
  // Round the SwiGLU output h to bf16 before w2, as the GPU path stores it. Off: pure fp32.
  bool round_h_to_bf16 = false;
};

struct MoeRefResult {
  std::vector<float> logits;  // [T, E]
  Routing routing;
  std::vector<float> y;       // [T, H]
};

// x: [T, H] fp32. Uses every expert in w (w must hold all experts of the layer).
MoeRefResult moe_layer_reference(const MoeLayerWeights& w, std::span<const float> x, int T,
                                 const MoeRefOptions& opt);

// Only the expert part for given routing: y[t] = sum_j w_tj * expert_{id_tj}(x_t). Experts not held
// by w are an error. Used when the routing comes from elsewhere (a GPU kernel, a fixture).
std::vector<float> moe_experts_reference(const MoeLayerWeights& w, std::span<const float> x,
                                         const Routing& routing, bool round_h_to_bf16 = false);

// One expert on one token row: out[H] = w2 (silu(w1 x) * w3 x).
void expert_forward_cpu(const MoeLayerWeights& w, int local_expert, const float* x, float* out,
                        bool round_h_to_bf16);

// Relative L2 error ||a - b|| / ||b|| (0 when both are empty; infinity if any NaN).
double rel_l2(std::span<const float> a, std::span<const float> b);
double max_abs_diff(std::span<const float> a, std::span<const float> b);

}  // namespace eplab
