// The whole model's MoE step at every EP size (chapter 05): the MoE engine inside GpuPhimoeModel. One rank
// (N = 1) is the engine's single-GPU case: every expert here, no exchange, decode steps in CUDA graphs.
//
// Every rank runs attention for the whole batch (replicated, like the CPU path), so every rank holds the
// same rows h [R, H] when a layer's MoE begins. The EP step then
//   1. takes this rank's share of the rows: the block rows_of(r, N, R) (R / N rows, the first R mod N ranks
//      one more: the CPU path's blocks, common/moe/ep_moe_cpu.hpp), as data-parallel attention would leave them;
//   2. runs chapter 04's expert-parallel layer on them (EpMoeGpu, kernels/ep/ep_moe_gpu.hpp): route with the
//      replicated gate, NCCL all-to-all-v to the experts' ranks, this rank's experts, all-to-all-v back,
//      weighted sum;
//   3. all-gathers the shares of y (one grouped NCCL send/recv per peer), so every rank has y [R, H] again.
// With R = 1 (decode at batch 1) rank 0 owns the row and the others send nothing: the exchange still runs,
// since the row's experts may live anywhere. With N = 1 steps 1 and 3 are empty.
#pragma once
#include <memory>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/ep_plan.hpp"
#include "moe/placement.hpp"
#include "phimoe_gpu.hpp"

namespace eplab {

// Loads, for every layer, the gate and only this rank's experts (placement.experts_of(comm.rank())) to this
// rank's GPU. comm must be a device (NCCL) communicator; the model must run on comm.stream().
std::unique_ptr<GpuMoeStep> make_ep_moe_step(dist::Communicator& comm, const Placement& placement,
                                             const Checkpoint& ckpt, EpLayout layout,
                                             const LoadProgress& progress = nullptr);

}  // namespace eplab
