// The MoE engine: one layer on one rank's GPU, device in / device out, at every EP size. Chapter 04's GPU
// layer and chapter 05's model (one rank or many) run it. NCCL between ranks (a Communicator with
// Memory::Device; the tests' loopback ranks share one GPU), the kernels of kernels/ on this rank's GPU.
//
// One forward is route -> dispatch -> experts -> combine. dispatch returns the forward's layout handle
// (what went where: counts, offsets, the blocks of the arrival buffer) and combine sends the rows back by
// it, as DeepEP's dispatch hands combine a handle.
//
// N = 1 (a one-rank communicator) has no peers: the dispatch is the local permute by expert, and the
// single-GPU layer of moe_gpu.hpp (chapter 02's) runs the whole forward with its fast chain: the token-direct
// decode kernels, the padded tensor-core GEMMs, CUDA graphs. Same kernels, same bits as chapter 02.
//
//   route     logits = x·gateᵀ (gate replicated on every rank) -> ids, multipliers               [T, k]
//   dispatch  ids -> slots (rank-major expert order) -> dispatch plan on the GPU -> per-slot counts
//             exchanged ON THE GPU (NCCL send/recv of E ints per peer, then one device->host copy of the
//             N x E table: NCCL needs message sizes on the host) -> rows grouped by (destination rank,
//             local expert) -> NCCL exchange
//   experts   grouped SwiGLU experts over the received rows (only this rank's experts are on the GPU), by
//             the same grouped_experts kernels as N = 1 (weight streaming for few rows, cuBLAS above)
//   combine   the exchange reversed -> y[t] = Σ_j w[t,j] · row(t,j) on the rank that owns token t
//
// Layouts (EpLayout, moe/ep_plan.hpp):
//   InPlace (default, the fast one)  rows arrive as one message per peer, grouped by (source, local
//       expert): each such segment is contiguous in the arrival buffer, so the experts run straight on it
//       (grouped_experts_segments: one GEMM group per segment, with its expert's weights) and write their
//       outputs in arrival order, which the combine sends straight back. No receive-side permute and no
//       inverse. This rank's own rows never enter NCCL: the send-side permute writes them straight to the
//       front of the arrival buffer (on a second stream, while NCCL moves the other ranks' rows), and the
//       combine reads them from there. The remote rows' permute starts before the counts are known
//       (its bounds are read on the GPU), so it overlaps the count exchange.
//   Permute  one all-to-all-v per direction + a local permute by expert and its inverse (the textbook flow).
//   Direct   one message per (peer, local expert) segment, received straight into expert order.
//
// Chunked pipeline (InPlace only, set_chunks(C), C > 1; C = 1 is the flow above, unchanged). The dispatch
// message to each peer is cut into C pieces in row order (piece c: rows [cnt*c/C, cnt*(c+1)/C) of the
// peer's block, the same rule on both sides, so the receiver sizes its pieces from the counts it already
// has). The side stream permutes piece c and records an event; NCCL sends piece c (one group per piece,
// c = 0..C-1 on every rank) as soon as that event has fired, so the exchange no longer waits for the
// whole permute. The rows come back in the same pieces, and the combine follows them: tokens whose k rows
// all stayed on this rank are combined on the side stream while the first piece travels, every other
// token as soon as the piece with its last remote row is back. Same bits as C = 1.
//
// Timeline (set_timeline(true)): every forward records CUDA events at its sub-stages (route, plan,
// counts, permutes, exchanges, experts, combine) on the stream where each happens, with no host wait
// added; last_timeline() reads them as milliseconds since the forward's start.
//
// Every rank calls forward_device() once per layer step with its OWN rows (T may differ per rank, and may
// be 0): it is a collective. Everything runs on the communicator's stream (comm.stream()) plus one side
// stream that is joined back before forward_device returns its work; callers put their own work on
// comm.stream() too, or order it with events.
//
// Memory. Weights (gate + this rank's experts) and the last call's routing are per layer. All scratch
// (send / arrival buffers, logits, plan, expert intermediates, cuBLAS handle, side stream) lives in an
// EpWorkspace shared by every EpMoeGpu on the same communicator (a model's 32 layers share one), grows
// to the largest call seen and is freed with the last layer. That is safe because the layers of one
// communicator run one after another on its stream.
//
// Precision: as GpuMoeLayer (moe_gpu.hpp): bf16 weights and activations, fp32 accumulation and logits.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/ep_plan.hpp"
#include "moe/ep_types.hpp"
#include "moe/placement.hpp"
#include "moe/routing.hpp"
#include "moe_gpu.hpp"

namespace eplab {

class EpMoeGpu {
 public:
  // Uploads the gate and this rank's experts (mine.expert_ids must be placement.experts_of(comm.rank()), in
  // that order). Throws eplab::Error (one line) when the communicator is not a device one, or when the
  // weights do not match the placement.
  EpMoeGpu(dist::Communicator& comm, const Placement& placement, const MoeLayerWeights& mine, const RouterCfg& router,
           EpLayout layout = EpLayout::InPlace);
  // Random weights made on the GPU (the benchmark: no checkpoint). Values are a function of (seed, tensor,
  // expert), so random_layer_weights(spec) rebuilds them on the host for a check.
  using RandomSpec = RandomLayerSpec;  // moe/ep_types.hpp
  EpMoeGpu(dist::Communicator& comm, const Placement& placement, const RandomSpec& spec, const RouterCfg& router,
           EpLayout layout = EpLayout::InPlace);
  ~EpMoeGpu();
  EpMoeGpu(const EpMoeGpu&) = delete;
  EpMoeGpu& operator=(const EpMoeGpu&) = delete;

  // y = MoE(x) for this rank's T rows. d_x, d_y: [T, H] bf16 on this rank's GPU (d_y may not alias d_x).
  // Collective: every rank calls it. time_stages: drain the stream after each stage and fill EpTimes (for
  // reports); otherwise the call returns with work still queued on comm.stream() (it waits on the host only
  // where NCCL needs message sizes: after the count exchange, through comm.sync(), which also feeds the
  // NCCL watchdog). Buffers grow to the largest T seen. d_x must stay unchanged until the queued work
  // has read it (anything the caller queues on comm.stream() afterwards is ordered after that).
  EpTimes forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, bool time_stages = false);

  // Chunked pipeline of the InPlace layout (see the top of this file): chunks >= 1, 1 = one message per
  // peer (the default). Every rank must use the same value (receivers size the pieces by the same rule).
  // Throws eplab::Error (one line) for chunks outside [1, kMaxChunks], or chunks > 1 with another layout.
  static constexpr int kMaxChunks = 1024;  // a bound on launches and NCCL groups per forward
  void set_chunks(int chunks);
  int chunks() const;
  // While on, every forward records CUDA events at its sub-stages (see ep_moe_gpu.cu, "Timeline"); no host
  // wait is added. last_timeline(): the last forward's marks in a fixed order, ms since its start; waits
  // for comm.stream() (through comm.sync()). Empty when the last forward ran with the timeline off.
  void set_timeline(bool on);
  EpTimeline last_timeline();

  // The last forward's plan (counts, traffic, segments); its per-row maps are filled for the Permute layout
  // only (finish_ep_plan with EpRowMaps::Skip otherwise). N = 1: built from the routing when asked.
  const EpPlan& plan() const;
  Routing routing();           // the last forward's routing, on the host (synchronises the stream)
  // The same for a forward the host did not run (a CUDA graph of the caller's replayed it): rows = its T.
  // N > 1 never runs inside a graph, so there rows must be the last forward's T.
  Routing routing(int rows);

  // The kernels' choices, the same at every N (moe_gpu.hpp explains each): what a lesson's --bench compares
  // and the tests force (the same-bits test runs the per-row kernels: fused router, weight streaming).
  void set_expert_strategy(ExpertStrategy s, int small_rows_max = 32);
  ExpertStrategy expert_strategy() const;
  void set_router_impl(RouterImpl r);
  // N = 1: the single-GPU layer captures sync-free forwards into CUDA graphs (default on); a caller that
  // captures whole steps itself turns that off. buffers_generation changes when a buffer moved (recapture).
  // N > 1: nothing to capture (the count exchange waits on the host); no effect, generation 0.
  void set_use_graphs(bool on);
  std::uint64_t buffers_generation() const;
  int hidden() const;
  int inter() const;
  int num_local_experts() const;
  EpLayout layout() const;
  std::size_t weight_bytes() const;      // gate + this rank's experts on the GPU
  std::size_t row_bytes() const;         // bytes per row on the wire, each direction (H * 2)
  // A plain all-to-all-v of exactly the last forward's byte counts (dispatch direction, then combine
  // direction), between preallocated buffers, nothing else: the ceiling dispatch and combine are compared
  // with. Milliseconds on this rank. N = 1: a device copy of the rows' bytes each way (nothing travels).
  std::pair<double, double> raw_exchange_ms();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The random layer's values on the host, made on this rank's GPU and copied back (the benchmark's check).
MoeLayerWeights random_layer_weights(const EpMoeGpu::RandomSpec& spec);  // gate + every expert
std::vector<bf16_bits> random_tokens(const EpMoeGpu::RandomSpec& spec, int rank, int T);
// The same tokens written straight to a device buffer (d_x: [T, H]).
void random_tokens_device(const EpMoeGpu::RandomSpec& spec, int rank, int T, __nv_bfloat16* d_x);

}  // namespace eplab
