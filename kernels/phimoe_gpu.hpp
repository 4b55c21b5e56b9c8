// The whole PhiMoE model (PhimoeForCausalLM) on the GPU, for a BATCH of sequences with KV caches: the GPU
// twin of PhimoeCpuModel (common/model/phimoe_cpu.hpp), built from the topic kernels.
//
//   x = embedding(ids)                                                     embedding.cuh
//   per layer l:  h = LN_in(x)            (l > 0: x += y_{l-1} fused in)   layernorm.cuh (add_layer_norm)
//                 q, k, v = linear(h)      bias in the GEMM's epilogue      linear.cuh (cuBLAS / cuBLASLt)
//                 RoPE(q, k); append k, v to each row's sequence cache     rope.cuh, attention.cuh (*_rows)
//                 a = attention; x += linear_o(a);  h = LN_post(x)         add_layer_norm
//                 y = MoE_l(h)             a GpuMoeStep (below): every expert on this GPU (GpuMoeLayer), or
//                                          expert parallel over ranks (kernels/ep/ep_moe_step.hpp)
//   logits = lm_head(LN_final(x + y_{L-1})) for the LAST new row of each sequence only, fp32
//
// Rows: one forward takes new tokens for sequences 0 .. nb-1 (each at least one), concatenated; row r belongs
// to sequence seq[r] at position pos[r], both arrays on the GPU, so one launch of each kernel serves the whole
// batch. Prefill = a sequence's prompt at once; decode = one token per sequence.
//
// Precision: bf16 weights and activations (the residual stream too), fp32 accumulation, fp32 logits; the
// argmax is taken on the host over those logits, ties to the lowest id (as PhimoeCpuModel and torch.argmax).
//
// CUDA graphs: a decode step (one new token for each of nb sequences) has fixed shapes, so the second decode
// step with a given nb is captured into a graph and every later one is a single graph launch (the ids and
// positions are copied from pinned host memory inside the graph, the logits back into pinned memory). Only
// when the MoE step needs no host synchronisation (GpuMoeStep::graph_safe): the EP step waits for message
// sizes, so EP runs eagerly. GpuModelOptions::graphs = false turns graphs off (the GPU tests compare the two).
//
// Host-only header (no CUDA types), so a .cpp chapter can use it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "moe/routing.hpp"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace eplab {

// The MoE block of every layer, as the model calls it: y = MoE_layer(h) for R rows (bf16 device arrays
// [R, hidden]), on stream s. Every rank of an EP group calls it with the same rows.
class GpuMoeStep {
 public:
  virtual ~GpuMoeStep() = default;
  virtual void forward(int layer, const void* d_h, int R, void* d_y, CUstream_st* s) = 0;
  virtual bool graph_safe() const = 0;              // no host synchronisation inside: capturable
  virtual std::size_t weight_bytes() const = 0;     // bytes of gates + experts on this GPU
  virtual std::string describe() const = 0;         // "all 16 experts on this GPU", "EP 2: experts 0-7 here"
  // The routing of the last forward of `layer`, its `rows` rows (host; synchronises). The model passes the
  // row count because a replayed CUDA graph runs no host code. EP: a collective, every rank calls it.
  virtual Routing last_routing(int layer, int rows) = 0;
  // Changes whenever the step reallocated a buffer; a CUDA graph captured before points at freed memory.
  virtual std::uint64_t buffers_epoch() const { return 0; }
  // Waits for everything queued on s. Default: cudaStreamSynchronize. The EP step waits through the
  // communicator instead, which also notices a dead or stalled peer (NCCL's async error, the watchdog).
  virtual void synchronize(CUstream_st* s);
};

// Loading progress: called after each layer's part is on the GPU (what: "attention" or "experts").
using LoadProgress = std::function<void(const char* what, int layers_done, int layers)>;

// Every expert of every layer on the current GPU (GpuMoeLayer, the grouped path of chapter 02).
std::unique_ptr<GpuMoeStep> make_local_moe_step(const Checkpoint& ckpt, const LoadProgress& progress = nullptr);

struct GpuModelOptions {
  int max_len = 0;                  // KV-cache rows per sequence (prompt + new tokens)
  int max_batch = 1;                // sequences
  int max_rows = 0;                 // rows per forward (0: max_len); prefill of several prompts at once needs more
  std::unique_ptr<GpuMoeStep> moe;  // null: make_local_moe_step(ckpt)
  CUstream_st* stream = nullptr;    // null: the model makes its own (EP: the communicator's stream)
  bool graphs = true;               // capture decode steps (when the MoE step is graph-safe)
  LoadProgress progress;            // optional: per layer of replicated tensors, and of the local experts
};

class GpuPhimoeModel {
 public:
  // Uploads every replicated tensor (embedding, norms, attention, lm_head) as bf16, takes the MoE step (or
  // makes the local one), and allocates the KV caches and activations. Throws eplab::Error with one line when
  // the config breaks a kernel precondition (hidden % 8, head_dim even and <= 256, heads % kv_heads, hidden
  // <= 8192), when max_len is not in [1, max_position_embeddings], or a tensor is missing or misshapen.
  static GpuPhimoeModel load(const Checkpoint& ckpt, GpuModelOptions options);
  static GpuPhimoeModel load(const Checkpoint& ckpt, int max_len);  // one sequence, all experts here

  GpuPhimoeModel(GpuPhimoeModel&&) noexcept;
  GpuPhimoeModel& operator=(GpuPhimoeModel&&) noexcept;
  ~GpuPhimoeModel();

  const ModelConfig& config() const;
  int max_len() const;
  int max_batch() const;
  int length(int seq = 0) const;  // tokens in sequence seq's KV cache (= position of its next token)

  // Empties every KV cache. The cache rows are filled with NaN, so a kernel that reads a row it should not
  // makes the next logits NaN, which forward() reports.
  void reset();

  // tokens[b]: the new tokens of sequence b, for b < tokens.size() <= max_batch, each list non-empty.
  // Returns the fp32 logits of each sequence's last new row, [tokens.size(), vocab]. Synchronises the GPU
  // (the logits are on the host), so wall time around a call is GPU time. Throws, changing nothing, when a
  // sequence would pass max_len, the rows pass max_rows, or an id is outside the vocabulary. Throws after the
  // step (the caches hold it) when a logit is not finite.
  std::vector<float> forward_batch(const std::vector<std::vector<int>>& tokens);
  std::vector<float> forward(const std::vector<int>& new_tokens);  // sequence 0 only: [vocab]

  // reset(), prefill of prompt_ids, then greedy decoding: up to max_new_tokens tokens, stopping right after
  // a token in stop_ids (that token included, as PhimoeCpuModel::generate with eos). Returns the new tokens.
  std::vector<int> generate(const std::vector<int>& prompt_ids, int max_new_tokens,
                            const std::vector<int>& stop_ids = {});

  std::size_t weight_bytes() const;  // replicated tensors + the MoE step's
  std::size_t kv_cache_bytes() const;
  GpuMoeStep& moe();
  // Per layer, the routing of the last forward's rows (in row order: sequence 0's new tokens, then 1's, ...).
  // Synchronises; for checks and reports. Under EP a collective: every rank calls it. A bf16 model may route a row whose decision is a near-tie in fp32
  // differently from the CPU reference: the checks use this to tell such a flip from an error.
  std::vector<Routing> last_routing();
  int graphs_captured() const;  // decode graphs ready to replay (tests: did capture work?)

 private:
  GpuPhimoeModel();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Bytes in use on the current GPU (total - free from cudaMemGetInfo): what chapter 05 prints per rank.
std::size_t gpu_memory_used_bytes();

}  // namespace eplab
