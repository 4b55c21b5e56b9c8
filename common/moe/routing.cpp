#include "moe/routing.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "util/check.hpp"

namespace eplab {

void router_logits_cpu(std::span<const float> x, std::span<const float> gate, int T, int H, int E,
                       std::span<float> logits) {
  require(x.size() >= size_t(T) * H && gate.size() >= size_t(E) * H && logits.size() >= size_t(T) * E,
          "router_logits_cpu: buffers too small");
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      const float* xr = &x[size_t(t) * H];
      const float* gr = &gate[size_t(e) * H];
      double acc = 0.0;  // double: the reference should not depend on summation order
      for (int h = 0; h < H; ++h) acc += double(xr[h]) * gr[h];
      logits[size_t(t) * E + e] = float(acc);
    }
}

namespace {

// Index of the largest value; the first one on ties (like torch.max).
int argmax(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

// softmax over entries j of `vals` that are not masked, evaluated at index `at`.
// Masked: (top - s[j]) / max(|s[j]|, top) > 2 eps, where s are the original logits.
float masked_softmax_at(const float* vals, const float* s, int E, float top, float eps, int at) {
  double denom = 0.0;
  for (int j = 0; j < E; ++j) {
    if (std::isinf(vals[j]) && vals[j] < 0) continue;
    const float factor = std::max(std::fabs(s[j]), top);
    const bool masked = (top - s[j]) / factor > 2.f * eps;
    if (!masked) denom += std::exp(double(vals[j]) - double(top));
  }
  return float(std::exp(double(vals[at]) - double(top)) / denom);
}

}  // namespace

Routing route_softmax_topk(std::span<const float> logits, int T, int E, int k) {
  require(T >= 0, "tokens must be >= 0, got ", T);
  require(k >= 1 && k <= E, "top-k (", k, ") must be between 1 and the number of experts (", E, ")");
  Routing r{T, k, std::vector<int>(size_t(T) * k), std::vector<float>(size_t(T) * k)};
  std::vector<float> p(E);
  std::vector<int> order(E);
  for (int t = 0; t < T; ++t) {
    const float* s = &logits[size_t(t) * E];
    const float mx = *std::max_element(s, s + E);
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += std::exp(double(s[e]) - mx);
    for (int e = 0; e < E; ++e) p[e] = float(std::exp(double(s[e]) - mx) / sum);
    for (int e = 0; e < E; ++e) order[e] = e;
    // Largest first; lower id first on ties.
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
    double kept = 0.0;
    for (int j = 0; j < k; ++j) kept += p[order[j]];
    for (int j = 0; j < k; ++j) {
      r.ids[size_t(t) * k + j] = order[j];
      r.weights[size_t(t) * k + j] = float(p[order[j]] / kept);
    }
  }
  return r;
}

Routing route_sparsemixer(std::span<const float> logits, int T, int E, float eps) {
  require(T >= 0, "tokens must be >= 0, got ", T);
  require(E >= 2, "sparsemixer needs at least 2 experts, got ", E);
  Routing r{T, 2, std::vector<int>(size_t(T) * 2), std::vector<float>(size_t(T) * 2)};
  std::vector<float> masked(E);
  for (int t = 0; t < T; ++t) {
    const float* s = &logits[size_t(t) * E];
    const int e1 = argmax(s, E);
    const float top1 = s[e1];
    const float w1 = masked_softmax_at(s, s, E, top1, eps, e1);
    std::copy(s, s + E, masked.begin());
    masked[e1] = -std::numeric_limits<float>::infinity();
    const int e2 = argmax(masked.data(), E);
    const float top2 = masked[e2];
    const float w2 = masked_softmax_at(masked.data(), s, E, top2, eps, e2);
    r.ids[size_t(t) * 2] = e1;
    r.ids[size_t(t) * 2 + 1] = e2;
    r.weights[size_t(t) * 2] = w1;
    r.weights[size_t(t) * 2 + 1] = w2;
  }
  return r;
}

Routing route(RouterKind kind, std::span<const float> logits, int T, int E, int k, float jitter_eps) {
  if (kind == RouterKind::SparseMixer) {
    require(k == 2, "sparsemixer routing needs top-k = 2, got ", k);
    return route_sparsemixer(logits, T, E, jitter_eps);
  }
  return route_softmax_topk(logits, T, E, k);
}

float routing_margin(RouterKind kind, std::span<const float> logits, int t, int E, float eps) {
  const float* s = &logits[size_t(t) * E];
  std::vector<float> v(s, s + E);
  std::sort(v.begin(), v.end(), std::greater<float>());
  float scale = 1e-6f;
  for (float x : v) scale = std::max(scale, std::fabs(x));
  // The order of the top few logits decides the ids (top-k up to 8 needs the top 9).
  float margin = std::numeric_limits<float>::max();
  for (int i = 0; i + 1 < std::min(E, 9); ++i) margin = std::min(margin, (v[i] - v[i + 1]) / scale);
  if (kind == RouterKind::SparseMixer) {
    // The 2*eps threshold decides which logits enter each multiplier's softmax.
    for (int top : {0, 1})
      for (int j = 0; j < E; ++j) {
        const float factor = std::max(std::fabs(s[j]), v[top]);
        margin = std::min(margin, std::fabs((v[top] - s[j]) / factor - 2.f * eps));
      }
  }
  return margin;
}

}  // namespace eplab
