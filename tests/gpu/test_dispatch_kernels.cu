// Dispatch plan, permute and combine kernels vs the CPU reference.
//
//  * build_dispatch_plan: counts, offsets, row_of and assignment EXACTLY equal to make_dispatch_plan
//    (common/moe/dispatch_plan.cpp), for T*k from 0 to 32768*8, both kernel paths (one block for
//    T*k <= 16384, chunked multi-block above) and the boundaries between them, experts with no token.
//  * permute_rows: bit-exact copy of x's rows in plan order (vectorised and scalar paths).
//  * unpermute_combine: within bf16 output rounding of the double-precision weighted sum.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "combine.cuh"
#include "kernel_test_util.cuh"
#include "moe/dispatch_plan.hpp"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "permute.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

enum class Ids { Routed, Uniform, Skewed, Subset, Single };
const char* ids_name(Ids d) {
  switch (d) {
    case Ids::Routed: return "routed";
    case Ids::Uniform: return "uniform";
    case Ids::Skewed: return "skewed";
    case Ids::Subset: return "subset";
    case Ids::Single: return "single";
  }
  return "?";
}

// Expert ids [T, k]:
//  routed   softmax top-k of N(0,1) logits (distinct experts per token, like real routing)
//  uniform  any expert, duplicates inside a token allowed (the plan must not care)
//  skewed   90% of assignments to expert 0, the rest uniform (one hot expert)
//  subset   only experts 1 and E-2 (every other expert gets no token)
//  single   every assignment to expert E-1
std::vector<int> make_ids(Rng& rng, Ids d, int T, int k, int E) {
  std::vector<int> ids(size_t(T) * k);
  if (d == Ids::Routed) {
    std::vector<float> logits(size_t(T) * E);
    for (auto& v : logits) v = rng.normal();
    return route_softmax_topk(logits, T, E, k).ids;
  }
  for (auto& e : ids) {
    const int u = int(rng.next_u64() % unsigned(E));
    switch (d) {
      case Ids::Uniform: e = u; break;
      case Ids::Skewed: e = rng.uniform() < 0.9 ? 0 : u; break;
      case Ids::Subset: e = (rng.next_u64() & 1) ? std::min(1, E - 1) : std::max(0, E - 2); break;
      case Ids::Single: e = E - 1; break;
      default: break;
    }
  }
  return ids;
}

struct GpuPlan {
  std::vector<int> counts, offsets, row_of, assignment;
};

GpuPlan gpu_plan(const std::vector<int>& ids, int T, int k, int E) {
  Stream s;
  DevBuf<int> d_ids(ids), d_counts(E), d_offsets(size_t(E) + 1), d_row_of(ids.size()), d_assignment(ids.size());
  d_counts.poison();
  d_offsets.poison();
  d_row_of.poison();
  d_assignment.poison();
  device_sync();
  gpu::build_dispatch_plan(d_ids.get(), T, k, E, d_counts.get(), d_offsets.get(), d_row_of.get(), d_assignment.get(),
                           s);
  s.sync();
  return {d_counts.download(), d_offsets.download(), d_row_of.download(), d_assignment.download()};
}

// Exact comparison of all four arrays; returns "" when equal.
std::string compare_plan(const GpuPlan& got, const DispatchPlan& want) {
  std::string r;
  for (const auto& [what, g, w] : {std::tuple{"counts", &got.counts, &want.counts},
                                    std::tuple{"offsets", &got.offsets, &want.offsets},
                                    std::tuple{"row_of", &got.row_of, &want.row_of},
                                    std::tuple{"assignment", &got.assignment, &want.assignment}}) {
    const std::string m = int_mismatches(what, *g, *w);
    if (!m.empty()) r += "\n  " + m;
  }
  return r;
}

Routing routing_of(std::vector<int> ids, int T, int k) {
  return Routing{T, k, std::move(ids), std::vector<float>(size_t(T) * k, 0.f)};
}

}  // namespace

TEST_CASE("build_dispatch_plan: exactly the CPU plan (one-block path, T*k <= 16384)") {
  unsigned seed = 7000;
  int cases = 0;
  for (int T : {0, 1, 7, 64, 1000, 4096})
    for (int k : {1, 2, 4})
      for (int E : {8, 16, 64})
        for (Ids d : {Ids::Routed, Ids::Uniform, Ids::Skewed, Ids::Subset, Ids::Single}) {
          INFO("plan T=" << T << " k=" << k << " E=" << E << " ids=" << ids_name(d));
          Rng rng(++seed);
          const std::vector<int> ids = make_ids(rng, d, T, k, E);
          const DispatchPlan want = make_dispatch_plan(routing_of(ids, T, k), E);
          const std::string diff = compare_plan(gpu_plan(ids, T, k, E), want);
          CHECK_MESSAGE(diff.empty(), "GPU plan differs from the CPU plan:" << diff);
          ++cases;
        }
  MESSAGE("build_dispatch_plan: " << cases << " small cases compared");
}

TEST_CASE("build_dispatch_plan: exactly the CPU plan (large T*k, path boundaries, many experts)") {
  struct Case {
    int T, k, E;
    Ids d;
  };
  const Case cases[] = {
      {8192, 2, 16, Ids::Routed},     // n = 16384: the largest one-block plan
      {16385, 1, 16, Ids::Uniform},   // n = 16385: the smallest multi-block plan (32 chunks, last one longer)
      {4097, 4, 16, Ids::Routed},     // n = 16388
      {16384, 2, 16, Ids::Routed},    // Phi-tiny at 16384 tokens
      {16384, 2, 16, Ids::Skewed},
      {16384, 2, 16, Ids::Subset},
      {32768, 8, 16, Ids::Uniform},   // n = 262144, the largest size the course uses
      {32768, 8, 256, Ids::Routed},   // DeepSeek-like expert count
      {32768, 2, 64, Ids::Single},
      {20000, 1, 1, Ids::Single},     // one expert
      {16400, 1, 600, Ids::Uniform},  // chunk = 608 (E rounded up to 32), not 512
      {5000, 4, 4096, Ids::Uniform},  // E = 4096 (max): chunk = 4096, 4 chunks
      {100, 2, 4096, Ids::Skewed},    // E = 4096 on the one-block path (one warp)
      {3, 8, 2000, Ids::Uniform},
  };
  unsigned seed = 9000;
  for (const Case& c : cases) {
    INFO("plan T=" << c.T << " k=" << c.k << " E=" << c.E << " ids=" << ids_name(c.d));
    Rng rng(++seed);
    const std::vector<int> ids = make_ids(rng, c.d, c.T, c.k, c.E);
    const DispatchPlan want = make_dispatch_plan(routing_of(ids, c.T, c.k), c.E);
    const GpuPlan got = gpu_plan(ids, c.T, c.k, c.E);
    const std::string diff = compare_plan(got, want);
    CHECK_MESSAGE(diff.empty(), "GPU plan differs from the CPU plan:" << diff);
    // Deterministic: a second run gives the same bits.
    const GpuPlan again = gpu_plan(ids, c.T, c.k, c.E);
    CHECK(again.row_of == got.row_of);
    CHECK(again.assignment == got.assignment);
  }
}

TEST_CASE("build_dispatch_plan: out-of-range ids get row -1 and are not counted") {
  // Independent expectation: the plan of the valid assignments only, rows in assignment order per expert.
  for (int T : {50, 9000}) {  // one-block and multi-block paths
    INFO("invalid ids, T=" << T);
    const int k = 2, E = 16, n = T * k;
    Rng rng(T);
    std::vector<int> ids = make_ids(rng, Ids::Uniform, T, k, E);
    for (int a = 3; a < n; a += 97) ids[a] = (a % 2) ? E : -3;
    std::vector<int> counts(E, 0), offsets(E + 1, 0), row_of(n, -1), assignment(n, -1);
    for (int e : ids)
      if (e >= 0 && e < E) ++counts[e];
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    std::vector<int> next(offsets.begin(), offsets.end() - 1);
    for (int a = 0; a < n; ++a)
      if (ids[a] >= 0 && ids[a] < E) {
        row_of[a] = next[ids[a]]++;
        assignment[row_of[a]] = a;
      }
    const GpuPlan got = gpu_plan(ids, T, k, E);
    CHECK_MESSAGE(int_mismatches("counts", got.counts, counts).empty(), int_mismatches("counts", got.counts, counts));
    CHECK_MESSAGE(int_mismatches("offsets", got.offsets, offsets).empty(),
                  int_mismatches("offsets", got.offsets, offsets));
    CHECK_MESSAGE(int_mismatches("row_of", got.row_of, row_of).empty(), int_mismatches("row_of", got.row_of, row_of));
    CHECK_MESSAGE(int_mismatches("assignment", got.assignment, assignment).empty(),
                  int_mismatches("assignment", got.assignment, assignment));
  }
}

TEST_CASE("build_dispatch_plan rejects bad arguments") {
  Stream s;
  DevBuf<int> d(8);
  CHECK_THROWS_AS(gpu::build_dispatch_plan(nullptr, -1, 2, 16, d.get(), d.get(), nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::build_dispatch_plan(nullptr, 1, 0, 16, d.get(), d.get(), nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::build_dispatch_plan(nullptr, 1, 2, 4097, d.get(), d.get(), nullptr, nullptr, s), Error);
  CHECK_THROWS_AS(gpu::build_dispatch_plan(nullptr, 1, 2, 0, d.get(), d.get(), nullptr, nullptr, s), Error);
}

namespace {

struct RowsCase {
  int T, k, H;
  bool misalign;  // shift both pointers by one bf16: the 16-byte path must not be taken
};
const RowsCase kRowsCases[] = {{0, 2, 64, false},   {1, 2, 4096, false}, {7, 2, 100, false}, {64, 4, 4096, false},
                               {1000, 2, 256, false}, {4096, 2, 64, false}, {1000, 1, 8, false}, {33, 2, 1, false},
                               {100, 2, 64, true},   {16, 8, 4096, true}};

// Routing (ids and weights) of random logits, with experts 0..2 dominant so many experts get no row.
Routing random_routing(Rng& rng, int T, int k, int E, bool sparsemixer) {
  std::vector<float> logits(size_t(T) * E);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) logits[size_t(t) * E + e] = rng.normal() + (e < 3 ? 1.5f : 0.f);
  return sparsemixer ? route_sparsemixer(logits, T, E, 0.01f) : route_softmax_topk(logits, T, E, k);
}

}  // namespace

TEST_CASE("permute_rows: xp[r] = x[assignment[r] / k], bit-exact") {
  Stream s;
  unsigned seed = 11000;
  for (const RowsCase& c : kRowsCases) {
    INFO("permute T=" << c.T << " k=" << c.k << " H=" << c.H << (c.misalign ? " misaligned" : ""));
    Rng rng(++seed);
    const int E = 16, rows = c.T * c.k, sh = c.misalign ? 1 : 0;
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    const DispatchPlan plan = make_dispatch_plan(random_routing(rng, c.T, c.k, E, false), E);
    std::vector<bf16_bits> x_host(x.bits.size() + sh, 0);
    std::copy(x.bits.begin(), x.bits.end(), x_host.begin() + sh);
    DevBuf<bf16_bits> d_x(x_host), d_xp(size_t(rows) * c.H + sh);
    DevBuf<int> d_assignment(plan.assignment);
    d_xp.poison();
    device_sync();
    gpu::permute_rows(as_bf16(d_x) + sh, d_assignment.get(), rows, c.k, c.H, as_bf16(d_xp) + sh, s);
    s.sync();
    const std::vector<bf16_bits> xp = d_xp.download();
    size_t bad = 0;
    std::ostringstream first;
    for (int r = 0; r < rows; ++r) {
      const int t = plan.assignment[r] / c.k;
      for (int h = 0; h < c.H; ++h) {
        const bf16_bits want = x.bits[size_t(t) * c.H + h], got = xp[size_t(r) * c.H + h + sh];
        if (got != want) {
          if (bad < 4) first << " xp[" << r << "," << h << "] = 0x" << std::hex << got << " want 0x" << want << std::dec << " (token " << t << ");";
          ++bad;
        }
      }
    }
    CHECK_MESSAGE(bad == 0, bad << " elements differ:" << first.str());
  }
}

TEST_CASE("unpermute_combine: y[t] = sum_j w[t,j] yp[row_of[t*k+j]] within bf16 rounding") {
  Stream s;
  unsigned seed = 12000;
  for (const RowsCase& c : kRowsCases)
    for (bool sparsemixer : {false, true}) {
      if (sparsemixer && c.k != 2) continue;
      INFO("combine T=" << c.T << " k=" << c.k << " H=" << c.H << (c.misalign ? " misaligned" : "")
                        << (sparsemixer ? " sparsemixer weights" : " softmax weights"));
      Rng rng(++seed);
      const int E = 16, rows = c.T * c.k, sh = c.misalign ? 1 : 0;
      const Routing r = random_routing(rng, c.T, c.k, E, sparsemixer);
      const DispatchPlan plan = make_dispatch_plan(r, E);
      const Bf16Data yp = random_bf16(rng, size_t(rows) * c.H);
      std::vector<bf16_bits> yp_host(yp.bits.size() + sh, 0);
      std::copy(yp.bits.begin(), yp.bits.end(), yp_host.begin() + sh);
      DevBuf<bf16_bits> d_yp(yp_host), d_y(size_t(c.T) * c.H + sh);
      DevBuf<int> d_row_of(plan.row_of);
      DevBuf<float> d_w(r.weights);
      d_y.poison();
      device_sync();
      gpu::unpermute_combine(as_bf16(d_yp) + sh, d_row_of.get(), d_w.get(), c.T, c.k, c.H, as_bf16(d_y) + sh, s);
      s.sync();
      const std::vector<bf16_bits> y_bits = d_y.download();
      std::vector<float> got(size_t(c.T) * c.H), want(got.size());
      // Per element: the GPU sums in fp32 (error <= ~k * 2^-24 * sum |w y|) and rounds once to bf16
      // (relative error <= 2^-9). So |got - want| <= 2^-8 |want| + 1e-6 sum_j |w_j y_j| with margin.
      size_t bad = 0;
      std::ostringstream first;
      for (int t = 0; t < c.T; ++t)
        for (int h = 0; h < c.H; ++h) {
          double acc = 0, mag = 0;
          for (int j = 0; j < c.k; ++j) {
            const double term = double(r.weight(t, j)) * yp.f[size_t(plan.row_of[size_t(t) * c.k + j]) * c.H + h];
            acc += term;
            mag += std::fabs(term);
          }
          const size_t i = size_t(t) * c.H + h;
          want[i] = float(acc);
          got[i] = bf16_to_float(y_bits[i + sh]);
          if (!(std::fabs(got[i] - acc) <= std::ldexp(std::fabs(acc), -8) + 1e-6 * mag)) {
            if (bad < 4) first << " y[" << t << "," << h << "] gpu " << got[i] << " want " << acc << ";";
            ++bad;
          }
        }
      CHECK_MESSAGE(bad == 0, bad << " elements outside bf16 rounding:" << first.str());
      // The tolerance the course states for combine: rel-L2 <= 1e-2. The output is bf16 (unit roundoff
      // 2^-9 ~ 2e-3), so a correct kernel sits near 1e-3; a wrong row or weight is O(1).
      if (c.T > 0) CHECK(rel_l2(got, want) <= 1e-2);
    }
}

TEST_CASE("plan -> permute -> combine on the GPU: an identity expert gives y = (sum_j w_j) x") {
  Stream s;
  unsigned seed = 13000;
  struct Case {
    int T, k, E, H;
  };
  for (const Case& c : {Case{1, 2, 16, 64}, Case{1000, 2, 16, 256}, Case{4096, 4, 64, 64}, Case{9000, 2, 16, 64},
                        Case{7, 1, 8, 100}}) {
    INFO("pipeline T=" << c.T << " k=" << c.k << " E=" << c.E << " H=" << c.H);
    Rng rng(++seed);
    const Routing r = random_routing(rng, c.T, c.k, c.E, false);
    const Bf16Data x = random_bf16(rng, size_t(c.T) * c.H);
    const int n = c.T * c.k;
    DevBuf<int> d_ids(r.ids), d_counts(c.E), d_offsets(size_t(c.E) + 1), d_row_of(n), d_assignment(n);
    DevBuf<float> d_w(r.weights);
    DevBuf<bf16_bits> d_x(x.bits), d_xp(size_t(n) * c.H), d_y(size_t(c.T) * c.H);
    d_row_of.poison();
    d_assignment.poison();
    d_xp.poison();
    d_y.poison();
    device_sync();
    gpu::build_dispatch_plan(d_ids.get(), c.T, c.k, c.E, d_counts.get(), d_offsets.get(), d_row_of.get(),
                             d_assignment.get(), s);
    gpu::permute_rows(as_bf16(d_x), d_assignment.get(), n, c.k, c.H, as_bf16(d_xp), s);
    gpu::unpermute_combine(as_bf16(d_xp), d_row_of.get(), d_w.get(), c.T, c.k, c.H, as_bf16(d_y), s);
    s.sync();
    const std::vector<float> got = bf16_to_float(std::span<const bf16_bits>(d_y.download()));
    std::vector<float> want(got.size());
    for (int t = 0; t < c.T; ++t) {
      double wsum = 0;
      for (int j = 0; j < c.k; ++j) wsum += r.weight(t, j);
      for (int h = 0; h < c.H; ++h) want[size_t(t) * c.H + h] = float(wsum * x.f[size_t(t) * c.H + h]);
    }
    const double err = rel_l2(got, want);
    CHECK_MESSAGE(err <= 1e-2, "rel-L2 " << err);
  }
}

// gather_rows picks n rows out of a larger matrix (the model's last-row-of-each-sequence gather): exactly the
// indexed rows, bit for bit, and zero rows for indices outside [0, src_rows). permute_rows cannot do this (it
// bounds indices by its own row count), which is the bug this test was written for.
TEST_CASE("gather_rows: n rows out of src_rows > n, bit-exact; out-of-range indices give zero rows") {
  Stream s;
  Rng rng(91);
  for (int H : {64, 4096, 36}) {  // 36: the scalar (non 16-byte) path
    CAPTURE(H);
    const int src_rows = 40;
    const Bf16Data src = random_bf16(rng, size_t(src_rows) * H);
    const std::vector<int> idx = {39, 0, 17, 17, -1, 40, 5};
    DevBuf<bf16_bits> d_src(src.bits), d_dst(idx.size() * H);
    DevBuf<int> d_idx(idx);
    d_dst.poison();
    gpu::gather_rows(as_bf16(d_src), src_rows, d_idx.get(), int(idx.size()), H, as_bf16(d_dst), s);
    s.sync();
    const std::vector<bf16_bits> got = d_dst.download();
    for (size_t i = 0; i < idx.size(); ++i) {
      const bool in = idx[i] >= 0 && idx[i] < src_rows;
      int bad = 0;
      for (int c = 0; c < H; ++c) {
        const bf16_bits want = in ? src.bits[size_t(idx[i]) * H + c] : bf16_bits(0);
        bad += got[i * H + c] != want;
      }
      CHECK_MESSAGE(bad == 0, "row ", i, " (index ", idx[i], "): ", bad, " of ", H, " values wrong");
    }
  }
  CHECK_THROWS_AS(gpu::gather_rows(nullptr, 4, nullptr, 2, 8, nullptr, s), Error);
}
