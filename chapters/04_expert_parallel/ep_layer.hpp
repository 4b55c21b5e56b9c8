// One expert-parallel MoE layer on one rank: this rank's tokens, this rank's experts, and the two
// exchanges that connect them. Two implementations with the same steps:
//   CPU  (ep_cpu.cpp)  MPI backend, host buffers, the CPU grouped experts (fp32): chapter 05's
//                      EpMoeCpuBlock (common/moe/ep_moe_cpu.hpp) in its data-parallel (EpInput::Local) mode
//   GPU  (ep_gpu.cu)   NCCL backend, device buffers, the kernels of kernels/ (bf16, fp32 accumulation)
//
//   route     logits = x·gateᵀ (gate replicated on every rank) -> ids, multipliers          [T, k]
//   dispatch  ids -> slots (rank-major expert order) -> dispatch plan -> send buffer grouped by
//             (destination rank, local expert) -> allgather of the per-slot counts -> exchange
//             -> rows in expert-grouped order on their expert's rank
//   experts   grouped SwiGLU experts over the received rows (only the local experts are loaded)
//   combine   exchange back (the same messages, reversed) -> y[t] = Σ_j w[t,j] · row(t,j)
//
// Three layouts of the exchange (--layout):
//   permute  one all-to-all-v per direction (rows per peer), then a local permute by local expert on
//            the receiver (and its inverse before the combine): the textbook flow
//   direct   one message per (peer, local expert) segment, received straight into expert order: no
//            local permute at all (see ep_plan.hpp, "Segments")
//   inplace  (GPU; the CPU runs it as permute) one message per peer, experts straight on the arrival
//            buffer, one GEMM group per (source, local expert) segment; own rows never enter NCCL
//            (kernels/ep/ep_moe_gpu.hpp)
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/ep_plan.hpp"
#include "moe/ep_types.hpp"
#include "moe/placement.hpp"
#include "moe/routing.hpp"

namespace eplab {

// EpLayout (permute | direct | inplace), RouterCfg and EpTimes are in common/moe (ep_plan.hpp, ep_types.hpp):
// one definition for both paths. The CPU block implements permute and direct, and runs inplace as permute
// (the layouts differ in data movement, never in the answer).

class EpLayer {
 public:
  virtual ~EpLayer() = default;
  virtual EpTimes forward() = 0;                  // one forward over this rank's tokens
  virtual const EpPlan& plan() const = 0;         // the last forward's plan (counts, traffic, segments)
  virtual Routing routing() = 0;                  // the last forward's routing, on the host
  virtual std::vector<float> output() = 0;        // the last forward's y [T, H], on the host
  virtual std::size_t dispatch_row_bytes() const = 0;  // bytes per row on the wire, each direction
  virtual std::size_t combine_row_bytes() const = 0;
  // A plain all-to-all-v of exactly the last forward's byte counts (dispatch direction, then combine
  // direction), nothing else: the ceiling dispatch and combine are compared with. Milliseconds, this rank.
  virtual std::pair<double, double> raw_exchange_ms() = 0;
  // One forward as a model runs it (no drain between stages), with the engine's sub-stage marks (CUDA
  // events, ms since the forward's start; EpMoeGpu::set_timeline). The CPU layer has none: empty.
  virtual EpTimeline timeline_forward() { return {}; }
};

// x: this rank's tokens [T, H] (bf16, as every path receives them); mine: this rank's experts of the layer.
std::unique_ptr<EpLayer> make_cpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout);

// GPU: EpMoeGpu (kernels/ep/ep_moe_gpu.hpp) with this rank's x uploaded once and its own y buffer.
// From checkpoint weights (uploaded; w1/w3 packed into the [n, 2I, H] layout grouped_experts reads).
// chunks: EpMoeGpu::set_chunks (the chunked pipeline of the inplace layout; 1 = off).
std::unique_ptr<EpLayer> make_gpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout, int chunks = 1);

// GPU with random weights and tokens made on the device (the benchmark: no checkpoint needed). Every
// value is a function of (seed, tensor, expert) or (seed, rank), so the benchmark can rebuild any
// expert or token on any rank to check the answer (random_layer_weights, random_tokens in ep_moe_gpu.hpp).
std::unique_ptr<EpLayer> make_gpu_ep_layer_random(dist::Communicator& comm, const Placement& placement,
                                                  const RandomLayerSpec& spec, int T, const RouterCfg& router,
                                                  EpLayout layout, int chunks = 1);

}  // namespace eplab
