// Parameter counts and memory per GPU of a PhiMoE model, from its config alone: weights exactly, and
// estimates of the KV cache, activations and all-to-all buffers of a workload (further down).
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

// Bytes per parameter of the config's torch_dtype as stored on disk: 2 for bfloat16 and float16, 4 for
// float32. Throws eplab::Error for any other dtype.
int bytes_per_param(const ModelConfig& c);

// Weights' memory per GPU for EP size `ep_size` (>= 1); bytes_per_param 2 for bf16.
EpMemory ep_memory(const ModelConfig& c, int ep_size, double bytes_per_param = 2.0);

// --- Memory beyond the weights: estimates for one prefill step of an EP deployment -----------------------
// Under EP, attention is data-parallel (as in chapter 04, every rank holds its own tokens), so each of the
// N GPUs serves ceil(batch / N) of the sequences in flight, and the busiest GPU holds that many. These are
// planning estimates (no allocator slack, no cuBLAS workspace, balanced routing), used by the visualizer's
// memory panel; bytes_per_elem 2 for bf16.

// ceil(batch / ep_size): sequences on the busiest GPU. batch >= 0, ep_size >= 1.
int sequences_per_gpu(int batch, int ep_size);

// KV cache of `seqs` sequences of `seq_len` tokens, all layers:
//   seqs * seq_len * L * 2 (K and V) * num_key_value_heads * head_dim * bytes_per_elem.
double kv_cache_bytes(const ModelConfig& c, std::int64_t seqs, std::int64_t seq_len, double bytes_per_elem = 2.0);

// Activations live during one layer's step for `tokens` tokens:
//   tokens * (4 H + 2 k I) * bytes_per_elem
// 4 H: residual stream, normed input, attention output, MoE output; 2 k I: the SwiGLU w1 and w3 outputs
// for each of the k experts a token visits (k = num_experts_per_tok).
double activation_bytes(const ModelConfig& c, std::int64_t tokens, double bytes_per_elem = 2.0);

// All-to-all dispatch buffers for `tokens` tokens: each sends k rows of H (one per chosen expert) and,
// with balanced routing, receives as many; a send and a receive buffer (the combine reuses them):
//   2 * tokens * k * H * bytes_per_elem.
double all_to_all_buffer_bytes(const ModelConfig& c, std::int64_t tokens, double bytes_per_elem = 2.0);

// The three estimates above for the busiest GPU of an EP deployment: seqs = sequences_per_gpu(batch,
// ep_size), tokens = seqs * seq_len (one prefill step of every sequence it serves).
struct EpWorkloadMemory {
  int ep_size = 1;
  int sequences_per_gpu = 0;
  std::int64_t tokens_per_gpu = 0;
  double kv_cache_bytes = 0;
  double activation_bytes = 0;
  double all_to_all_bytes = 0;
  double buffers_bytes() const { return activation_bytes + all_to_all_bytes; }
  double total_bytes() const { return kv_cache_bytes + activation_bytes + all_to_all_bytes; }
};
EpWorkloadMemory ep_workload_memory(const ModelConfig& c, int ep_size, int batch, int seq_len,
                                    double bytes_per_elem = 2.0);

// The real microsoft/Phi-tiny-MoE-instruct shape (its config.json), built in so chapter 00 and the
// generator's `phi-tiny` preset need no download.
ModelConfig phi_tiny_moe_config();

}  // namespace eplab
