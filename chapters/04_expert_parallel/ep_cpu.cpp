// The CPU expert-parallel layer: MPI between ranks, fp32 experts on the host.
//
// Rows travel as bf16 on the way out (the tokens are bf16 already, so this is exact and moves the same
// bytes as the GPU path) and as fp32 on the way back (the expert outputs are fp32 here, and keeping them
// lets the result equal the single-device fp32 reference, which sums in the same order).
#include <algorithm>
#include <thread>

#include "ep_layer.hpp"
#include "moe/grouped_cpu.hpp"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

const char* layout_name(EpLayout l) { return l == EpLayout::Permute ? "permute" : "direct"; }
EpLayout parse_layout(const std::string& s) {
  if (s == "permute") return EpLayout::Permute;
  if (s == "direct") return EpLayout::Direct;
  fail("unknown --layout '", s, "' (use permute or direct)");
}

namespace {

std::vector<std::size_t> to_sizes(const std::vector<int>& v) { return {v.begin(), v.end()}; }

std::vector<dist::Transfer> to_transfers(const std::vector<EpPlan::Segment>& segs) {
  std::vector<dist::Transfer> t;
  t.reserve(segs.size());
  for (const auto& s : segs) t.push_back({s.peer, std::size_t(s.offset), std::size_t(s.rows)});
  return t;
}

class CpuEpLayer final : public EpLayer {
 public:
  CpuEpLayer(dist::Communicator& comm, const Placement& placement, const MoeLayerWeights& mine,
             std::span<const bf16_bits> x, int T, const RouterCfg& router, EpLayout layout)
      : comm_(comm), placement_(placement), w_(mine), x_(x.begin(), x.end()), T_(T), H_(mine.hidden),
        router_(router), layout_(layout) {
    require(comm.memory() == dist::Memory::Host, "the CPU layer needs a host-memory (MPI) communicator");
    require(x.size() == std::size_t(T) * H_, "CPU EP layer: x has ", x.size(), " values, expected T*H = ",
            std::size_t(T) * H_);
    xf_ = bf16_to_float(std::span<const bf16_bits>(x_));
    gate_ = bf16_to_float(std::span<const bf16_bits>(w_.gate));
    // One MPI rank stands for one GPU: split this node's cores between its ranks.
    threads_ = std::max(1, int(std::thread::hardware_concurrency()) / std::max(1, comm.local_size()));
  }

  EpTimes forward() override {
    EpTimes t;
    WallTimer clk;
    const int H = H_, E = w_.num_experts, k = router_.top_k;
    auto lap = [&](double& ms) {
      ms = clk.ms();
      clk.reset();
    };

    // --- route: the gate is replicated, so every rank routes its own tokens without talking.
    std::vector<float> logits(std::size_t(T_) * E);
    router_logits_cpu(xf_, gate_, T_, H, E, logits);
    routing_ = route(router_.kind, logits, T_, E, k, router_.jitter_eps);
    lap(t.route_ms);

    // --- dispatch: plan by (destination, local expert), exchange the counts, then the rows.
    plan_ = make_ep_send_plan(routing_, placement_, comm_.rank());
    finish_ep_plan(plan_, placement_, comm_.allgather_int(plan_.slot_counts));
    const int S = plan_.send_rows(), R = plan_.recv_rows();
    send_.resize(std::size_t(S) * H);
    for (int i = 0; i < S; ++i)
      std::copy_n(&x_[std::size_t(plan_.send_token(i)) * H], H, &send_[std::size_t(i) * H]);
    recv_.resize(std::size_t(R) * H);
    xg_.resize(std::size_t(R) * H);
    if (layout_ == EpLayout::Permute) {
      comm_.alltoallv(send_.data(), to_sizes(plan_.send_counts), recv_.data(), to_sizes(plan_.recv_counts),
                      H * sizeof(bf16_bits));
      // local permute: received rows (by source, then local expert) -> grouped by local expert
      for (int g = 0; g < R; ++g) {
        const bf16_bits* src = &recv_[std::size_t(plan_.grouped_to_recv[g]) * H];
        for (int c = 0; c < H; ++c) xg_[std::size_t(g) * H + c] = bf16_to_float(src[c]);
      }
    } else {
      // segments land in expert order already (recv_ is then the grouped buffer)
      comm_.exchange(send_.data(), to_transfers(plan_.send_segments), recv_.data(), to_transfers(plan_.recv_segments),
                     H * sizeof(bf16_bits));
      for (std::size_t i = 0; i < recv_.size(); ++i) xg_[i] = bf16_to_float(recv_[i]);
    }
    lap(t.dispatch_ms);

    // --- experts: only the local ones; local expert e owns grouped rows [local_offsets[e], [e+1]).
    yg_.assign(std::size_t(R) * H, 0.f);
    grouped_experts_cpu(w_, xg_, plan_.local_offsets, yg_, /*round_h=*/true, threads_);
    lap(t.experts_ms);

    // --- combine: the rows go home the way they came, then the weighted sum on the token's rank.
    yret_.resize(std::size_t(S) * H);
    if (layout_ == EpLayout::Permute) {
      yrecv_.resize(std::size_t(R) * H);
      for (int i = 0; i < R; ++i)
        std::copy_n(&yg_[std::size_t(plan_.recv_to_grouped[i]) * H], H, &yrecv_[std::size_t(i) * H]);
      comm_.alltoallv(yrecv_.data(), to_sizes(plan_.recv_counts), yret_.data(), to_sizes(plan_.send_counts),
                      H * sizeof(float));
    } else {
      comm_.exchange(yg_.data(), to_transfers(plan_.recv_segments), yret_.data(), to_transfers(plan_.send_segments),
                     H * sizeof(float));
    }
    y_.assign(std::size_t(T_) * H, 0.f);
    for (int tok = 0; tok < T_; ++tok)
      for (int j = 0; j < k; ++j) {  // j in order, from zero: the reference's summation order
        const float g = routing_.weight(tok, j);
        const float* row = &yret_[std::size_t(plan_.returned_row(tok, j)) * H];
        float* out = &y_[std::size_t(tok) * H];
        for (int c = 0; c < H; ++c) out[c] += g * row[c];
      }
    lap(t.combine_ms);
    return t;
  }

  const EpPlan& plan() const override { return plan_; }
  Routing routing() override { return routing_; }
  std::vector<float> output() override { return y_; }
  std::size_t dispatch_row_bytes() const override { return H_ * sizeof(bf16_bits); }
  std::size_t combine_row_bytes() const override { return H_ * sizeof(float); }

  std::pair<double, double> raw_exchange_ms() override {
    const int H = H_;
    std::vector<bf16_bits> a(std::size_t(plan_.send_rows()) * H), b(std::size_t(plan_.recv_rows()) * H);
    std::vector<float> c(std::size_t(plan_.recv_rows()) * H), d(std::size_t(plan_.send_rows()) * H);
    comm_.barrier();
    WallTimer clk;
    comm_.alltoallv(a.data(), to_sizes(plan_.send_counts), b.data(), to_sizes(plan_.recv_counts), H * sizeof(bf16_bits));
    const double t1 = clk.ms();
    comm_.barrier();
    clk.reset();
    comm_.alltoallv(c.data(), to_sizes(plan_.recv_counts), d.data(), to_sizes(plan_.send_counts), H * sizeof(float));
    return {t1, clk.ms()};
  }

 private:
  dist::Communicator& comm_;
  const Placement& placement_;
  const MoeLayerWeights& w_;
  std::vector<bf16_bits> x_;
  std::vector<float> xf_, gate_;
  int T_, H_, threads_ = 1;
  RouterCfg router_;
  EpLayout layout_;
  // the last forward
  Routing routing_;
  EpPlan plan_;
  std::vector<bf16_bits> send_, recv_;
  std::vector<float> xg_, yg_, yrecv_, yret_, y_;
};

}  // namespace

std::unique_ptr<EpLayer> make_cpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout) {
  return std::make_unique<CpuEpLayer>(comm, placement, mine, x, T, router, layout);
}

}  // namespace eplab
