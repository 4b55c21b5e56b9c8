#include "tp_layer.hpp"

#include <algorithm>

#include "moe/ep_moe_cpu.hpp"  // rows_of: the same row blocks as the EP path
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

MoeLayerWeights tp_slice(const MoeLayerWeights& full, int rank, int ranks) {
  const int I = full.inter, H = full.hidden;
  require(ranks >= 1 && I % ranks == 0, "tensor parallelism splits each expert's ", I,
          " intermediate rows evenly: ", ranks, " ranks do not divide ", I);
  require(full.num_held() == full.num_experts, "tp_slice: every expert of the layer must be loaded");
  const int n = I / ranks, i0 = rank * n;
  MoeLayerWeights s;
  s.layer = full.layer;
  s.hidden = H;
  s.inter = n;
  s.num_experts = full.num_experts;
  s.expert_ids = full.expert_ids;
  s.gate = full.gate;  // the router is replicated
  const std::size_t per = std::size_t(I) * H;
  for (int e = 0; e < full.num_experts; ++e) {
    const bf16_bits* w1 = &full.w1[e * per];
    const bf16_bits* w3 = &full.w3[e * per];
    const bf16_bits* w2 = &full.w2[e * per];
    s.w1.insert(s.w1.end(), w1 + std::size_t(i0) * H, w1 + std::size_t(i0 + n) * H);  // rows of [I, H]
    s.w3.insert(s.w3.end(), w3 + std::size_t(i0) * H, w3 + std::size_t(i0 + n) * H);
    for (int o = 0; o < H; ++o)  // w2 is [H, I]: columns i0 .. i0 + n of every row
      s.w2.insert(s.w2.end(), w2 + std::size_t(o) * I + i0, w2 + std::size_t(o) * I + i0 + n);
  }
  return s;
}

void allreduce_rows(dist::Communicator& comm, std::vector<float>& v, int rows, int cols) {
  const int N = comm.size(), me = comm.rank();
  require(v.size() == std::size_t(rows) * cols, "allreduce_rows: ", v.size(), " values, expected ", rows, " x ", cols);
  if (N == 1 || rows == 0) return;
  const RowRange mine = rows_of(me, N, rows);
  // reduce-scatter: my block of every other rank's partial arrives, one message per peer
  std::vector<float> in(std::size_t(N) * mine.count * cols);
  std::vector<dist::Transfer> sends, recvs;
  for (int p = 0; p < N; ++p) {
    if (p == me) continue;
    const RowRange b = rows_of(p, N, rows);
    if (b.count) sends.push_back({p, std::size_t(b.first), std::size_t(b.count)});
    if (mine.count) recvs.push_back({p, std::size_t(p) * mine.count, std::size_t(mine.count)});
  }
  comm.exchange(v.data(), sends, in.data(), recvs, cols * sizeof(float));
  // the sum in rank order (the same on every rank, whoever owns the block)
  const std::size_t n = std::size_t(mine.count) * cols;
  std::vector<float> sum(n, 0.f);
  for (int p = 0; p < N; ++p) {
    const float* src = p == me ? &v[std::size_t(mine.first) * cols] : &in[std::size_t(p) * n];
    for (std::size_t i = 0; i < n; ++i) sum[i] += src[i];
  }
  std::copy(sum.begin(), sum.end(), v.begin() + std::ptrdiff_t(std::size_t(mine.first) * cols));
  // all-gather: every block to every rank
  sends.clear();
  recvs.clear();
  for (int p = 0; p < N; ++p) {
    if (p == me) continue;
    const RowRange b = rows_of(p, N, rows);
    if (mine.count) sends.push_back({p, std::size_t(mine.first), std::size_t(mine.count)});
    if (b.count) recvs.push_back({p, std::size_t(b.first), std::size_t(b.count)});
  }
  comm.exchange(v.data(), sends, v.data(), recvs, cols * sizeof(float));
}

MoeRefResult tp_forward(dist::Communicator& comm, const MoeLayerWeights& slice, std::span<const float> x, int T,
                        const MoeRefOptions& opt, TpTimes& times) {
  WallTimer clk;
  MoeRefResult r = moe_layer_reference(slice, x, T, opt);  // route (replicated) + this slice's partial output
  times.experts_ms += clk.ms();
  clk.reset();
  allreduce_rows(comm, r.y, T, slice.hidden);
  times.allreduce_ms += clk.ms();
  return r;
}

}  // namespace eplab
