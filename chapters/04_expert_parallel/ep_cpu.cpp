// The CPU expert-parallel layer: MPI between ranks, fp32 experts on the host.
//
// The steps themselves are common/moe/ep_moe_cpu's EpMoeCpuBlock (the block chapter 05 runs in every
// layer of the model), in EpInput::Local mode: each rank brings its own tokens and gets their outputs back.
// Rows travel as bf16 on the way out (the tokens are bf16 already, so this is exact and moves the same
// bytes as the GPU path) and as fp32 on the way back (the expert outputs are fp32 here, and keeping them
// lets the result equal the single-device fp32 reference, which sums in the same order).
#include <memory>

#include "ep_layer.hpp"
#include "moe/ep_moe_cpu.hpp"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

namespace {

std::vector<std::size_t> to_sizes(const std::vector<int>& v) { return {v.begin(), v.end()}; }

// h is stored as bf16 before w2, as on the GPU.
MoeRefOptions ref_options(const RouterCfg& router) { return MoeRefOptions{router, /*round_h_to_bf16=*/true}; }

class CpuEpLayer final : public EpLayer {
 public:
  CpuEpLayer(dist::Communicator& comm, const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
             std::unique_ptr<EpMoeCpuBlock> block)
      : comm_(comm), H_(mine.hidden), T_(T), block_(std::move(block)) {
    require(x.size() == std::size_t(T) * H_, "CPU EP layer: x has ", x.size(), " values, expected T*H = ",
            std::size_t(T) * H_);
    xf_ = bf16_to_float(x);
  }

  EpTimes forward() override {
    const EpMoeTimes before = block_->times();
    MoeBlockOutput out = block_->forward(/*layer=*/0, xf_, T_);
    const EpMoeTimes& after = block_->times();
    routing_ = std::move(out.routing);
    y_ = std::move(out.y);
    EpTimes t;
    t.route_ms = after.route_ms - before.route_ms;
    t.dispatch_ms = after.dispatch_ms - before.dispatch_ms;
    t.experts_ms = after.experts_ms - before.experts_ms;
    t.combine_ms = after.combine_ms - before.combine_ms;  // (no all-gather in Local mode)
    return t;
  }

  const EpPlan& plan() const override { return block_->last_plan(); }
  Routing routing() override { return routing_; }
  std::vector<float> output() override { return y_; }
  std::size_t dispatch_row_bytes() const override { return H_ * sizeof(bf16_bits); }
  std::size_t combine_row_bytes() const override { return H_ * sizeof(float); }

  std::pair<double, double> raw_exchange_ms() override {
    const EpPlan& plan = block_->last_plan();
    const int H = H_;
    std::vector<bf16_bits> a(std::size_t(plan.send_rows()) * H), b(std::size_t(plan.recv_rows()) * H);
    std::vector<float> c(std::size_t(plan.recv_rows()) * H), d(std::size_t(plan.send_rows()) * H);
    comm_.barrier();
    WallTimer clk;
    comm_.alltoallv(a.data(), to_sizes(plan.send_counts), b.data(), to_sizes(plan.recv_counts), H * sizeof(bf16_bits));
    const double t1 = clk.ms();
    comm_.barrier();
    clk.reset();
    comm_.alltoallv(c.data(), to_sizes(plan.recv_counts), d.data(), to_sizes(plan.send_counts), H * sizeof(float));
    return {t1, clk.ms()};
  }

 private:
  dist::Communicator& comm_;
  int H_, T_;
  std::unique_ptr<EpMoeCpuBlock> block_;
  std::vector<float> xf_;
  // the last forward
  Routing routing_;
  std::vector<float> y_;
};

}  // namespace

std::unique_ptr<EpLayer> make_cpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout) {
  // The block holds a model's layers; here there is one (a copy of this rank's experts of the layer).
  auto layers = std::make_shared<const std::vector<MoeLayerWeights>>(1, mine);
  auto block = std::make_unique<EpMoeCpuBlock>(comm, placement, std::move(layers), ref_options(router),
                                               EpInput::Local, /*threads=*/0,
                                               EpExchangeOptions{layout, /*bf16_dispatch=*/true});
  return std::make_unique<CpuEpLayer>(comm, mine, x, T, std::move(block));
}

}  // namespace eplab
