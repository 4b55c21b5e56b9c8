// experts_decode (kernels/experts_decode.cuh) vs moe_experts_reference, and GpuMoeLayer with every router
// implementation (cublas, fused, tiled) vs moe_layer_reference, on the decode path's kernels and on
// experts_direct, the fallback for shapes experts_decode cannot run.
//
// Tolerances as in test_moe_layer.cu: y rel-L2 <= 1e-2 against the reference with h rounded to bf16 (what
// remains is y's own bf16 rounding and fp32 summation order); worst single token <= 2e-2; routing ids
// identical and multipliers within 1e-4 except near-ties (routing_margin < 1e-4).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <vector>

#include "experts_decode.cuh"
#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "moe_gpu.hpp"

using namespace eplab;
using namespace eplab::test;

namespace {

constexpr double kYTol = 1e-2;

struct DeviceExperts {
  DevBuf<bf16_bits> w13, w2;
  gpu::ExpertWeightsDevice view{};
  explicit DeviceExperts(const MoeLayerWeights& w) {
    const size_t per = size_t(w.inter) * w.hidden;
    std::vector<bf16_bits> h13(size_t(w.num_experts) * 2 * per);
    for (int e = 0; e < w.num_experts; ++e) {
      std::copy_n(w.w1.begin() + e * per, per, h13.begin() + (2 * e) * per);
      std::copy_n(w.w3.begin() + e * per, per, h13.begin() + (2 * e + 1) * per);
    }
    w13 = DevBuf<bf16_bits>(h13);
    w2 = DevBuf<bf16_bits>(w.w2);
    view = {as_bf16(w13), as_bf16(w2), w.num_experts, w.hidden, w.inter};
  }
};

// Routing with k distinct experts per token drawn from `pool` (so experts outside it get no token), random
// positive multipliers that do not sum to 1 (as sparsemixer's).
Routing random_routing(Rng& rng, int T, int k, const std::vector<int>& pool) {
  Routing r{T, k, std::vector<int>(size_t(T) * k), std::vector<float>(size_t(T) * k)};
  for (int t = 0; t < T; ++t) {
    std::vector<int> p = pool;
    for (int j = 0; j < k; ++j) {
      const size_t pick = j + size_t(rng.next_u64() % (p.size() - j));
      std::swap(p[j], p[pick]);
      r.ids[size_t(t) * k + j] = p[j];
      r.weights[size_t(t) * k + j] = 0.2f + 0.8f * float(rng.uniform());
    }
  }
  return r;
}

void check_decode(const MoeLayerWeights& w, const DeviceExperts& dev, int T, int k, const std::vector<int>& pool,
                  std::uint64_t seed) {
  const int H = w.hidden;
  Rng rng(seed);
  const Bf16Data x = random_bf16(rng, size_t(T) * H);
  const Routing r = random_routing(rng, T, k, pool);
  const std::vector<float> want = moe_experts_reference(w, x.f, r, true);
  DevBuf<bf16_bits> d_x(x.bits), d_y(size_t(T) * H), d_y2(size_t(T) * H);
  DevBuf<int> d_ids(r.ids);
  DevBuf<float> d_w(r.weights);
  REQUIRE(gpu::experts_decode_ok(dev.view, as_bf16(d_x), as_bf16(d_y), T, k));
  gpu::GroupedWorkspace ws;
  Stream s;
  // Both launch modes: with programmatic dependent launch (the layer's forwards) and without (timed stages).
  for (bool pdl : {true, false}) {
    CAPTURE(pdl);
    d_y.poison();
    device_sync();
    gpu::experts_decode(dev.view, as_bf16(d_x), d_ids.get(), d_w.get(), T, k, as_bf16(d_y), ws, s, pdl);
    s.sync();
    const std::vector<float> got = bf16_to_float(std::span<const bf16_bits>(d_y.download()));
    const double rel = rel_l2(got, want);
    CHECK_MESSAGE(rel <= kYTol, "rel-L2 of y vs moe_experts_reference = ", rel);
    double worst = 0;
    int at = 0;
    for (int t = 0; t < T; ++t) {
      const double e = rel_l2(std::span<const float>(&got[size_t(t) * H], size_t(H)),
                              std::span<const float>(&want[size_t(t) * H], size_t(H)));
      if (e > worst || std::isnan(e)) worst = e, at = t;
    }
    CHECK_MESSAGE(worst <= 2 * kYTol, "token ", at, " has rel-L2 ", worst);
  }
  // Same routing through experts_direct's two kernels (the fallback): the two agree.
  d_y2.poison();
  device_sync();
  gpu::experts_direct(dev.view, as_bf16(d_x), d_ids.get(), d_w.get(), T, k, as_bf16(d_y2), ws, s);
  s.sync();
  const std::vector<float> a = bf16_to_float(std::span<const bf16_bits>(d_y.download()));
  const std::vector<float> b = bf16_to_float(std::span<const bf16_bits>(d_y2.download()));
  CHECK_MESSAGE(rel_l2(a, b) <= kYTol, "experts_decode vs experts_direct rel-L2 = ", rel_l2(a, b));
}

std::vector<int> all_experts(int E) {
  std::vector<int> v(static_cast<size_t>(E), 0);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

const char* router_str(RouterKind k) { return k == RouterKind::SparseMixer ? "sparsemixer" : "softmax-top-k"; }

}  // namespace

TEST_CASE("experts_decode vs moe_experts_reference: T = 1..16 at top-2, top-1 and top-4, empty experts") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 9101);
  const DeviceExperts dev(w);
  std::uint64_t seed = 9200;
  for (int T : {1, 2, 3, 5, 8, 16}) {
    INFO("T=" << T << " k=2, all experts");
    check_decode(w, dev, T, 2, all_experts(16), ++seed);
  }
  for (int T : {1, 7, 16}) {
    INFO("T=" << T << " k=2, experts {2, 9, 15} only (13 experts empty)");
    check_decode(w, dev, T, 2, {2, 9, 15}, ++seed);
  }
  {
    INFO("T=32 k=1, every token on expert 4 (4 passes of 8 rows)");
    check_decode(w, dev, 32, 1, {4}, ++seed);
  }
  {
    INFO("T=8 k=4");
    check_decode(w, dev, 8, 4, all_experts(16), ++seed);
  }
}

TEST_CASE("experts_decode: odd shapes (H = 104, I = 48, E = 5; H = 4096, I = 448 Phi-tiny), and its limits") {
  const MoeLayerWeights w = random_layer(104, 48, 5, 9301);
  const DeviceExperts dev(w);
  for (int T : {1, 3, 11}) {
    INFO("H=104 I=48 E=5 T=" << T);
    check_decode(w, dev, T, 2, all_experts(5), 9310 + T);
  }
  const MoeLayerWeights phi = random_layer(4096, 448, 16, 9401);
  const DeviceExperts pdev(phi);
  for (int T : {1, 4, 16}) {
    INFO("Phi-tiny shape T=" << T);
    check_decode(phi, pdev, T, 2, all_experts(16), 9410 + T);
  }
  DevBuf<bf16_bits> x(size_t(17) * 256), y(size_t(17) * 256);
  CHECK_FALSE(gpu::experts_decode_ok(dev.view, as_bf16(x), as_bf16(y), 17, 2));  // 34 rows > 32
  CHECK_FALSE(gpu::experts_decode_ok(dev.view, as_bf16(x), as_bf16(y), 0, 2));
  const MoeLayerWeights wide = random_layer(64, 520, 2, 9501);  // I > 512
  const DeviceExperts wdev(wide);
  CHECK_FALSE(gpu::experts_decode_ok(wdev.view, as_bf16(x), as_bf16(y), 1, 2));
}

namespace {

// Every router implementation on the layer at (H, I): I = 128 takes experts_decode on the decode path
// (T*k <= 32), I = 520 (> 512) its fallback, experts_direct.
void check_layer_routers(int H, int I, std::uint64_t seed, std::initializer_list<int> tokens) {
  const MoeLayerWeights w = random_layer(H, I, 16, seed);
  const int E = w.num_experts, k = 2;
  Rng rng(seed + 1);
  for (RouterKind kind : {RouterKind::SparseMixer, RouterKind::SoftmaxTopK}) {
    GpuMoeLayer layer(w, kind, k, 0.01f);
    for (int T : tokens) {
      const Bf16Data x = random_bf16(rng, size_t(T) * H);
      const MoeRefResult ref = moe_layer_reference(w, x.f, T, {kind, k, 0.01f, true});
      for (RouterImpl ri : {RouterImpl::Tiled, RouterImpl::Fused, RouterImpl::Cublas, RouterImpl::Auto}) {
        layer.set_router_impl(ri);
        for (int rep = 0; rep < 3; ++rep) {  // eager, graph capture, graph replay (sync-free forwards)
          INFO(router_str(kind) << " H=" << H << " I=" << I << " T=" << T << " router " << router_impl_name(ri)
                                << " call " << rep + 1);
          const auto got = layer.forward(x.bits, T, MoePath::Grouped);
          if (ri != RouterImpl::Auto) CHECK(layer.last_router_impl() == ri);
          REQUIRE(got.logits.size() == size_t(T) * E);
          CHECK_MESSAGE(max_abs_diff(got.logits, ref.logits) <= 2e-3, "router logits differ from the CPU");
          int ties = 0, bad = 0;
          for (int t = 0; t < T; ++t) {
            if (routing_margin(kind, ref.logits, t, E, 0.01f) < 1e-4f) {
              ++ties;
              continue;
            }
            for (int j = 0; j < k; ++j)
              if (got.routing.id(t, j) != ref.routing.id(t, j) ||
                  !(std::fabs(got.routing.weight(t, j) - ref.routing.weight(t, j)) <= 1e-4f)) {
                if (bad++ < 3)
                  FAIL_CHECK("token ", t, " choice ", j, ": GPU ", got.routing.id(t, j), ":", got.routing.weight(t, j),
                             " CPU ", ref.routing.id(t, j), ":", ref.routing.weight(t, j));
              }
          }
          CHECK(ties <= std::max(2, T / 10));
          bool ids_ok = true;
          for (int id : got.routing.ids) ids_ok &= id >= 0 && id < E;
          REQUIRE_MESSAGE(ids_ok, "an expert id outside [0, E)");
          const double rel = rel_l2(got.y, moe_experts_reference(w, x.f, got.routing, true));
          CHECK_MESSAGE(rel <= kYTol, "rel-L2 of y vs the reference experts (GPU routing) = ", rel);
        }
      }
    }
    // T = 0: an empty result on every router.
    for (RouterImpl ri : {RouterImpl::Tiled, RouterImpl::Fused, RouterImpl::Cublas}) {
      layer.set_router_impl(ri);
      const auto got = layer.forward({}, 0, MoePath::Grouped);
      CHECK(got.y.empty());
    }
  }
}

}  // namespace

TEST_CASE("GpuMoeLayer: every router implementation vs moe_layer_reference (graphs too)") {
  check_layer_routers(256, 128, 9601, {1, 3, 16, 17, 33, 100, 513, 2047});
  CHECK(parse_router_impl("tiled") == RouterImpl::Tiled);
  CHECK_THROWS_AS(parse_router_impl("fastest"), Error);
}

TEST_CASE("GpuMoeLayer: the decode path falls back to experts_direct where experts_decode cannot run (I > 512)") {
  DevBuf<bf16_bits> x(size_t(1) * 256), y(size_t(1) * 256);
  const MoeLayerWeights wide = random_layer(256, 520, 16, 9701);
  const DeviceExperts dev(wide);
  REQUIRE_FALSE(gpu::experts_decode_ok(dev.view, as_bf16(x), as_bf16(y), 1, 2));
  REQUIRE(gpu::experts_direct_ok(dev.view, as_bf16(x), as_bf16(y), 1, 2));
  check_layer_routers(256, 520, 9702, {1, 5, 16});
}
