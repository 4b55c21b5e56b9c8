// Timing and bandwidth, the way the field reports them.
//
// A stage's time is the slowest rank's (all ranks wait for it at the next exchange): per forward we take
// the max over ranks of each stage, then the median over forwards.
//
// Bandwidth as nccl-tests defines it for all-to-all (doc/PERFORMANCE.md there):
//   algbw = S / t       S = bytes each rank sends, including the part it "sends" to itself
//   busbw = algbw * (N-1)/N
// (N-1)/N is the share of S that has to cross a link when the traffic is uniform; busbw is then
// comparable with the link's bandwidth whatever N is. With uneven traffic we use the mean S over ranks.
#pragma once
#include <string>
#include <vector>

#include "dist/communicator.hpp"
#include "ep_layer.hpp"

namespace eplab {

struct StageStats {
  double route_ms = 0, dispatch_ms = 0, experts_ms = 0, combine_ms = 0, total_ms = 0;  // max over ranks
  EpTimes mean;  // the same stages, mean over ranks: max >> mean means ranks wait for each other
};

// iters forwards, each started together (barrier); max over ranks, median over forwards.
StageStats time_forwards(EpLayer& layer, dist::Communicator& comm, int iters);
// The layer's raw all-to-all-v of the same bytes: {dispatch direction, combine direction}, same statistics.
std::pair<double, double> time_raw_exchange(EpLayer& layer, dist::Communicator& comm, int iters);

// The engine's sub-stage timeline (EpLayer::timeline_forward: undrained forwards, CUDA-event marks in ms
// since each forward's start), iters forwards each started together (barrier). Per mark: the median over
// forwards of rank 0's value and of the max over ranks. Empty for a layer without marks (the CPU one).
struct TimelineStats {
  std::vector<std::string> marks;
  std::vector<double> rank0_ms, max_ms;
};
TimelineStats time_timeline(EpLayer& layer, dist::Communicator& comm, int iters);

struct Bandwidth {
  double bytes = 0;  // S: mean bytes sent per rank
  double ms = 0;
  double algbw_gbps = 0, busbw_gbps = 0;
};
Bandwidth bandwidth(double bytes_per_rank, double ms, int ranks);

// Every rank's routing (the same T on every rank) in rank order, on rank 0 (empty elsewhere).
Routing gather_routing(dist::Communicator& comm, const Routing& mine);

// Mean bytes sent per rank in the last forward, for rows of the given size (traffic matrix / N).
double mean_bytes_per_rank(const EpPlan& plan, std::size_t row_bytes);

}  // namespace eplab
