// router_route_tiled (token-tiled tensor-core router + routing, kernels/router_tiled.cuh) vs the CPU.
//
//  * logits: within the fp32 dot-product error bound of router_logits_cpu (same bound as router_logits'
//    test: 2 gamma_H + u, tensor-core accumulation may truncate), on sizes with T = 0, 1, odd T, T not a
//    multiple of the 32-token tile, H not a multiple of the 32-wide step, E not a multiple of 8, and
//    forced split counts (1, 3, the maximum) next to the automatic one.
//  * ids/weights: EXACTLY the CPU router's ids on the GPU's own logits (the "identical logits -> identical
//    decisions" contract shared with route_topk), weights within 1e-5; and against the all-CPU routing,
//    differences only at near-ties (routing_margin < 1e-4).
//  * the same bits on a second launch (fixed summation order; the split counters are reset by the kernel).
#include <doctest/doctest.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "router_tiled.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

struct TiledCase {
  int T, H, E;
  RouterKind kind;
  int k;
  int splits;  // 0: auto
};

struct TiledOut {
  std::vector<float> logits, w;
  std::vector<int> ids;
};

TiledOut run_tiled(const DevBuf<bf16_bits>& x, const DevBuf<bf16_bits>& gate, const TiledCase& c,
                   gpu::TiledRouterWorkspace& ws) {
  Stream s;
  DevBuf<float> d_logits(size_t(c.T) * c.E), d_w(size_t(c.T) * c.k);
  DevBuf<int> d_ids(size_t(c.T) * c.k);
  d_logits.poison();
  d_w.poison();
  d_ids.poison();
  device_sync();
  gpu::router_route_tiled(as_bf16(x), as_bf16(gate), c.T, c.H, c.E, c.k, c.kind, 0.01f, d_logits.get(), d_ids.get(),
                          d_w.get(), ws, s, c.splits);
  s.sync();
  return {d_logits.download(), d_w.download(), d_ids.download()};
}

}  // namespace

TEST_CASE("router_route_tiled: logits within the fp32 bound, ids identical to the CPU router on the same logits") {
  const int kMaxSplit = 4096 / 32 / 4;
  const TiledCase cases[] = {
      {0, 64, 16, RouterKind::SparseMixer, 2, 0},      {1, 4096, 16, RouterKind::SparseMixer, 2, 0},
      {1, 4096, 16, RouterKind::SparseMixer, 2, 1},    {1, 4096, 16, RouterKind::SparseMixer, 2, kMaxSplit},
      {7, 104, 16, RouterKind::SparseMixer, 2, 0},     {31, 512, 8, RouterKind::SoftmaxTopK, 2, 0},
      {33, 4096, 16, RouterKind::SparseMixer, 2, 3},   {64, 4096, 16, RouterKind::SparseMixer, 2, 0},
      {97, 264, 5, RouterKind::SoftmaxTopK, 3, 0},     {1000, 256, 16, RouterKind::SparseMixer, 2, 0},
      {1000, 256, 16, RouterKind::SparseMixer, 2, 1},  {513, 4096, 16, RouterKind::SparseMixer, 2, 0},
      {4096, 4096, 16, RouterKind::SparseMixer, 2, 0}, {300, 512, 40, RouterKind::SoftmaxTopK, 4, 0},
      {130, 256, 64, RouterKind::SoftmaxTopK, 2, 2},   {50, 128, 24, RouterKind::SparseMixer, 2, 0},
  };
  unsigned seed = 7100;
  gpu::TiledRouterWorkspace ws;  // shared across cases: growth and counter reuse are exercised too
  for (const TiledCase& c : cases) {
    INFO("router_route_tiled T=" << c.T << " H=" << c.H << " E=" << c.E << " k=" << c.k << " splits="
                                 << (c.splits ? std::to_string(c.splits) : "auto (" + std::to_string(
                                     gpu::router_tiled_auto_splits(c.T, c.H)) + ")")
                                 << (c.kind == RouterKind::SparseMixer ? " sparsemixer" : " softmax-top-k"));
    Rng rng(++seed);
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    const Bf16Data gate = random_bf16(rng, size_t(c.E) * c.H, 1.f / std::sqrt(float(c.H)));
    std::vector<float> cpu_logits(size_t(c.T) * c.E);
    router_logits_cpu(x.f, gate.f, c.T, c.H, c.E, cpu_logits);
    DevBuf<bf16_bits> d_x(x.bits), d_gate(gate.bits);
    REQUIRE(gpu::router_route_tiled_ok(as_bf16(d_x), as_bf16(d_gate), c.H, c.E));
    const TiledOut got = run_tiled(d_x, d_gate, c, ws);
    if (c.T == 0) continue;

    // Logits: fp32 dot-product error bound (see test_routing_kernels.cu).
    const double u = std::ldexp(1.0, -24), gamma = 2 * c.H * u / (1 - c.H * u);
    int bad = 0;
    std::ostringstream first;
    for (int t = 0; t < c.T; ++t)
      for (int e = 0; e < c.E; ++e) {
        double absdot = 0;
        for (int h = 0; h < c.H; ++h)
          absdot += std::fabs(double(x.f[size_t(t) * c.H + h]) * gate.f[size_t(e) * c.H + h]);
        const size_t i = size_t(t) * c.E + e;
        const double bound = (gamma + u) * absdot + 1e-30;
        if (!(std::fabs(double(got.logits[i]) - cpu_logits[i]) <= bound)) {
          if (bad < 4) first << " logits[" << t << "," << e << "] gpu " << got.logits[i] << " cpu " << cpu_logits[i] << ";";
          ++bad;
        }
      }
    CHECK_MESSAGE(bad == 0, bad << " logits outside the bound:" << first.str());

    // Routing on the GPU's own logits: exactly the CPU router's decisions.
    const Routing own = route(c.kind, got.logits, c.T, c.E, c.k, 0.01f);
    size_t id_bad = 0;
    const std::string id_report = int_mismatches("ids", got.ids, own.ids, &id_bad);
    CHECK_MESSAGE(id_bad == 0, id_report);
    int w_bad = 0;
    for (size_t i = 0; i < own.weights.size(); ++i)
      if (!(std::fabs(got.w[i] - own.weights[i]) <= 1e-5f) && w_bad++ < 3)
        FAIL_CHECK("weight ", i, " (token ", i / c.k, "): gpu ", got.w[i], " cpu on the same logits ", own.weights[i]);

    // Against the all-CPU routing: only near-ties may differ.
    const Routing cpu = route(c.kind, cpu_logits, c.T, c.E, c.k, 0.01f);
    int ties = 0, hard = 0;
    for (int t = 0; t < c.T; ++t) {
      bool same = true;
      for (int j = 0; j < c.k; ++j) same &= got.ids[size_t(t) * c.k + j] == cpu.id(t, j);
      if (same) continue;
      if (routing_margin(c.kind, cpu_logits, t, c.E, 0.01f) < 1e-4f) ++ties;
      else ++hard;
    }
    CHECK_MESSAGE(hard == 0, hard << " tokens route differently from the all-CPU path although not near-ties");
    CHECK_MESSAGE(ties <= std::max(2, c.T / 100), ties << " near-tie differences (implausibly many)");

    // Deterministic: a second launch gives the same bits.
    const TiledOut again = run_tiled(d_x, d_gate, c, ws);
    CHECK_MESSAGE(again.logits == got.logits, "logits differ between two launches");
    CHECK(again.ids == got.ids);
    CHECK(again.w == got.w);
  }
}

TEST_CASE("router_route_tiled rejects bad arguments; T = 0 is a no-op") {
  Stream s;
  gpu::TiledRouterWorkspace ws;
  CHECK_THROWS_AS(gpu::router_route_tiled(nullptr, nullptr, -1, 64, 16, 2, RouterKind::SparseMixer, 0.01f, nullptr,
                                          nullptr, nullptr, ws, s),
                  Error);
  CHECK_THROWS_AS(gpu::router_route_tiled(nullptr, nullptr, 1, 64, 65, 2, RouterKind::SoftmaxTopK, 0.f, nullptr,
                                          nullptr, nullptr, ws, s),
                  Error);  // E > 64
  CHECK_THROWS_AS(gpu::router_route_tiled(nullptr, nullptr, 1, 64, 16, 3, RouterKind::SparseMixer, 0.01f, nullptr,
                                          nullptr, nullptr, ws, s),
                  Error);  // sparsemixer is top-2
  DevBuf<bf16_bits> x(size_t(2) * 100), g(size_t(16) * 100);
  DevBuf<float> l(32), w(4);
  DevBuf<int> ids(4);
  CHECK_FALSE(gpu::router_route_tiled_ok(as_bf16(x), as_bf16(g), 100, 16));  // H % 8 != 0
  CHECK_THROWS_AS(gpu::router_route_tiled(as_bf16(x), as_bf16(g), 2, 100, 16, 2, RouterKind::SparseMixer, 0.01f,
                                          l.get(), ids.get(), w.get(), ws, s),
                  Error);
  CHECK_NOTHROW(gpu::router_route_tiled(nullptr, nullptr, 0, 64, 16, 2, RouterKind::SparseMixer, 0.01f, nullptr,
                                        nullptr, nullptr, ws, s));
  s.sync();
}
