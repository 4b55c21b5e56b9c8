// One MoE layer on one GPU: the host-facing API the chapters use. Implementation: moe_gpu.cu, which
// strings together the topic kernels (router.cu, routing.cu, naive_moe.cu, permute.cu, grouped_experts.cu,
// swiglu.cu, combine.cu).
//
// Precision: weights and activations bf16, accumulation fp32, router logits fp32, SwiGLU output h stored
// in bf16 before the w2 GEMM, output y bf16.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "moe/routing.hpp"

namespace eplab {

enum class MoePath {
  Naive,    // chapter 01: one thread block per token loops over its k experts
  Grouped,  // chapter 02: permute by expert, grouped GEMMs, fused SwiGLU, weighted unpermute
};

// How the grouped path computes the experts (kernels/grouped_experts.cuh explains each one).
//   Auto          WeightStream for small batches (rows = T*k <= small_rows_max = 32), CublasPadded above
//                 (and so CublasStreams above its cap; measured on an H200: grouped_experts.cuh)
//   WeightStream  custom kernels that stream each weight once and read the offsets on the GPU (no host sync)
//   CublasGrouped cublasGemmGroupedBatchedEx: one call for all experts' w1|w3, one for all w2
//   CublasLoop    cublasGemmEx per expert, one stream
//   CublasStreams cublasGemmEx per expert, spread over 4 streams
//   CublasPadded  rows permuted into a padded [E, M_pad, H] layout, one strided-batched GEMM per matrix for all
//                 experts, combine from the padded layout (falls back to CublasStreams when M_pad would exceed
//                 EPLAB_PADDED_RATIO (default 2) x the mean rows per expert)
enum class ExpertStrategy { Auto, WeightStream, CublasGrouped, CublasLoop, CublasStreams, CublasPadded };
const char* expert_strategy_name(ExpertStrategy s);  // "auto", "weight-stream", "cublas-grouped", ...
ExpertStrategy parse_expert_strategy(const std::string& name);  // the names above; throws on anything else

// The expert kernels of the direct small-batch path (T*k <= 32; notes/perf-02.md has the measurements):
//   Direct  experts_direct (grouped_experts.cuh): w13 + SwiGLU, then w2 + weighted combine
//   Decode  experts_decode (experts_decode.cuh): its own w13 and w2 kernels, programmatic dependent launch
//   Hybrid  experts_decode's w13 kernel, then experts_direct's w2 kernel
// A choice that cannot run the shape (experts_decode_ok) runs Direct.
enum class DecodeKernels { Direct, Decode, Hybrid };
const char* decode_kernels_name(DecodeKernels d);               // "direct", "decode", "hybrid"
DecodeKernels parse_decode_kernels(const std::string& name);    // the names above (or 0 / 1); throws otherwise

// How the router GEMM + routing runs (moe_gpu.cu, router_tiled.cuh, routing.cuh):
//   Auto    Tiled wherever it can run the shape (E <= 64, H % 8 == 0), else Fused up to T = 512, else Cublas
//   Cublas  router_logits (cuBLAS) + route_topk: two kernels
//   Fused   router_route_fused: one block per token, GEMM + routing in one kernel (re-reads the gate per token)
//   Tiled   router_route_tiled: 32-token tiles on tensor cores, x read once, routing in the epilogue
enum class RouterImpl { Auto, Cublas, Fused, Tiled };
const char* router_impl_name(RouterImpl r);              // "auto", "cublas", "fused", "tiled"
RouterImpl parse_router_impl(const std::string& name);  // the names above; throws on anything else

// Time split of one forward, filled when timing is requested (CUDA events, milliseconds).
struct MoeTimings {
  float router_ms = 0, routing_ms = 0, permute_ms = 0, experts_ms = 0, combine_ms = 0, total_ms = 0;
  // Eager split (forward with time_stages) on the cuBLAS strategies: from the end of the permute to the start
  // of the experts, i.e. the GPU idle while the host waits for the offsets and enqueues the GEMMs (it is
  // inside experts_ms too). 0 on paths without that wait, and in time_stages_queued.
  float offsets_wait_ms = 0;
  // time_stages_queued only: busy-waits that were over before the host had queued what follows them (then
  // the split includes host gaps after all: raise the busy-wait). 0 means the split is pure GPU time.
  int queue_misses = 0;
};

class GpuMoeLayer {
 public:
  // Uploads the gate and all experts of `w` (which must hold every expert of the layer).
  GpuMoeLayer(const MoeLayerWeights& w, RouterKind router, int top_k, float jitter_eps);
  // Random weights of the given shape generated on the GPU (for --bench at Phi-tiny size without a checkpoint).
  GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
              unsigned long long seed);
  ~GpuMoeLayer();
  GpuMoeLayer(const GpuMoeLayer&) = delete;
  GpuMoeLayer& operator=(const GpuMoeLayer&) = delete;

  struct Result {
    std::vector<float> logits;  // [T, E]
    Routing routing;            // ids/weights as the GPU computed them
    std::vector<float> y;       // [T, H], the bf16 output widened to float
    MoeTimings timings;
  };
  // Host in, host out: uploads x (bf16 [T, H]), runs, downloads. T = 0 is allowed (empty result).
  Result forward(std::span<const bf16_bits> x, int T, MoePath path, bool time_stages = false);

  // Stage split of one forward without host launch gaps (benchmarks), x and y on the device. A GPU
  // busy-wait of spin_us microseconds is enqueued first, so the host has queued the forward (and the events
  // between its stages) before the GPU gets there: the stages are timed back to back as the GPU runs them,
  // not at the pace of host launches. The cuBLAS strategies wait on the host for the offsets mid-forward;
  // there a second busy-wait is enqueued after that wait and the experts stage is timed from its end, so the
  // split leaves out the offsets round trip (eager forward(..., true) shows it as offsets_wait_ms). total_ms is
  // then the sum of the stages. The layer's CUDA graphs are not used (events need the kernels one by one).
  MoeTimings time_stages_queued(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                                cudaStream_t stream, float spin_us = 300.f);

  // Device in, device out, on `stream`; no host synchronisation unless the path needs one.
  // d_x: [T, H] bf16, d_y: [T, H] bf16. Scratch buffers grow as needed (allocate outside timed loops
  // by calling once with the largest T first).
  void forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path, cudaStream_t stream);

  // Benchmark knobs for the grouped path. Defaults: Auto with small_rows_max = 32, or what the environment
  // says: EPLAB_EXPERTS=<strategy name>, EPLAB_SMALL_ROWS=<rows>.
  void set_expert_strategy(ExpertStrategy s, int small_rows_max = 32);
  ExpertStrategy expert_strategy() const;  // the strategy set (Auto unless forced)
  int small_rows_max() const;
  ExpertStrategy last_expert_strategy() const;  // what the last grouped forward actually ran
  // Small batches on weight-stream take the token-direct chain (fused router+routing, experts that read x
  // through the routing and write y; moe_gpu.cu explains). Off: plan + permute + experts + combine, as
  // for large batches. Default on; EPLAB_DIRECT=0 turns it off.
  void set_direct_small_batches(bool on);
  // Forwards that need no host synchronisation (the naive path; the grouped path with WeightStream) are
  // captured into a CUDA graph the second time the same (T, path, d_x, d_y) is seen, and replayed after
  // that: one launch instead of ~10. Default on; EPLAB_GRAPHS=0 turns it off.
  void set_use_graphs(bool on);
  // Router implementation (default Auto, or EPLAB_ROUTER=<name>); last_router_impl: what the last forward ran.
  void set_router_impl(RouterImpl r);
  RouterImpl last_router_impl() const;
  // Direct small-batch path with T*k <= 32: which expert kernels run (DecodeKernels above), with programmatic
  // dependent launch for the decode ones when pdl. EPLAB_DECODE=direct|decode|hybrid, EPLAB_PDL=0.
  void set_decode_kernels(DecodeKernels d, bool pdl = true);
  int cached_graphs() const;  // graphs captured and ready to replay (tests: did capture work?)
  // The routing of the last forward_device / forward (ids and multipliers as the GPU computed them), copied
  // to the host after a device-wide synchronisation. For reports and tests, not for hot loops. A caller that
  // replays the layer inside its own CUDA graph passes the graph's row count (host code did not run then).
  Routing last_routing() const;
  Routing last_routing(int rows) const;
  // Changes whenever a buffer of the layer is reallocated (a forward with more rows than before): a caller
  // that captured the layer into its own CUDA graph must capture again.
  std::uint64_t buffers_generation() const;

  int hidden() const;
  int inter() const;
  int num_experts() const;
  int top_k() const;
  std::size_t weight_bytes() const;  // bytes of expert + gate weights on the GPU (the naive path keeps a
                                     // second copy of w1/w3, made on its first use, not counted here)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Measured ceilings for "% of roofline" (benchmark support).
struct Ceilings {
  double hbm_gbps = 0;          // device-to-device copy, (read + write) bytes / time
  double bf16_tflops = 0;       // large cuBLAS bf16 GEMM, fp32 accumulate
};
Ceilings measure_ceilings();

// Benchmark support (bench_support.cu). A single-thread kernel that spins on the GPU's global timer for `us`
// microseconds: work enqueued behind it is all queued before the GPU reaches it.
void gpu_busy_wait(cudaStream_t s, double us);

// A cold L2 before a timed forward: touch a buffer of twice the L2 size.
//   Write: cudaMemsetAsync over it. The L2 is left full of DIRTY lines, so the first misses of the next
//          kernel also pay write-backs to HBM.
//   Read:  a kernel reads it all and folds it into one value. The L2 is left full of CLEAN lines, as after
//          a layer that mostly read weights (what a real model's next layer finds).
//   None:  no flush (a diagnostic, not a model of decoding: the layer's weights may still sit in L2 from the
//          previous forward; the gap to write/read is what the cold caches cost).
enum class L2FlushKind { Write, Read, None };
const char* l2_flush_name(L2FlushKind k);              // "write", "read", "none"
L2FlushKind parse_l2_flush(const std::string& name);  // the names above; throws on anything else
class L2Flusher {
 public:
  explicit L2Flusher(L2FlushKind kind);  // allocates 2 x the current device's L2 (at least 2 MiB)
  ~L2Flusher();
  L2Flusher(const L2Flusher&) = delete;
  L2Flusher& operator=(const L2Flusher&) = delete;
  void flush(cudaStream_t s, int salt);  // salt: the byte a write flush stores (vary it between calls)
  std::size_t bytes() const { return bytes_; }
  L2FlushKind kind() const { return kind_; }

 private:
  L2FlushKind kind_;
  std::size_t bytes_ = 0;
  void* buf_ = nullptr;
  unsigned* sink_ = nullptr;  // the read flush's result, so the loads cannot be optimised away
};

}  // namespace eplab
