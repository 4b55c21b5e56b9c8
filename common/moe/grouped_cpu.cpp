#include "moe/grouped_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <thread>

#include "util/check.hpp"

namespace eplab {

namespace {

// out[r, o] = sum_c a[r, c] * W[o, c] for a block of rows; W is bf16 [O, C] widened one row at a time.
// Row-of-W outer loop: each weight row is converted once and reused for every token row of the expert,
// which is the point of grouping tokens by expert.
void rows_times_wT(const float* a, int rows, int C, const bf16_bits* W, int O, float* out, int out_stride) {
  std::vector<float> wrow(C);
  for (int o = 0; o < O; ++o) {
    for (int c = 0; c < C; ++c) wrow[c] = bf16_to_float(W[size_t(o) * C + c]);
    for (int r = 0; r < rows; ++r) {
      const float* ar = a + size_t(r) * C;
      float acc = 0.f;
      for (int c = 0; c < C; ++c) acc += ar[c] * wrow[c];
      out[size_t(r) * out_stride + o] = acc;
    }
  }
}

void one_expert(const MoeLayerWeights& w, int le, const float* xp, int rows, float* yp, bool round_h) {
  const int H = w.hidden, I = w.inter;
  std::vector<float> g(size_t(rows) * I), u(size_t(rows) * I);
  rows_times_wT(xp, rows, H, &w.w1[size_t(le) * I * H], I, g.data(), I);
  rows_times_wT(xp, rows, H, &w.w3[size_t(le) * I * H], I, u.data(), I);
  for (size_t i = 0; i < g.size(); ++i) {  // SwiGLU: SiLU on the w1 branch only
    const float a = g[i];
    float h = a / (1.f + std::exp(-a)) * u[i];
    g[i] = round_h ? round_bf16(h) : h;
  }
  rows_times_wT(g.data(), rows, I, &w.w2[size_t(le) * H * I], H, yp, H);
}

}  // namespace

void grouped_experts_cpu(const MoeLayerWeights& w, std::span<const float> xp, std::span<const int> offsets,
                         std::span<float> yp, bool round_h, int threads) {
  const int n = w.num_held(), H = w.hidden;
  require(int(offsets.size()) == n + 1, "grouped_experts_cpu: offsets has ", offsets.size(), " entries, expected ",
          n + 1);
  require(xp.size() >= size_t(offsets[n]) * H && yp.size() >= size_t(offsets[n]) * H,
          "grouped_experts_cpu: row buffers too small");
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::min(threads, std::max(n, 1));
  auto work = [&](int tid) {
    for (int le = tid; le < n; le += threads) {
      const int r0 = offsets[le], rows = offsets[le + 1] - r0;
      if (rows > 0) one_expert(w, le, &xp[size_t(r0) * H], rows, &yp[size_t(r0) * H], round_h);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

std::vector<float> moe_grouped_cpu(const MoeLayerWeights& w, std::span<const float> x, const Routing& r,
                                   bool round_h, DispatchPlan* plan_out) {
  require(w.num_held() == w.num_experts, "moe_grouped_cpu needs every expert of the layer");
  const int H = w.hidden, T = r.tokens, k = r.k;
  require(x.size() == size_t(T) * H, "moe_grouped_cpu: x has the wrong size");
  DispatchPlan plan = make_dispatch_plan(r, w.num_experts);
  std::vector<float> xp(size_t(plan.rows()) * H), yp(size_t(plan.rows()) * H), y(size_t(T) * H, 0.f);
  for (int row = 0; row < plan.rows(); ++row)  // permute
    std::copy_n(&x[size_t(plan.assignment[row] / k) * H], H, &xp[size_t(row) * H]);
  grouped_experts_cpu(w, xp, plan.offsets, yp, round_h);
  for (int t = 0; t < T; ++t)  // weighted unpermute
    for (int j = 0; j < k; ++j) {
      const float g = r.weight(t, j);
      const float* src = &yp[size_t(plan.row_of[size_t(t) * k + j]) * H];
      for (int o = 0; o < H; ++o) y[size_t(t) * H + o] += g * src[o];
    }
  if (plan_out) *plan_out = std::move(plan);
  return y;
}

}  // namespace eplab
