// The CPU reference of the whole PhiMoE model (PhimoeForCausalLM), fp32, checked against HF transformers.
//
//   x = embed_tokens[ids]                                                  [T, H]
//   per layer l:
//     h  = LayerNorm_in(x)               (weight + bias, eps = rms_norm_eps: PhiMoE's norms are LayerNorms)
//     q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv      q: heads x head_dim, k/v: kv_heads x head_dim (GQA)
//     q, k  = RoPE(q, k, position)       HF's rotate_half: dims [0, D/2) pair with [D/2, D), theta = rope_theta
//     a  = softmax(q k^T / sqrt(D) + mask) v   query head h reads KV head h / (heads / kv_heads)
//          mask: key j is visible to the query at position i iff j <= i and (no window or j > i - window):
//          transformers' sliding_window_causal_mask (masking_utils.sliding_window_overlay), so a query sees
//          at most `sliding_window` keys, itself included
//     x += a Wo^T + bo
//     x += MoE(LayerNorm_post(x))        router + sparsemixer + SwiGLU experts, behind MoeBlock (below)
//   logits = LayerNorm_final(x) lm_head^T + lm_head_bias                   [T, V]
//
// Every weight is widened from the checkpoint's bf16 to fp32 once, at load (the experts stay bf16 in
// MoeLayerWeights and are widened inside the expert loop, as moe_layer_reference does); all arithmetic is
// fp32 (LayerNorm statistics and softmax sums in double). So against HF's fp32 run on the same checkpoint
// only the summation order differs.
//
// Sequences, KV cache, batches. A PhimoeSequence holds one sequence's KV cache (post-RoPE keys and values,
// every layer, every position so far). forward() appends new tokens to any number of sequences at once:
// their rows are stacked into one [sum n_b, H] matrix for the norms, projections and the MoE (the MoE sees
// the whole batch, as an EP dispatcher will), and attention runs per sequence over its own cache. A prompt is
// a forward with all its tokens (prefill), decoding a forward with one token per sequence; the result is the
// same as one forward over the whole sequence up to summation order.
#pragma once
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "moe/reference.hpp"
#include "moe/routing.hpp"

namespace eplab {

// ---------------------------------------------------------------- the MoE part of a decoder layer
// What a decoder layer asks of its MoE: y = MoE_l(x) for the rows of this process. Chapter 05 replaces the
// local block with an expert-parallel one (replicated router, all-to-all dispatch, local experts, combine);
// the rest of the model does not change.
struct MoeBlockOutput {
  std::vector<float> y;  // [T, H] block output, before the residual add
  Routing routing;       // [T, k] the experts and multipliers of each row (for stats and traces)
  std::vector<float> router_logits;  // [T, E] the router's logits, when the block computed them here (else empty)
};

class MoeBlock {
 public:
  virtual ~MoeBlock() = default;
  // x: [T, H], the post-attention LayerNorm output of layer `layer`. Called once per layer per forward,
  // layers in order 0..L-1, with every row of the forward (all sequences of the batch). T may be 0.
  virtual MoeBlockOutput forward(int layer, std::span<const float> x, int T) = 0;
};

// Every expert in this process: router GEMM, route() (sparsemixer for PhiMoE), SwiGLU experts, as
// moe_layer_reference computes them. With only some experts loaded it still runs, and fails naming the
// expert if a row is routed to one it does not hold (an EP backend must be plugged in instead).
class LocalMoeBlock : public MoeBlock {
 public:
  LocalMoeBlock(std::shared_ptr<const std::vector<MoeLayerWeights>> layers, const MoeRefOptions& opt);
  MoeBlockOutput forward(int layer, std::span<const float> x, int T) override;

 private:
  std::shared_ptr<const std::vector<MoeLayerWeights>> layers_;
  MoeRefOptions opt_;
};

// ---------------------------------------------------------------- the model
struct PhimoeLoadOptions {
  // Experts to load for layer l (global ids, any order); null = all experts of every layer. An EP rank
  // passes its placement's experts here.
  std::function<std::vector<int>(int layer)> experts = nullptr;
};

// One sequence's state: its length so far and its KV cache. Made by PhimoeCpuModel::new_sequence().
struct PhimoeSequence {
  int length = 0;                       // tokens already in the cache (= position of the next token)
  std::vector<std::vector<float>> k, v;  // [L] each [length, kv_heads, head_dim]; k after RoPE
};

// What one forward can record besides the logits (for the fixture tests and chapter 05's statistics).
struct PhimoeTrace {
  bool hidden = false;                  // record embed, layer_out and norm_out (rows of the forward, stacked)
  std::vector<float> embed;             // [R, H] embedding output
  std::vector<std::vector<float>> layer_out;  // [L][R, H] each decoder layer's output (residual stream)
  std::vector<float> norm_out;          // [R, H] final LayerNorm output
  std::vector<Routing> routing;         // [L] always filled: the MoE block's routing of the R rows
  std::vector<std::vector<float>> router_logits;  // [L][R, E] where the MoE block gives them (LocalMoeBlock)
};

enum class LogitRows { All, Last };  // logits for every new row, or only for each sequence's last new row

class PhimoeCpuModel {
 public:
  // Reads every replicated tensor (embedding, norms, attention, routers, lm_head) and the experts chosen by
  // opt, widening to fp32, and installs a LocalMoeBlock over the loaded experts. Throws eplab::Error on a
  // model_type other than phimoe or a tensor whose shape disagrees with the config.
  static PhimoeCpuModel load(const Checkpoint& ckpt, const PhimoeLoadOptions& opt = {});

  PhimoeCpuModel(PhimoeCpuModel&&) noexcept;
  PhimoeCpuModel& operator=(PhimoeCpuModel&&) noexcept;
  ~PhimoeCpuModel();

  const ModelConfig& config() const;
  // The experts loaded for layer l (router weight + the chosen experts), shared with the LocalMoeBlock, for an
  // EP backend to build on.
  std::shared_ptr<const std::vector<MoeLayerWeights>> moe_weights() const;
  // Replaces the MoE of every layer (e.g. by chapter 05's expert-parallel block). Not null.
  void set_moe_block(std::unique_ptr<MoeBlock> block);
  MoeBlock& moe_block();

  PhimoeSequence new_sequence() const;

  // Appends tokens[b] to seqs[b] for every b (at least one token each; sequences distinct) and runs them
  // together. Returns logits, rows in batch order: LogitRows::All gives sum_b n_b rows (sequence 0's new
  // tokens, then sequence 1's, ...), Last gives one row per sequence. [rows, V]. Throws on a token id out of
  // range or a sequence that would pass max_position_embeddings; the caches are updated only on success.
  std::vector<float> forward(std::span<PhimoeSequence* const> seqs, std::span<const std::vector<int>> tokens,
                             LogitRows rows = LogitRows::All, PhimoeTrace* trace = nullptr);

  // One sequence from scratch, no cache kept: logits [T, V].
  std::vector<float> forward_full(std::span<const int> ids, PhimoeTrace* trace = nullptr);

  // Greedy decoding of a batch: prefill of every prompt together, then one token per unfinished sequence per
  // step, all sequences in one forward. A sequence stops after max_new_tokens or right after emitting
  // eos_token_id (-1: never). Ties in the argmax pick the lowest id (as torch.argmax). Returns the new tokens.
  std::vector<std::vector<int>> generate(const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                         int eos_token_id = -1);

 private:
  PhimoeCpuModel();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------- pieces, exposed for tests and kernels
// y[r] = LayerNorm(x[r]) * w + b over rows of length n; mean and variance (biased) in double.
void layer_norm_cpu(std::span<const float> x, std::span<const float> w, std::span<const float> b, int rows, int n,
                    float eps, std::span<float> y);

// HF's default RoPE tables for one position: cos/sin [head_dim], entry i and i + D/2 share frequency
// inv_freq[i] = 1 / theta^(2i / D); the angle pos * inv_freq is formed in fp32 as HF does.
void rope_cos_sin(int pos, int head_dim, float theta, float* cos_out, float* sin_out);
// In place on one head vector of length D: v = v * cos + rotate_half(v) * sin, rotate_half(v) = [-v2, v1].
void rope_apply(float* v, int head_dim, const float* cos, const float* sin);

// Index of the largest value; ties pick the lowest index.
int argmax(std::span<const float> v);

}  // namespace eplab
