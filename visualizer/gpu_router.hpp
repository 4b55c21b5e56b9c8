// Live routing on the GPU with the project's kernels: router_logits (cuBLAS, kernels/router.cuh) then
// route_topk (kernels/routing.cuh), the same two calls chapter 02's GpuMoeLayer makes. Holds one cuBLAS
// handle, one stream and device buffers that grow with the prompt; the gate of the last layer used stays
// on the GPU. No CUDA types in this header, so the window code does not need the CUDA headers.
#pragma once
#include <memory>
#include <vector>

#include "model/config.hpp"
#include "moe/routing.hpp"
#include "util/bf16.hpp"

namespace eplab::viz {

class GpuRouter {
 public:
  explicit GpuRouter(int gpu);  // throws eplab::Error when the GPU or cuBLAS cannot be set up
  ~GpuRouter();
  GpuRouter(const GpuRouter&) = delete;
  GpuRouter& operator=(const GpuRouter&) = delete;

  // x [T, H] and gate [E, H] bf16 (row-major). gate_key identifies the gate (the layer) so that it is
  // uploaded only when it changes. Fills logits [T, E] (fp32, copied back for the heat map) and the routing.
  void route(const std::vector<bf16_bits>& x, const std::vector<bf16_bits>& gate, int gate_key, int T, int H,
             int E, int k, RouterKind kind, float jitter_eps, std::vector<float>& logits, Routing& out);

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
};

}  // namespace eplab::viz
