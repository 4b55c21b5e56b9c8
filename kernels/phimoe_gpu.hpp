// The whole PhiMoE model (PhimoeForCausalLM) on ONE GPU, for ONE sequence with a KV cache: the GPU twin of
// PhimoeCpuModel (common/model/phimoe_cpu.hpp), built from the topic kernels.
//
//   x = embedding(ids)                                                     embedding.cuh
//   per layer l:  h = LN_in(x)            (l > 0: x += y_{l-1} fused in)   layernorm.cuh (add_layer_norm)
//                 q, k, v = linear(h)      bias folded into the GEMM       linear.cuh (cuBLAS)
//                 RoPE(q, k); append k, v to the cache; a = attention      rope.cuh, attention.cuh
//                 x += linear_o(a);  h = LN_post(x)                         add_layer_norm
//                 y = MoE_l(h)             router + sparsemixer + experts   GpuMoeLayer (moe_gpu.hpp), grouped path
//   logits = lm_head(LN_final(x + y_{L-1})) for the LAST row only, fp32     linear_f32
//
// Precision: bf16 weights and activations (the residual stream too), fp32 accumulation, fp32 logits; the
// argmax is taken on the host over those logits, ties to the lowest id (as PhimoeCpuModel and torch.argmax).
// Versus the fp32 CPU reference the logits differ by rel-L2 ~1e-2 (tests/gpu/test_phimoe_gpu.cu says why).
//
// One sequence: forward() appends tokens at positions length() .. length() + T - 1 (prefill = the whole
// prompt at once, decode = one token per call). Several prompts run one after the other with reset() in
// between. Every device buffer is allocated at load for max_len rows, so forward() allocates nothing (the
// MoE layers grow their own scratch on first use) and the MoE's decode steps are replayed as CUDA graphs.
//
// Host-only header (no CUDA types), so a .cpp chapter can use it.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"

namespace eplab {

class GpuPhimoeModel {
 public:
  // Uploads every replicated tensor (embedding, norms, attention, lm_head) as bf16 and one GpuMoeLayer per
  // layer (router + all experts, from load_moe_layer) to the current GPU, and allocates the KV cache and the
  // activations for max_len positions. Throws eplab::Error with one line when the config breaks a kernel
  // precondition (hidden % 8, head_dim even and <= 256, heads % kv_heads, hidden <= 8192), when max_len is
  // not in [1, max_position_embeddings], or when a tensor is missing or has the wrong shape.
  static GpuPhimoeModel load(const Checkpoint& ckpt, int max_len);

  GpuPhimoeModel(GpuPhimoeModel&&) noexcept;
  GpuPhimoeModel& operator=(GpuPhimoeModel&&) noexcept;
  ~GpuPhimoeModel();

  const ModelConfig& config() const;
  int max_len() const;
  int length() const;  // tokens in the KV cache (= position of the next token)

  // Empties the KV cache (length() = 0). The cache rows are filled with NaN, so a kernel that reads a row
  // it should not makes the next logits NaN, which forward() reports.
  void reset();

  // Appends new_tokens (at least one; ids in [0, vocab)) and returns the fp32 logits of the last new row
  // [vocab]. Synchronises the GPU before returning (the logits are on the host), so wall time around a
  // call is GPU time. Throws when length() + T > max_len, on a bad id, or when a logit is not finite.
  std::vector<float> forward(const std::vector<int>& new_tokens);

  // reset(), prefill of prompt_ids, then greedy decoding: up to max_new_tokens tokens, stopping right after
  // a token in stop_ids (that token included, as PhimoeCpuModel::generate with eos). Returns the new tokens.
  std::vector<int> generate(const std::vector<int>& prompt_ids, int max_new_tokens,
                            const std::vector<int>& stop_ids = {});

  // Bytes of weights on the GPU (replicated tensors + every layer's gate and experts).
  std::size_t weight_bytes() const;

 private:
  GpuPhimoeModel();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Bytes in use on the current GPU (total - free from cudaMemGetInfo): what chapter 05 prints per rank.
std::size_t gpu_memory_used_bytes();

}  // namespace eplab
