// Parameter counts and memory per GPU of a PhiMoE model, from its config alone.
//
// Counts follow the tensors PhiMoE stores (model/checkpoint.hpp, phimoe_tensor_specs):
//   expert         w1 [I,H] + w3 [I,H] + w2 [H,I]            = 3 H I
//   router         gate [E,H]                                = E H
//   attention      q [nh*hd, H], k,v [nkv*hd, H], o [H, nh*hd], each with a bias when attention_bias
//   norms          2 LayerNorms per layer + the final one, weight and bias each = 2 H per norm
//   embeddings     [V, H];  lm_head [V, H] (absent when tied) + bias [V] when lm_head_bias
// Active per token = everything but the experts, plus top_k experts in every layer.
//
// Expert parallelism over N GPUs splits each layer's E experts; everything else is replicated on every
// GPU. When N does not divide E the busiest GPU holds ceil(E/N) experts per layer, and that GPU sets the
// memory a deployment needs.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.hpp"

namespace eplab {

struct ParamCounts {
  std::int64_t per_expert = 0;          // 3 H I
  std::int64_t experts_per_layer = 0;   // E * per_expert
  std::int64_t experts_total = 0;       // L * experts_per_layer
  std::int64_t router_per_layer = 0;    // E H
  std::int64_t router_total = 0;
  std::int64_t attention_per_layer = 0; // q, k, v, o weights and biases
  std::int64_t attention_total = 0;
  std::int64_t norms_per_layer = 0;     // input + post-attention LayerNorm, weight + bias
  std::int64_t norms_total = 0;         // all layers + the final norm
  std::int64_t embeddings = 0;          // V H
  std::int64_t lm_head = 0;             // V H (+ V bias)
  std::int64_t non_expert = 0;          // total - experts_total: replicated on every GPU under EP
  std::int64_t total = 0;
  std::int64_t active_per_token = 0;    // non_expert + L * top_k * per_expert
  std::int64_t active_per_token_no_embed = 0;  // the same without the embedding table (a lookup, not a GEMM)
};

ParamCounts count_params(const ModelConfig& c);

struct EpMemory {
  int ep_size = 1;
  int experts_per_gpu_max = 0;       // ceil(E / N): experts per layer on the busiest GPU
  int experts_per_gpu_min = 0;       // floor(E / N)
  bool even = true;                  // N divides E
  std::int64_t expert_params_per_gpu = 0;  // busiest GPU, all layers
  double expert_bytes_per_gpu = 0;
  double replicated_bytes = 0;       // non-expert parameters, on every GPU
  double total_bytes_per_gpu = 0;    // weights only (no activations, KV cache or workspace)
};

// Weights' memory per GPU for EP size `ep_size` (>= 1); bytes_per_param 2 for bf16.
EpMemory ep_memory(const ModelConfig& c, int ep_size, double bytes_per_param = 2.0);

// The real microsoft/Phi-tiny-MoE-instruct shape (its config.json), built in so chapter 00 and the
// generator's `phi-tiny` preset need no download.
ModelConfig phi_tiny_moe_config();

}  // namespace eplab
