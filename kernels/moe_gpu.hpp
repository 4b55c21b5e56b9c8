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
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "grouped_experts.cuh"
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
//                 2 x the mean rows per expert)
// Chapter 02's `--bench-experts` compares them on the whole layer (set_expert_strategy).
using ExpertStrategy = gpu::GroupedStrategy;  // the experts stage's own enum (grouped_experts.cuh)
const char* expert_strategy_name(ExpertStrategy s);  // "auto", "weight-stream", "cublas-grouped", ...
ExpertStrategy parse_expert_strategy(const std::string& name);  // the names above; throws on anything else

// How the router GEMM + routing runs (moe_router.cuh, the same stage in the EP engine; router_tiled.cuh, routing.cuh):
//   Auto    Tiled wherever it can run the shape (E <= 64, H % 8 == 0), else Fused up to T = 512, else Cublas
//   Cublas  router_logits (cuBLAS) + route_topk: two kernels
//   Fused   router_route_fused: one block per token, GEMM + routing in one kernel (re-reads the gate per token)
//   Tiled   router_route_tiled: 32-token tiles on tensor cores, x read once, routing in the epilogue
// Every forward runs Auto; the GPU tests force each one (set_router_impl) to cover every kernel.
enum class RouterImpl { Auto, Cublas, Fused, Tiled };
const char* router_impl_name(RouterImpl r);              // "auto", "cublas", "fused", "tiled"
RouterImpl parse_router_impl(const std::string& name);  // the names above; throws on anything else

// Time split of one forward, filled when timing is requested (CUDA events, milliseconds).
struct MoeTimings {
  float router_ms = 0, routing_ms = 0, permute_ms = 0, experts_ms = 0, combine_ms = 0, total_ms = 0;
  // Eager split (forward with time_stages) on the cuBLAS strategies: from the end of the permute to the start
  // of the experts, i.e. the GPU idle while the host waits for the offsets and enqueues the GEMMs (it is
  // inside experts_ms too). 0 on paths without that wait.
  float offsets_wait_ms = 0;
};

// The stage boundaries of one forward, in the order they are queued (kMoeExpertsStart comes right after
// kMoePermuted, or after the host's wait for the offsets on the cuBLAS strategies).
enum MoeBoundary : int {
  kMoeStart,         // before the router
  kMoeRouted,        // router logits done (with the fused and tiled routers: routing too)
  kMoeRoutingDone,   // ids and multipliers done
  kMoePermuted,      // dispatch plan and permute done (nothing on the naive and token-direct paths)
  kMoeExpertsDone,   // experts done (SwiGLU included; the token-direct path's combine too)
  kMoeCombined,      // y complete
  kMoeExpertsStart,  // the experts' first kernel is about to be queued
  kMoeBoundaries
};

// Watches one forward (benchmark support: the eager stage split below, and bench/bench_support.hpp's queued
// split). boundary(b, s) is called right after the work before boundary b has been queued on s; on the
// cuBLAS strategies, before_host_wait() and after_host_wait(s) are called around the host's mid-forward
// wait for the per-expert offsets.
class MoeStageObserver {
 public:
  virtual ~MoeStageObserver() = default;
  virtual void boundary(MoeBoundary b, cudaStream_t s) = 0;
  virtual void before_host_wait() {}
  virtual void after_host_wait(cudaStream_t) {}
};

// An observer that records a CUDA event (with timing) at every boundary.
class MoeStageEvents : public MoeStageObserver {
 public:
  MoeStageEvents();
  ~MoeStageEvents() override;
  MoeStageEvents(const MoeStageEvents&) = delete;
  MoeStageEvents& operator=(const MoeStageEvents&) = delete;
  void boundary(MoeBoundary b, cudaStream_t s) override;
  float ms(MoeBoundary from, MoeBoundary to) const;  // GPU time between two recorded boundaries (waits for `to`)
  MoeTimings eager_split() const;  // the stages as queued: experts_ms from kMoePermuted, offsets wait inside it

 private:
  cudaEvent_t ev_[kMoeBoundaries] = {};
};

class GpuMoeLayer {
 public:
  // Uploads the gate and all experts of `w` (which must hold every expert of the layer).
  GpuMoeLayer(const MoeLayerWeights& w, RouterKind router, int top_k, float jitter_eps);
  // Random weights of the given shape generated on the GPU (for --bench at Phi-tiny size without a checkpoint).
  GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
              unsigned long long seed);
  // Weights written on the GPU by fill(gate [E, H], w13 [E, 2I, H] (w1 then w3 per expert), w2 [E, H, I],
  // stream): the EP engine's random layer at one rank, whose values every EP size must share.
  using DeviceFill = std::function<void(__nv_bfloat16* gate, __nv_bfloat16* w13, __nv_bfloat16* w2, cudaStream_t)>;
  GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
              const DeviceFill& fill);
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

  // Device in, device out, on `stream`; no host synchronisation unless the path needs one.
  // d_x: [T, H] bf16, d_y: [T, H] bf16. Scratch buffers grow as needed (allocate outside timed loops
  // by calling once with the largest T first).
  void forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path, cudaStream_t stream);

  // forward_device with an observer at every stage boundary (benchmarks). Eager: no CUDA graph, and no
  // programmatic dependent launch (work queued between two kernels would stop their overlap anyway).
  void forward_device_observed(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                               cudaStream_t stream, MoeStageObserver& observer);

  // The grouped path's expert strategy and small-batch row limit: what chapter 02's `--bench-experts`
  // compares, and what the GPU tests force. Default: Auto with small_rows_max = 32.
  void set_expert_strategy(ExpertStrategy s, int small_rows_max = 32);
  ExpertStrategy expert_strategy() const;  // the strategy set (Auto unless forced)
  int small_rows_max() const;
  ExpertStrategy last_expert_strategy() const;  // what the last grouped forward actually ran
  // Forwards that need no host synchronisation (the naive path; the grouped path with WeightStream) are
  // captured into a CUDA graph the second time the same (T, path, d_x, d_y) is seen, and replayed after
  // that: one launch instead of ~10. Default on; off for a caller that captures the layer into its own
  // graph (a capture inside a capture fails), e.g. GpuPhimoeModel's decode step.
  void set_use_graphs(bool on);
  // Router implementation (default Auto); last_router_impl: what the last forward ran.
  void set_router_impl(RouterImpl r);
  RouterImpl last_router_impl() const;
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

}  // namespace eplab
