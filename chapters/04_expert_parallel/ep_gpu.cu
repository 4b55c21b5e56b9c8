// The GPU expert-parallel layer of chapter 04: a thin adapter over the engine EpMoeGpu
// (kernels/ep/ep_moe_gpu.{hpp,cu}: route, count exchange, NCCL dispatch, grouped experts, combine, all on
// the communicator's stream), holding this rank's tokens and output on the GPU so that every forward()
// runs the same x. Each forward drains the stream after every stage (time_stages) to report the split;
// timeline_forward() runs one undrained forward with the engine's CUDA-event marks instead.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_check.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "ep_layer.hpp"
#include "util/check.hpp"

namespace eplab {

namespace {

class GpuEpLayer final : public EpLayer {
 public:
  GpuEpLayer(std::unique_ptr<EpMoeGpu> engine, int T) : eng_(std::move(engine)), T_(T) {
    const std::size_t n = std::max<std::size_t>(std::size_t(T) * eng_->hidden(), 1);
    CUDA_CHECK(cudaMalloc(&d_x_, n * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&d_y_, n * sizeof(__nv_bfloat16)));
  }
  ~GpuEpLayer() override {
    eng_.reset();  // waits for its stream before our buffers go
    if (d_x_) cudaFree(d_x_);
    if (d_y_) cudaFree(d_y_);
  }

  void upload(std::span<const bf16_bits> x) {
    require(x.size() == std::size_t(T_) * eng_->hidden(), "GPU EP layer: x has ", x.size(), " values, expected ",
            std::size_t(T_) * eng_->hidden());
    if (!x.empty()) CUDA_CHECK(cudaMemcpy(d_x_, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  }
  __nv_bfloat16* d_x() { return d_x_; }

  EpTimes forward() override { return eng_->forward_device(d_x_, T_, d_y_, /*time_stages=*/true); }
  const EpPlan& plan() const override { return eng_->plan(); }
  Routing routing() override { return eng_->routing(); }
  std::vector<float> output() override {
    std::vector<bf16_bits> y(std::size_t(T_) * eng_->hidden());
    (void)eng_->routing();  // synchronises the engine's stream
    if (!y.empty()) CUDA_CHECK(cudaMemcpy(y.data(), d_y_, y.size() * 2, cudaMemcpyDeviceToHost));
    return bf16_to_float(std::span<const bf16_bits>(y));
  }
  std::size_t dispatch_row_bytes() const override { return eng_->row_bytes(); }
  std::size_t combine_row_bytes() const override { return eng_->row_bytes(); }
  std::pair<double, double> raw_exchange_ms() override { return eng_->raw_exchange_ms(); }
  EpTimeline timeline_forward() override {
    eng_->set_timeline(true);
    eng_->forward_device(d_x_, T_, d_y_, /*time_stages=*/false);  // queued only, as in a model
    EpTimeline tl = eng_->last_timeline();                        // waits for the stream, then reads the events
    eng_->set_timeline(false);
    return tl;
  }
  EpMoeGpu& engine() { return *eng_; }

 private:
  std::unique_ptr<EpMoeGpu> eng_;
  int T_;
  __nv_bfloat16 *d_x_ = nullptr, *d_y_ = nullptr;
};

}  // namespace

std::unique_ptr<EpLayer> make_gpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout, int chunks) {
  auto l = std::make_unique<GpuEpLayer>(std::make_unique<EpMoeGpu>(comm, placement, mine, router, layout), T);
  l->engine().set_chunks(chunks);
  l->upload(x);
  return l;
}

std::unique_ptr<EpLayer> make_gpu_ep_layer_random(dist::Communicator& comm, const Placement& placement,
                                                  const RandomLayerSpec& spec, int T, const RouterCfg& router,
                                                  EpLayout layout, int chunks) {
  auto l = std::make_unique<GpuEpLayer>(std::make_unique<EpMoeGpu>(comm, placement, spec, router, layout), T);
  l->engine().set_chunks(chunks);
  random_tokens_device(spec, comm.rank(), T, l->d_x());
  return l;
}

}  // namespace eplab
