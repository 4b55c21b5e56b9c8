// The EP MoE step of the GPU model (ep_moe_step.hpp): row shares, EpMoeGpu, all-gather of y.
#include "ep_moe_step.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "cuda_check.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "moe/ep_moe_cpu.hpp"  // rows_of: the same row blocks as the CPU path
#include "util/check.hpp"

namespace eplab {
namespace {

class EpMoeStep final : public GpuMoeStep {
 public:
  EpMoeStep(dist::Communicator& comm, const Placement& placement, const Checkpoint& ckpt, EpLayout layout,
            const LoadProgress& progress)
      : comm_(comm), placement_(placement) {
    const ModelConfig& c = ckpt.config();
    require(comm.memory() == dist::Memory::Device, "EP on GPUs needs the NCCL communicator");
    const RouterCfg router{c.router, c.num_experts_per_tok, c.router_jitter_noise};
    const std::vector<int>& mine = placement.experts_of(comm.rank());
    hidden_ = c.hidden_size;
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      if (progress) progress("experts", l, c.num_hidden_layers);
      const MoeLayerWeights w = load_moe_layer(ckpt, l, mine);
      layers_.push_back(std::make_unique<EpMoeGpu>(comm, placement, w, router, layout));
      // One rank: the model captures whole decode steps; the layer capturing its own graph inside would fail.
      layers_.back()->set_use_graphs(false);
      bytes_ += layers_.back()->weight_bytes();
    }
    last_rows_.assign(layers_.size(), 0);
  }

  void forward(int layer, const void* d_h, int R, void* d_y, CUstream_st* s) override {
    require(s == comm_.stream(), "EP MoE step: the model must run on the communicator's stream");
    const int N = comm_.size(), r = comm_.rank();
    auto share = [&](int rank, int& first, int& rows) {  // the CPU path's blocks (ep_moe_cpu.hpp)
      const RowRange rr = rows_of(rank, N, R);
      first = rr.first;
      rows = rr.count;
    };
    int r0 = 0, n = 0;
    share(r, r0, n);
    const std::size_t row = std::size_t(hidden_) * sizeof(__nv_bfloat16);
    const auto* h = static_cast<const char*>(d_h);
    auto* y = static_cast<char*>(d_y);
    layers_.at(std::size_t(layer))
        ->forward_device(reinterpret_cast<const __nv_bfloat16*>(h + r0 * row), n,
                         reinterpret_cast<__nv_bfloat16*>(y + r0 * row));
    last_rows_[std::size_t(layer)] = R;
    // all-gather of the shares: my rows to every peer, every peer's rows from it (empty shares skipped on
    // both sides alike, since every rank computes the same shares)
    std::vector<dist::Transfer> sends, recvs;
    for (int p = 0; p < N; ++p) {
      if (p == r) continue;
      int p0 = 0, pn = 0;
      share(p, p0, pn);
      if (n > 0) sends.push_back({p, std::size_t(r0), std::size_t(n)});
      if (pn > 0) recvs.push_back({p, std::size_t(p0), std::size_t(pn)});
    }
    if (!sends.empty() || !recvs.empty()) comm_.exchange(d_y, sends, d_y, recvs, row);
  }

  // One rank runs the single-GPU layer (no host wait on decode batches); more wait for the count exchange.
  bool graph_safe() const override { return comm_.size() == 1; }
  std::uint64_t buffers_epoch() const override {
    std::uint64_t e = 0;
    for (const auto& l : layers_) e = e * 0x9E3779B97F4A7C15ull + l->buffers_generation();
    return e;
  }
  void synchronize(CUstream_st*) override { comm_.sync(); }
  std::size_t weight_bytes() const override { return bytes_; }
  std::string describe() const override {
    const std::vector<int>& mine = placement_.experts_of(comm_.rank());
    std::string ids;
    for (std::size_t i = 0; i < mine.size(); ++i) ids += (i ? "," : "") + std::to_string(mine[i]);
    return "EP " + std::to_string(comm_.size()) + ": experts " + ids + " on this GPU";
  }

  // Every row's routing: this rank's share from its EpMoeGpu, the others' over a host allgather (ids and
  // the multipliers' bits, padded to the largest share).
  Routing last_routing(int layer, int rows) override {
    // One rank: the layer may have been replayed in the model's graph (the host saw no forward): rows says.
    if (comm_.size() == 1) return layers_.at(std::size_t(layer))->routing(rows);
    const int R = last_rows_.at(std::size_t(layer)), N = comm_.size();
    require(rows == R, "EP MoE step: last_routing asked for ", rows, " rows, the last forward had ", R);
    const int S = (R + N - 1) / N;
    const Routing mine = layers_[std::size_t(layer)]->routing();
    const int k = std::max(mine.k, 1);
    std::vector<std::int64_t> buf(std::size_t(S) * k * 2, -1);
    for (std::size_t i = 0; i < mine.ids.size(); ++i) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &mine.weights[i], 4);
      buf[2 * i] = mine.ids[i];
      buf[2 * i + 1] = bits;
    }
    const std::vector<std::int64_t> all = comm_.allgather(buf);
    Routing out;
    out.tokens = R;
    out.k = k;
    for (int p = 0; p < N; ++p) {
      const int rows = rows_of(p, N, R).count;
      for (int i = 0; i < rows * k; ++i) {
        const std::int64_t* e = &all[(std::size_t(p) * S * k + i) * 2];
        const std::uint32_t bits = std::uint32_t(e[1]);
        float w = 0;
        std::memcpy(&w, &bits, 4);
        out.ids.push_back(int(e[0]));
        out.weights.push_back(w);
      }
    }
    return out;
  }

 private:
  dist::Communicator& comm_;
  const Placement& placement_;
  int hidden_ = 0;
  std::vector<std::unique_ptr<EpMoeGpu>> layers_;
  std::vector<int> last_rows_;
  std::size_t bytes_ = 0;
};

}  // namespace

std::unique_ptr<GpuMoeStep> make_ep_moe_step(dist::Communicator& comm, const Placement& placement,
                                             const Checkpoint& ckpt, EpLayout layout, const LoadProgress& progress) {
  std::unique_ptr<GpuMoeStep> step = std::make_unique<EpMoeStep>(comm, placement, ckpt, layout, progress);
  if (progress) progress("experts", ckpt.config().num_hidden_layers, ckpt.config().num_hidden_layers);
  return step;
}

}  // namespace eplab
