#include "moe/reference.hpp"

#include <algorithm>
#include <cmath>

#include "util/check.hpp"

namespace eplab {

namespace {
inline float silu(float v) { return v / (1.f + std::exp(-v)); }
}  // namespace

void expert_forward_cpu(const MoeLayerWeights& w, int le, const float* x, float* out, bool round_h) {
  const int H = w.hidden, I = w.inter;
  const bf16_bits* w1 = &w.w1[size_t(le) * I * H];
  const bf16_bits* w3 = &w.w3[size_t(le) * I * H];
  const bf16_bits* w2 = &w.w2[size_t(le) * H * I];
  std::vector<float> h(I);
  for (int i = 0; i < I; ++i) {
    float a = 0.f, b = 0.f;
    const bf16_bits* r1 = w1 + size_t(i) * H;
    const bf16_bits* r3 = w3 + size_t(i) * H;
    for (int c = 0; c < H; ++c) {
      a += bf16_to_float(r1[c]) * x[c];
      b += bf16_to_float(r3[c]) * x[c];
    }
    h[i] = silu(a) * b;
    if (round_h) h[i] = round_bf16(h[i]);
  }
  for (int o = 0; o < H; ++o) {
    const bf16_bits* r2 = w2 + size_t(o) * I;
    float acc = 0.f;
    for (int i = 0; i < I; ++i) acc += bf16_to_float(r2[i]) * h[i];
    out[o] = acc;
  }
}

std::vector<float> moe_experts_reference(const MoeLayerWeights& w, std::span<const float> x, const Routing& r,
                                         bool round_h) {
  const int H = w.hidden;
  require(x.size() == size_t(r.tokens) * H, "moe_experts_reference: x has ", x.size(), " values, expected ",
          size_t(r.tokens) * H);
  // global id -> index in w's expert list
  std::vector<int> local(w.num_experts, -1);
  for (int i = 0; i < w.num_held(); ++i) local[w.expert_ids[i]] = i;
  std::vector<float> y(size_t(r.tokens) * H, 0.f), tmp(H);
  for (int t = 0; t < r.tokens; ++t)
    for (int j = 0; j < r.k; ++j) {
      const int e = r.id(t, j);
      require(e >= 0 && e < w.num_experts && local[e] >= 0, "expert ", e, " is not loaded");
      expert_forward_cpu(w, local[e], &x[size_t(t) * H], tmp.data(), round_h);
      const float g = r.weight(t, j);
      for (int o = 0; o < H; ++o) y[size_t(t) * H + o] += g * tmp[o];
    }
  return y;
}

MoeRefResult moe_layer_reference(const MoeLayerWeights& w, std::span<const float> x, int T,
                                 const MoeRefOptions& opt) {
  require(T >= 0, "tokens must be >= 0, got ", T);
  require(w.num_held() == w.num_experts, "the reference needs every expert of the layer loaded");
  const int H = w.hidden, E = w.num_experts;
  MoeRefResult res;
  res.logits.resize(size_t(T) * E);
  const std::vector<float> gate = bf16_to_float(std::span<const bf16_bits>(w.gate));
  router_logits_cpu(x, gate, T, H, E, res.logits);
  res.routing = route(opt.router.kind, res.logits, T, E, opt.router.top_k, opt.router.jitter_eps);
  res.y = moe_experts_reference(w, x, res.routing, opt.round_h_to_bf16);
  return res;
}

double rel_l2(std::span<const float> a, std::span<const float> b) {
  require(a.size() == b.size(), "rel_l2: sizes differ (", a.size(), " vs ", b.size(), ")");
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    const double d = double(a[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  if (den == 0) return num == 0 ? 0.0 : INFINITY;
  return std::sqrt(num / den);
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  require(a.size() == b.size(), "max_abs_diff: sizes differ");
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    m = std::max(m, std::fabs(double(a[i]) - b[i]));
  }
  return m;
}

}  // namespace eplab
