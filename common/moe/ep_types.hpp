// Types the CPU and GPU expert-parallel paths share: how the router is configured, how long each stage of
// one forward took, the names of the exchange layouts, and the shape of a random benchmark layer. Host
// only (no CUDA), so chapter 04's CPU layer and chapter 05's CPU model use them without the GPU engine.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moe/ep_plan.hpp"
#include "moe/routing.hpp"

namespace eplab {

// Sub-stage marks of one forward: (mark, ms since the forward's start), GPU clock (CUDA events).
using EpTimeline = std::vector<std::pair<std::string, double>>;

// Wall-clock milliseconds of one forward on this rank; each stage ends when its results are in place (the
// stream has drained). Waiting for a slower peer shows up in dispatch and combine. All zero when the
// forward was not timed.
struct EpTimes {
  double route_ms = 0, dispatch_ms = 0, experts_ms = 0, combine_ms = 0;
  double total_ms() const { return route_ms + dispatch_ms + experts_ms + combine_ms; }
  // Filled only by the GPU engine with its timeline on AND the stages timed (the stages' drains then shape
  // the marks; for the marks of a forward as a model runs it, see EpMoeGpu::last_timeline()).
  EpTimeline timeline;
};

// "permute", "direct", "inplace" (EpLayout, moe/ep_plan.hpp); parse_layout throws on anything else.
const char* layout_name(EpLayout l);
EpLayout parse_layout(const std::string& s);

// A layer of random weights made on the GPU (benchmarks: no checkpoint). Values are a function of (seed,
// tensor, expert), so the host can rebuild them for a check (random_layer_weights, kernels/ep/ep_moe_gpu.hpp).
struct RandomLayerSpec {
  int hidden = 4096, inter = 448, experts = 16;  // Phi-tiny-MoE's layer shape
  std::uint64_t seed = 1;
};

}  // namespace eplab
