// Chapter 01's naive MoE kernel vs the CPU reference moe_experts_reference(round_h_to_bf16 = true),
// with the routing given (ids and weights from the CPU router), on a small MoeLayerWeights built here
// from random bf16 values (no checkpoint needed).
//
// Tolerance: rel-L2 <= 1e-2. Why that is tight enough and safe: the reference rounds h to bf16 at the
// same point as the kernel, and both accumulate in fp32, so they differ by (1) the final rounding of y
// to bf16, relative error <= 2^-9 ~ 2e-3 per element, (2) rare one-ulp differences in a rounded h
// element where fp32 summation order put a value on the other side of a bf16 rounding boundary, and
// (3) fp32 reordering, ~1e-6. Together a few 1e-3; a wrong expert, weight, row or missing SiLU is O(1).
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <sstream>
#include <vector>

#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "naive_moe.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

// All E experts of one layer, random bf16: w1, w3 ~ N(0, 1/H), w2 ~ N(0, 1/I), so h and y are O(1).
MoeLayerWeights random_layer(Rng& rng, int H, int I, int E) {
  MoeLayerWeights w;
  w.layer = 0;
  w.hidden = H;
  w.inter = I;
  w.num_experts = E;
  w.expert_ids.resize(E);
  std::iota(w.expert_ids.begin(), w.expert_ids.end(), 0);
  w.gate = random_bf16(rng, size_t(E) * H, 1.f / std::sqrt(float(H))).bits;
  w.w1 = random_bf16(rng, size_t(E) * I * H, 1.f / std::sqrt(float(H))).bits;
  w.w3 = random_bf16(rng, size_t(E) * I * H, 1.f / std::sqrt(float(H))).bits;
  w.w2 = random_bf16(rng, size_t(E) * H * I, 1.f / std::sqrt(float(I))).bits;
  return w;
}

}  // namespace

TEST_CASE("naive_moe: matches moe_experts_reference (h rounded to bf16) within rel-L2 1e-2") {
  Stream s;
  struct Case {
    int T, H, I, E;
    RouterKind kind;
    int k;
    bool dominant;  // experts 0..2 get (almost) all tokens; the others none
  };
  const Case cases[] = {
      {0, 64, 32, 8, RouterKind::SparseMixer, 2, false},
      {1, 64, 32, 16, RouterKind::SparseMixer, 2, false},
      {7, 100, 36, 16, RouterKind::SoftmaxTopK, 2, false},    // H, I not multiples of 8: scalar loads
      {64, 256, 128, 16, RouterKind::SparseMixer, 2, true},
      {64, 1024, 256, 16, RouterKind::SoftmaxTopK, 4, false},
      {1000, 64, 32, 8, RouterKind::SoftmaxTopK, 1, false},
      {200, 128, 64, 64, RouterKind::SoftmaxTopK, 2, true},
      {4, 4096, 448, 4, RouterKind::SparseMixer, 2, false},   // Phi-tiny's expert shape
      {8, 8, 8, 2, RouterKind::SoftmaxTopK, 2, false},
      {5, 6144, 512, 2, RouterKind::SoftmaxTopK, 1, false},   // 51 KiB of shared memory: the opt-in path
      {3, 40, 1000, 4, RouterKind::SoftmaxTopK, 2, false},    // I > H
  };
  unsigned seed = 20000;
  for (const Case& c : cases) {
    INFO("naive_moe T=" << c.T << " H=" << c.H << " I=" << c.I << " E=" << c.E << " " << router_name(c.kind)
                        << " k=" << c.k << (c.dominant ? " dominant" : ""));
    Rng rng(++seed);
    const MoeLayerWeights w = random_layer(rng, c.H, c.I, c.E);
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    std::vector<float> logits(size_t(c.T) * c.E);
    for (int t = 0; t < c.T; ++t)
      for (int e = 0; e < c.E; ++e) logits[size_t(t) * c.E + e] = rng.normal() + (c.dominant && e < 3 ? 8.f : 0.f);
    const Routing r = route(c.kind, logits, c.T, c.E, c.k, 0.01f);
    const std::vector<float> want = moe_experts_reference(w, x.f, r, /*round_h_to_bf16=*/true);

    DevBuf<bf16_bits> d_x(x.bits), d_w1(w.w1), d_w3(w.w3), d_w2(w.w2), d_y(size_t(c.T) * c.H);
    DevBuf<int> d_ids(r.ids);
    DevBuf<float> d_wts(r.weights);
    d_y.poison();
    device_sync();
    gpu::naive_moe(as_bf16(d_x), d_ids.get(), d_wts.get(), c.T, c.k, c.H, c.I, as_bf16(d_w1), as_bf16(d_w3),
                   as_bf16(d_w2), as_bf16(d_y), s);
    s.sync();
    const std::vector<float> got = bf16_to_float(std::span<const bf16_bits>(d_y.download()));
    if (c.T == 0) continue;

    // The worst token, to point at a failure.
    double worst = 0;
    int worst_t = 0;
    for (int t = 0; t < c.T; ++t) {
      const std::span<const float> g(&got[size_t(t) * c.H], c.H), wt(&want[size_t(t) * c.H], c.H);
      const double e = rel_l2(g, wt);
      if (!(e <= worst)) {
        worst = e;
        worst_t = t;
      }
    }
    const double err = rel_l2(got, want);
    CHECK_MESSAGE(err <= 1e-2, "rel-L2 " << err << ", max |diff| " << max_abs_diff(got, want) << "; worst token "
                                         << worst_t << " (rel-L2 " << worst << ", experts " << r.id(worst_t, 0)
                                         << (c.k > 1 ? "," : "") << (c.k > 1 ? r.id(worst_t, 1) : -1) << ")");
  }
}

TEST_CASE("naive_moe: a shape that does not fit in shared memory is a clear error, not a launch failure") {
  Stream s;
  // (I + 2H) floats = 560 KiB: more than any GPU's per-block shared memory.
  CHECK_THROWS_AS(gpu::naive_moe(nullptr, nullptr, nullptr, 1, 2, 70000, 16, nullptr, nullptr, nullptr, nullptr, s),
                  Error);
  CHECK_THROWS_AS(gpu::naive_moe(nullptr, nullptr, nullptr, -1, 2, 64, 16, nullptr, nullptr, nullptr, nullptr, s),
                  Error);
  CHECK(cudaGetLastError() == cudaSuccess);
}
