// Chapter 03 on real GPUs: one process, N GPUs, GPU 0 is the hub.
//
//   GPU 0: router GEMM + top-k  ->  ids, w  --(D2H)-->  host builds the plan and the layout
//   per GPU g, from its own host thread:
//     GPU 0 stream hub[g]:  gather g's rows  --cudaMemcpyPeerAsync-->  GPU g
//     GPU g stream dev[g]:  grouped experts  --cudaMemcpyPeerAsync-->  GPU 0 receive buffer
//   GPU 0: wait for every GPU, then combine (weighted sum per token)
//
// Peer access is enabled where cudaDeviceCanAccessPeer allows it; elsewhere the same cudaMemcpyPeerAsync
// is staged through host memory by the driver (slower, but correct), and notes() says so.
#pragma once
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "hub.hpp"
#include "model/checkpoint.hpp"

namespace eplab::ch03 {

class HubGpu {
 public:
  // gate: [E, H] (uploaded to GPU 0); dev_weights[g]: the experts device g holds (uploaded to its GPU).
  // gpu_of[g]: the physical GPU of device g; empty = device g on GPU g. All zeros (--share-gpu) runs every
  // device on GPU 0, which exercises the multi-GPU code path (layout, copies, events) on a one-GPU machine.
  HubGpu(std::span<const bf16_bits> gate, const std::vector<MoeLayerWeights>& dev_weights, RouterKind router,
         int top_k, float jitter_eps, std::vector<int> gpu_of = {});
  ~HubGpu();
  HubGpu(const HubGpu&) = delete;
  HubGpu& operator=(const HubGpu&) = delete;

  // One line per GPU pair (0, g): "GPU 0 <-> GPU 1: peer access enabled" or "... not available: ...".
  const std::vector<std::string>& notes() const;

  // Puts x ([T, H] bf16) on GPU 0, where the layer's input lives (not timed).
  void set_input(std::span<const bf16_bits> x, int T);
  // Runs the layer on the input; times every stage with CUDA events; y stays on GPU 0.
  HubRun forward();
  // Copies y ([T, H] bf16 on GPU 0) back to the host, widened to float (not timed).
  std::vector<float> output() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eplab::ch03
