// One phase of the lesson: chapter 04's EP layer with a given placement, run over the window's steps, and
// what the balancer needs from it (tokens per logical expert) and what the lesson shows (rows per rank, time).
#pragma once
#include <cstdint>
#include <vector>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/placement.hpp"
#include "moe/routing.hpp"

namespace eplab {

struct PhaseResult {
  std::vector<double> expert_tokens;  // [E] rows routed to each logical expert, over the window (every rank)
  std::vector<double> rank_rows;      // [N] rows each rank's experts computed, over the window (every rank)
  double experts_ms = 0, total_ms = 0;  // per step: slowest rank, median of iters; summed over the steps
  std::vector<std::vector<float>> y;    // rank 0: every step's output of all ranks' tokens [N*T, H]
  std::vector<Routing> routing;         // rank 0: every step's routing, all ranks' tokens
};

// x_steps[s]: this rank's T tokens of step s. mine: this rank's slots' weights (placement.experts_of(rank)
// order). GPU: the NCCL engine (inplace layout); CPU: the MPI block.
PhaseResult run_phase(dist::Communicator& comm, bool gpu, const Placement& placement, const MoeLayerWeights& mine,
                      const RouterCfg& router, const std::vector<std::vector<bf16_bits>>& x_steps, int T, int iters);

}  // namespace eplab
