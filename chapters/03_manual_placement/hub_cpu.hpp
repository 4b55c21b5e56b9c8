// Chapter 03 on the CPU: N simulated devices in one process, so the lesson runs on a laptop.
// Each device has its own memory (its own vectors) and its own host thread; memcpy stands in for the
// peer copies and grouped_experts_cpu for the expert kernels. The structure is the GPU path's, step by step.
#pragma once
#include <span>
#include <vector>

#include "hub.hpp"
#include "model/checkpoint.hpp"

namespace eplab::ch03 {

class HubCpu {
 public:
  // gate: [E, H] router weight (on device 0); dev_weights[g]: the experts device g holds.
  HubCpu(std::span<const bf16_bits> gate, std::vector<MoeLayerWeights> dev_weights, RouterKind router, int top_k,
         float jitter_eps);
  // x: [T, H] on device 0.
  HubRun forward(std::span<const float> x, int T);

 private:
  std::vector<float> gate_;
  std::vector<MoeLayerWeights> w_;
  RouterKind router_;
  int k_;
  float eps_;
  int H_ = 0, E_ = 0;
  // "device memory": the hub's send and receive buffers on device 0, and each device's input/output rows.
  std::vector<float> send_, recv_;
  std::vector<std::vector<float>> xp_, yp_;
};

}  // namespace eplab::ch03
