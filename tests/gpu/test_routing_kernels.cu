// Router GEMM and routing kernels vs the CPU reference (common/moe/routing.cpp).
//
//  * router_logits: every logit within the fp32 dot-product error bound of the double reference.
//  * route_topk on the SAME logits as the host: ids identical (the kernel makes the same fp32
//    comparisons, ties -> lowest id), weights within 1e-5 absolute.
//  * router_logits + route_topk end to end against the all-CPU path: GPU and CPU logits differ by fp32
//    summation order, so a token may legitimately route differently only where routing_margin says
//    its decision is a near-tie; such tokens are counted and capped.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "router.cuh"
#include "routing.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

struct Cublas {
  cublasHandle_t h{};
  Cublas() { CUBLAS_CHECK(cublasCreate(&h)); }
  ~Cublas() { cublasDestroy(h); }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
};

const char* kind_name(RouterKind k) { return k == RouterKind::SparseMixer ? "sparsemixer" : "softmax"; }

// The four largest logits of token t as "id:value", to make a routing failure readable.
std::string describe_token(const std::vector<float>& logits, int t, int E) {
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  const float* s = &logits[size_t(t) * E];
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
  std::ostringstream os;
  os << "top logits";
  for (int i = 0; i < std::min(E, 4); ++i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " %d:%.9g", order[i], s[order[i]]);
    os << buf;
  }
  return os.str();
}

std::string ids_of(const std::vector<int>& ids, int t, int k) {
  std::ostringstream os;
  os << "[";
  for (int j = 0; j < k; ++j) os << (j ? ", " : "") << ids[size_t(t) * k + j];
  os << "]";
  return os.str();
}
std::string weights_of(const std::vector<float>& w, int t, int k) {
  std::ostringstream os;
  os << "[";
  for (int j = 0; j < k; ++j) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.8g", j ? ", " : "", w[size_t(t) * k + j]);
    os << buf;
  }
  os << "]";
  return os.str();
}

enum class Dist { Normal, Narrow, Negative, Ties, Dominant };
const char* dist_name(Dist d) {
  switch (d) {
    case Dist::Normal: return "normal";
    case Dist::Narrow: return "narrow";
    case Dist::Negative: return "negative";
    case Dist::Ties: return "ties";
    case Dist::Dominant: return "dominant";
  }
  return "?";
}

// Logit distributions that exercise different decisions:
//  normal   N(0,1)                           ordinary routing
//  narrow   1 + 0.02 N(0,1)                  sparsemixer's 2*eps mask keeps some logits and drops others
//  negative -3 + 0.1 N(0,1)                  all logits < 0: the mask factor max(|s_j|, top) is |s_j|
//  ties     round(2 N(0,1)) / 2              many exact ties: the lowest id must win, like the host
//  dominant N(0,1) + 8 for experts 0..2      most experts get no token at all
std::vector<float> make_logits(Rng& rng, Dist d, int T, int E) {
  std::vector<float> v(size_t(T) * E);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      float x = rng.normal();
      switch (d) {
        case Dist::Normal: break;
        case Dist::Narrow: x = 1.f + 0.02f * x; break;
        case Dist::Negative: x = -3.f + 0.1f * x; break;
        case Dist::Ties: x = std::round(2.f * x) / 2.f; break;
        case Dist::Dominant: x += e < 3 ? 8.f : 0.f; break;
      }
      v[size_t(t) * E + e] = x;
    }
  return v;
}

struct RouteCase {
  RouterKind kind;
  int k;
  float eps;
};

// Runs route_topk on `logits` (uploaded as they are) and returns ids/weights.
Routing gpu_route(const std::vector<float>& logits, int T, int E, const RouteCase& rc) {
  Stream s;
  DevBuf<float> d_logits(logits);
  DevBuf<int> d_ids(size_t(T) * rc.k);
  DevBuf<float> d_w(size_t(T) * rc.k);
  d_ids.poison();
  d_w.poison();
  device_sync();
  gpu::route_topk(d_logits.get(), T, E, rc.k, rc.kind, rc.eps, d_ids.get(), d_w.get(), s);
  s.sync();
  return Routing{T, rc.k, d_ids.download(), d_w.download()};
}

// Exact ids, weights within 1e-5. Returns a report of the first failures ("" when all match).
std::string compare_routing(const Routing& got, const Routing& want, const std::vector<float>& logits, int E,
                            int* bad_tokens) {
  std::ostringstream os;
  int bad = 0;
  for (int t = 0; t < want.tokens; ++t) {
    bool ok = true;
    for (int j = 0; j < want.k; ++j) {
      const size_t i = size_t(t) * want.k + j;
      if (got.ids[i] != want.ids[i]) ok = false;
      if (!(std::fabs(got.weights[i] - want.weights[i]) <= 1e-5f)) ok = false;  // NaN (poison) fails too
    }
    if (!ok) {
      if (bad < 4)
        os << "\n  token " << t << ": gpu ids " << ids_of(got.ids, t, want.k) << " w " << weights_of(got.weights, t, want.k)
           << " | cpu ids " << ids_of(want.ids, t, want.k) << " w " << weights_of(want.weights, t, want.k) << " | "
           << describe_token(logits, t, E);
      ++bad;
    }
  }
  *bad_tokens = bad;
  return os.str();
}

}  // namespace

TEST_CASE("router_logits: x · gate^T within the fp32 dot-product bound of the double reference") {
  Cublas cublas;
  Stream s;
  struct Case {
    int T, H, E;
  };
  const Case cases[] = {{0, 64, 16},  {1, 64, 16},    {7, 100, 16},  {64, 4096, 16}, {1000, 256, 8},
                        {4096, 512, 64}, {7, 3, 1}, {33, 1000, 256}};
  unsigned seed = 100;
  for (const Case& c : cases) {
    INFO("router_logits T=" << c.T << " H=" << c.H << " E=" << c.E);
    Rng rng(++seed);
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    const Bf16Data gate = random_bf16(rng, size_t(c.E) * c.H, 0.05f);
    std::vector<float> want(size_t(c.T) * c.E);
    router_logits_cpu(x.f, gate.f, c.T, c.H, c.E, want);

    DevBuf<bf16_bits> d_x(x.bits), d_gate(gate.bits);
    DevBuf<float> d_logits(want.size());
    d_logits.poison();
    device_sync();
    gpu::router_logits(cublas.h, as_bf16(d_x), as_bf16(d_gate), c.T, c.H, c.E, d_logits.get(), s);
    s.sync();
    const std::vector<float> got = d_logits.download();

    // Any fp32 summation order satisfies |fl(x·g) - x·g| <= gamma_H * sum |x_i g_i|, gamma_H = H u / (1 - H u),
    // u = 2^-24, for round-to-nearest adds. Tensor cores may truncate (round toward zero) when they
    // accumulate, which doubles the per-add error: use 2 gamma_H, plus the final rounding of the double
    // reference to float (u |x·g|). A wrong layout or transpose is off by O(|x·g|), far outside.
    const double u = std::ldexp(1.0, -24), gamma = 2 * c.H * u / (1 - c.H * u);
    int bad = 0;
    std::ostringstream first;
    for (int t = 0; t < c.T; ++t)
      for (int e = 0; e < c.E; ++e) {
        double absdot = 0;
        for (int h = 0; h < c.H; ++h) absdot += std::fabs(double(x.f[size_t(t) * c.H + h]) * gate.f[size_t(e) * c.H + h]);
        const size_t i = size_t(t) * c.E + e;
        const double bound = (gamma + u) * absdot + 1e-30;
        if (!(std::fabs(double(got[i]) - want[i]) <= bound)) {
          if (bad < 4) first << " logits[" << t << "," << e << "] gpu " << got[i] << " cpu " << want[i] << " bound " << bound << ";";
          ++bad;
        }
      }
    CHECK_MESSAGE(bad == 0, bad << " logits outside the bound:" << first.str());
    // Typical error is far below the worst-case bound: ~1e-6 relative (1e-4 leaves room for truncating
    // tensor-core accumulation over H = 4096).
    if (c.T > 0) CHECK(rel_l2(got, want) <= 1e-4);
  }
}

TEST_CASE("route_topk: same ids and weights (1e-5) as the CPU router on identical logits") {
  const RouteCase route_cases[] = {{RouterKind::SoftmaxTopK, 1, 0.f},
                                   {RouterKind::SoftmaxTopK, 2, 0.f},
                                   {RouterKind::SoftmaxTopK, 4, 0.f},
                                   {RouterKind::SparseMixer, 2, 0.01f},
                                   {RouterKind::SparseMixer, 2, 0.1f}};
  const Dist dists[] = {Dist::Normal, Dist::Narrow, Dist::Negative, Dist::Ties, Dist::Dominant};
  struct Shape {
    int T, E;
  };
  std::vector<Shape> shapes;
  for (int T : {0, 1, 7, 64, 1000, 4096})
    for (int E : {8, 16, 64}) shapes.push_back({T, E});
  for (int E : {4, 33, 200, 256}) shapes.push_back({1000, E});  // odd sizes and the 8-logits-per-lane maximum
  unsigned seed = 1000;
  int cases = 0;
  for (const Shape& sh : shapes)
    for (const RouteCase& rc : route_cases)
      for (Dist d : dists) {
        if (rc.k > sh.E) continue;
        ++cases;
        INFO("route_topk " << kind_name(rc.kind) << " k=" << rc.k << " eps=" << rc.eps << " T=" << sh.T << " E=" << sh.E
                           << " logits=" << dist_name(d));
        Rng rng(++seed);
        const std::vector<float> logits = make_logits(rng, d, sh.T, sh.E);
        const Routing want = route(rc.kind, logits, sh.T, sh.E, rc.k, rc.eps);
        const Routing got = gpu_route(logits, sh.T, sh.E, rc);
        int bad = 0;
        const std::string report = compare_routing(got, want, logits, sh.E, &bad);
        CHECK_MESSAGE(bad == 0, bad << " of " << sh.T << " tokens routed differently:" << report);
      }
  MESSAGE("route_topk: " << cases << " cases compared");
}

TEST_CASE("route_topk: a two-expert top-2 with tied logits picks [0, 1]") {
  // Hand-checked expectation, independent of the host code: equal logits, lowest id first, weights 1/2.
  const std::vector<float> logits = {0.5f, 0.5f};
  const Routing got = gpu_route(logits, 1, 2, {RouterKind::SoftmaxTopK, 2, 0.f});
  CHECK(got.ids == std::vector<int>{0, 1});
  CHECK(got.weights[0] == doctest::Approx(0.5).epsilon(1e-7));
  CHECK(got.weights[1] == doctest::Approx(0.5).epsilon(1e-7));
}

TEST_CASE("route_topk and router_logits reject bad arguments with an eplab::Error") {
  Stream s;
  CHECK_THROWS_AS(gpu::route_topk(nullptr, 1, 257, 2, RouterKind::SoftmaxTopK, 0.f, nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::route_topk(nullptr, 1, 16, 4, RouterKind::SparseMixer, 0.01f, nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::route_topk(nullptr, 1, 4, 5, RouterKind::SoftmaxTopK, 0.f, nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::route_topk(nullptr, -1, 16, 2, RouterKind::SoftmaxTopK, 0.f, nullptr, nullptr, s), Error);
  Cublas cublas;
  CHECK_THROWS_AS(gpu::router_logits(cublas.h, nullptr, nullptr, -1, 64, 16, nullptr, s), Error);
  // T = 0 is a no-op, even with null pointers.
  CHECK_NOTHROW(gpu::route_topk(nullptr, 0, 16, 2, RouterKind::SparseMixer, 0.01f, nullptr, nullptr, s));
  CHECK_NOTHROW(gpu::router_logits(cublas.h, nullptr, nullptr, 0, 64, 16, nullptr, s));
  s.sync();
}

TEST_CASE("router_logits + route_topk vs the all-CPU router: differences only at near-ties") {
  Cublas cublas;
  Stream s;
  // A decision whose relative margin is above kTieTol cannot flip under fp32 reordering of the logits
  // (their relative error is ~1e-6 here); below it, GPU and CPU may both be right.
  constexpr float kTieTol = 1e-4f;
  struct Case {
    int T, H, E;
    RouteCase rc;
  };
  const Case cases[] = {
      {1, 4096, 16, {RouterKind::SparseMixer, 2, 0.01f}},   {64, 4096, 16, {RouterKind::SparseMixer, 2, 0.01f}},
      {1000, 256, 16, {RouterKind::SparseMixer, 2, 0.01f}}, {4096, 256, 16, {RouterKind::SparseMixer, 2, 0.01f}},
      {1000, 256, 64, {RouterKind::SoftmaxTopK, 2, 0.f}},   {1000, 256, 16, {RouterKind::SoftmaxTopK, 4, 0.f}},
      {7, 512, 8, {RouterKind::SoftmaxTopK, 1, 0.f}},       {4096, 128, 64, {RouterKind::SparseMixer, 2, 0.01f}},
  };
  unsigned seed = 5000;
  for (const Case& c : cases) {
    INFO("end to end " << kind_name(c.rc.kind) << " k=" << c.rc.k << " T=" << c.T << " H=" << c.H << " E=" << c.E);
    Rng rng(++seed);
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    const Bf16Data gate = random_bf16(rng, size_t(c.E) * c.H, 1.f / std::sqrt(float(c.H)));
    std::vector<float> cpu_logits(size_t(c.T) * c.E);
    router_logits_cpu(x.f, gate.f, c.T, c.H, c.E, cpu_logits);
    const Routing want = route(c.rc.kind, cpu_logits, c.T, c.E, c.rc.k, c.rc.eps);

    DevBuf<bf16_bits> d_x(x.bits), d_gate(gate.bits);
    DevBuf<float> d_logits(cpu_logits.size()), d_w(size_t(c.T) * c.rc.k);
    DevBuf<int> d_ids(size_t(c.T) * c.rc.k);
    d_logits.poison();
    d_ids.poison();
    d_w.poison();
    device_sync();
    gpu::router_logits(cublas.h, as_bf16(d_x), as_bf16(d_gate), c.T, c.H, c.E, d_logits.get(), s);
    gpu::route_topk(d_logits.get(), c.T, c.E, c.rc.k, c.rc.kind, c.rc.eps, d_ids.get(), d_w.get(), s);
    s.sync();
    const std::vector<float> gpu_logits = d_logits.download();
    const std::vector<int> ids = d_ids.download();
    const std::vector<float> w = d_w.download();

    int ties = 0, hard = 0;
    std::ostringstream report;
    for (int t = 0; t < c.T; ++t) {
      float dmax = 0.f;  // this token's largest logit difference
      for (int e = 0; e < c.E; ++e)
        dmax = std::max(dmax, std::fabs(gpu_logits[size_t(t) * c.E + e] - cpu_logits[size_t(t) * c.E + e]));
      bool same_ids = true, close_w = true;
      for (int j = 0; j < c.rc.k; ++j) {
        const size_t i = size_t(t) * c.rc.k + j;
        same_ids &= ids[i] == want.ids[i];
        // Softmax-type weights move by at most ~0.5 * max|d logit| (their Jacobian's row sums are <= 1/2).
        close_w &= std::fabs(w[i] - want.weights[i]) <= 1e-5f + 2.f * dmax;
      }
      if (same_ids && close_w) continue;
      const float margin = routing_margin(c.rc.kind, cpu_logits, t, c.E, c.rc.eps);
      if (margin < kTieTol) {
        ++ties;
        continue;
      }
      if (hard < 4)
        report << "\n  token " << t << " (margin " << margin << ", max |d logit| " << dmax << "): gpu ids "
               << ids_of(ids, t, c.rc.k) << " w " << weights_of(w, t, c.rc.k) << " | cpu ids "
               << ids_of(want.ids, t, c.rc.k) << " w " << weights_of(want.weights, t, c.rc.k) << " | "
               << describe_token(cpu_logits, t, c.E);
      ++hard;
    }
    CHECK_MESSAGE(hard == 0, hard << " tokens differ although their decision is not a near-tie:" << report.str());
    const int cap = std::max(2, c.T / 100);
    CHECK_MESSAGE(ties <= cap, ties << " near-tie differences, more than the cap " << cap);
    if (ties) MESSAGE(ties << " near-tie tokens routed differently (allowed, cap " << cap << ")");
  }
}
