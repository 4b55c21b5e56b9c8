// The whole GPU MoE layer (naive and grouped paths) and grouped_experts (every strategy) against the CPU
// reference in common/moe/reference.cpp, which is independent of every kernel here.
//
// Tolerances.
//  * Output y: rel-L2 <= 1e-2 against the reference run with round_h_to_bf16 = true (the GPU stores h in
//    bf16 too, so that rounding is modelled, not tolerated). What remains: y itself is bf16 (unit roundoff
//    2^-9 ~ 2e-3, ~1.1e-3 RMS relative), the cuBLAS strategies also store gate_up = (w1 x, w3 x) in bf16
//    before SwiGLU (another ~2^-9 relative on h), and fp32 sums run in another order (~1e-6). Together
//    ~3e-3 RMS; 1e-2 leaves room without hiding real bugs (a wrong row, expert or multiplier gives
//    O(1) errors, a lost SwiGLU or bf16 truncation instead of rounding gives >= 1e-2).
//  * Routing: GPU and CPU logits differ by fp32 summation order only, so ids must be identical and
//    multipliers within 1e-4, except for tokens whose reference decision is a near-tie
//    (routing_margin < 1e-4, the order of two logits or sparsemixer's 2*eps mask could flip).
//    Near-ties are counted (and must stay rare); y is then compared with the reference experts run
//    with the GPU's own routing, so a legitimate near-tie flip cannot fail the output check.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "grouped_experts.cuh"
#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "moe_gpu.hpp"
#include "padded_layout.cuh"
#include "random_init.cuh"
#include "swiglu.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

constexpr float kEps = 0.01f;        // sparsemixer jitter_eps (Phi-tiny's router_jitter_noise)
constexpr double kYTol = 1e-2;       // rel-L2 of y, see the header
constexpr float kTieMargin = 1e-4f;  // routing_margin below this: a near-tie
constexpr float kWeightTol = 1e-4f;

const char* router_str(RouterKind k) { return k == RouterKind::SparseMixer ? "sparsemixer" : "softmax-top-k"; }
const char* path_str(MoePath p) { return p == MoePath::Naive ? "naive" : "grouped"; }

// Phi-tiny-MoE's layer shape, generated once for the tests that need it (~88 M random values).
const MoeLayerWeights& phi_layer() {
  static const MoeLayerWeights w = random_layer(4096, 448, 16, 26);
  return w;
}

// A layer where experts 8..15 never win (logit ~ -bias) and expert 0 always wins (logit ~ +2 bias), given
// inputs whose column 0 is `bias`: empty experts for every T, and one expert with every token (many
// passes of the weight-streaming kernels, a very uneven grouped GEMM).
constexpr float kSkewBias = 8.f;
MoeLayerWeights skewed_layer(int H, int I, int E, std::uint64_t seed) {
  MoeLayerWeights w = random_layer(H, I, E, seed);
  for (int e = 0; e < E; ++e) w.gate[size_t(e) * H] = float_to_bf16(e == 0 ? 2.f : e < 8 ? 1.f : -1.f);
  return w;
}
Bf16Data skewed_inputs(Rng& rng, int T, int H) {
  Bf16Data x = random_bf16(rng, size_t(T) * H);
  for (int t = 0; t < T; ++t) {
    x.bits[size_t(t) * H] = float_to_bf16(kSkewBias);
    x.f[size_t(t) * H] = bf16_to_float(x.bits[size_t(t) * H]);
  }
  return x;
}

std::string ids_str(const Routing& r, int t) {
  std::ostringstream os;
  os << "[";
  for (int j = 0; j < r.k; ++j) os << (j ? ", " : "") << r.id(t, j) << ":" << r.weight(t, j);
  os << "]";
  return os.str();
}

// Checks one GPU forward against the reference (computed once by the caller). Returns the number of
// near-tie tokens.
int check_forward(const MoeLayerWeights& w, const Bf16Data& x, int T, RouterKind kind, const MoeRefResult& ref,
                  const GpuMoeLayer::Result& got, const std::string& what) {
  INFO(what);
  const int E = w.num_experts, H = w.hidden, k = 2;
  REQUIRE(got.logits.size() == size_t(T) * E);
  REQUIRE(got.routing.tokens == T);
  REQUIRE(got.routing.k == k);
  REQUIRE(got.routing.ids.size() == size_t(T) * k);
  REQUIRE(got.y.size() == size_t(T) * H);
  if (T == 0) return 0;

  // Logits: same bf16 inputs, fp32 sums in another order.
  const double logit_err = max_abs_diff(got.logits, ref.logits);
  CHECK_MESSAGE(logit_err <= 2e-3, "router logits differ from the CPU by up to ", logit_err);

  // Routing.
  int ties = 0, bad = 0;
  std::ostringstream bad_report;
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int id = got.routing.id(t, j);
      REQUIRE_MESSAGE((id >= 0 && id < E), "token ", t, " choice ", j, " has expert id ", id, " outside [0, ", E, ")");
    }
    if (routing_margin(kind, ref.logits, t, E, kEps) < kTieMargin) {
      ++ties;
      continue;
    }
    bool ok = true;
    for (int j = 0; j < k; ++j)
      ok = ok && got.routing.id(t, j) == ref.routing.id(t, j) &&
           std::fabs(got.routing.weight(t, j) - ref.routing.weight(t, j)) <= kWeightTol;
    if (!ok && bad++ < 5)
      bad_report << " token " << t << ": GPU " << ids_str(got.routing, t) << " CPU " << ids_str(ref.routing, t) << ";";
  }
  CHECK_MESSAGE(bad == 0, bad, " of ", T, " tokens routed differently from the CPU (not near-ties):",
                bad_report.str());
  CHECK_MESSAGE(ties <= std::max(2, T / 10), ties, " near-tie tokens of ", T, " is implausibly many");

  // Output: against the reference experts with the GPU's own routing (exactly the reference's routing
  // when nothing was a near-tie, checked above).
  const double rel_own = rel_l2(got.y, moe_experts_reference(w, x.f, got.routing, true));
  CHECK_MESSAGE(rel_own <= kYTol, "rel-L2 of y vs the reference experts (GPU routing) = ", rel_own);
  if (ties == 0 && bad == 0) {
    const double rel = rel_l2(got.y, ref.y);
    CHECK_MESSAGE(rel <= kYTol, "rel-L2 of y vs moe_layer_reference = ", rel);
  }
  return ties;
}

// Whether cublas-padded runs padded for these per-expert counts or falls back to cublas-streams: the padded
// layout's policy (padded_layout.cuh) restated here: M_pad = largest count rounded up to 64, allowed up to
// ratio x the mean count rounded up to 64 (at least 64).
bool padded_fits(const std::vector<int>& counts, float ratio = 2.f) {
  const int n = int(counts.size());
  const long long rows = std::accumulate(counts.begin(), counts.end(), 0LL);
  const int most = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  const long long m_pad = (most + 63) / 64 * 64;
  const long long cap = std::max(64LL, (static_cast<long long>(std::ceil(double(ratio) * double(rows) / n)) + 63) / 64 * 64);
  return m_pad > 0 && m_pad <= cap;
}

std::vector<int> counts_of(const Routing& r, int E) {
  std::vector<int> c(size_t(E), 0);
  for (int id : r.ids)
    if (id >= 0 && id < E) ++c[size_t(id)];
  return c;
}

// Runs every (T, path) of `Ts` on one layer object (so buffer growth between sizes is exercised too).
// `strategy`: the expert strategy forced on the grouped path (Auto: the layer's default).
void sweep_layer(const MoeLayerWeights& w, RouterKind kind, const std::vector<int>& Ts, bool skewed,
                 std::uint64_t seed, ExpertStrategy strategy = ExpertStrategy::Auto) {
  GpuMoeLayer layer(w, kind, 2, kEps);
  if (strategy != ExpertStrategy::Auto) layer.set_expert_strategy(strategy);
  Rng rng(seed);
  for (int T : Ts) {
    const Bf16Data x = skewed ? skewed_inputs(rng, T, w.hidden) : random_bf16(rng, size_t(T) * w.hidden);
    const MoeRefResult ref = moe_layer_reference(w, x.f, T, {kind, 2, kEps, true});
    if (skewed)
      for (int id : ref.routing.ids) REQUIRE_MESSAGE(id < 8, "test setup: expert ", id, " should never be chosen");
    for (MoePath path : {MoePath::Grouped, MoePath::Naive}) {
      std::ostringstream what;
      what << path_str(path) << " path, " << router_str(kind) << ", T=" << T << ", H=" << w.hidden
           << ", I=" << w.inter << ", E=" << w.num_experts << (skewed ? ", skewed (experts 8..15 empty)" : "");
      const auto got = layer.forward(x.bits, T, path);
      if (path == MoePath::Grouped) what << ", experts via " << expert_strategy_name(layer.last_expert_strategy());
      check_forward(w, x, T, kind, ref, got, what.str());
      // Forced cublas-padded, and the layer's Auto above the small-batch rows (32), run cublas-padded, or
      // cublas-streams above its cap.
      const bool padded_wanted = strategy == ExpertStrategy::CublasPadded || (strategy == ExpertStrategy::Auto && 2 * T > 32);
      if (padded_wanted && path == MoePath::Grouped && T > 0) {
        INFO(what.str());
        const bool fits = padded_fits(counts_of(got.routing, w.num_experts));
        CHECK(layer.last_expert_strategy() == (fits ? ExpertStrategy::CublasPadded : ExpertStrategy::CublasStreams));
      }
    }
  }
}

// ---- grouped_experts alone ------------------------------------------------------------------------

struct Cublas {
  cublasHandle_t h{};
  Cublas() { CUBLAS_CHECK(cublasCreate(&h)); }
  ~Cublas() { cublasDestroy(h); }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
};

// w1|w3 stacked per expert, as ExpertWeightsDevice wants it.
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

std::vector<int> offsets_of(const std::vector<int>& counts) {
  std::vector<int> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

// Random counts summing to rows, with some experts (every third, plus random ones) empty.
std::vector<int> random_counts(Rng& rng, int rows, int E) {
  std::vector<int> counts(size_t(E), 0);
  std::vector<int> open;
  for (int e = 0; e < E; ++e)
    if (e % 3 != 1 && rng.uniform() < 0.8) open.push_back(e);
  if (open.empty()) open.push_back(0);
  for (int r = 0; r < rows; ++r) ++counts[size_t(open[size_t(rng.next_u64() % open.size())])];
  return counts;
}

// The reference: every row through expert_forward_cpu of its expert (h rounded to bf16).
std::vector<float> experts_cpu(const MoeLayerWeights& w, const std::vector<float>& xp, const std::vector<int>& off) {
  const int H = w.hidden;
  std::vector<float> y(xp.size());
  for (int e = 0; e < w.num_experts; ++e)
    for (int r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r)
      expert_forward_cpu(w, e, &xp[size_t(r) * H], &y[size_t(r) * H], true);
  return y;
}

// Worst per-row relative L2 error, and which row: catches a single wrong row that a global norm would hide.
std::pair<double, int> worst_row(const std::vector<float>& got, const std::vector<float>& want, int H) {
  double worst = 0;
  int at = -1;
  for (size_t r = 0; r < got.size() / size_t(H); ++r) {
    const std::span<const float> g(&got[r * H], size_t(H)), wv(&want[r * H], size_t(H));
    const double e = rel_l2(g, wv);
    if (e > worst || at < 0) worst = e, at = int(r);
  }
  return {worst, at};
}

struct GroupedRun {
  std::vector<float> y;
  gpu::GroupedStrategy used;
};

GroupedRun run_grouped(const Cublas& blas, const DeviceExperts& dev, const Bf16Data& xp, const std::vector<int>& off,
                       gpu::GroupedStrategy strategy, bool pass_host_offsets, gpu::GroupedWorkspace& ws) {
  const int rows = off.back(), H = dev.view.H;
  Stream s;
  DevBuf<bf16_bits> d_xp(xp.bits.empty() ? std::vector<bf16_bits>(1) : xp.bits);
  DevBuf<bf16_bits> d_yp(std::max<size_t>(size_t(rows) * H, 1));
  DevBuf<int> d_off(off);
  d_yp.poison();  // NaN: a row no strategy writes fails loudly
  device_sync();
  ws.strategy = strategy;
  gpu::grouped_experts(blas.h, dev.view, as_bf16(d_xp), d_off.get(), pass_host_offsets ? off.data() : nullptr, rows,
                       as_bf16(d_yp), ws, s);
  s.sync();
  std::vector<bf16_bits> y = d_yp.download();
  y.resize(size_t(rows) * H);
  return {bf16_to_float(std::span<const bf16_bits>(y)), ws.last_used};
}

constexpr gpu::GroupedStrategy kStrategies[] = {gpu::GroupedStrategy::Auto,          gpu::GroupedStrategy::WeightStream,
                                                gpu::GroupedStrategy::CublasGrouped, gpu::GroupedStrategy::CublasLoop,
                                                gpu::GroupedStrategy::CublasStreams, gpu::GroupedStrategy::CublasPadded};

void check_grouped_all_strategies(const MoeLayerWeights& w, const std::vector<int>& counts, std::uint64_t seed) {
  const std::vector<int> off = offsets_of(counts);
  const int rows = off.back(), H = w.hidden;
  Rng rng(seed);
  const Bf16Data xp = random_bf16(rng, size_t(rows) * H);
  const std::vector<float> want = experts_cpu(w, xp.f, off);
  const DeviceExperts dev(w);
  const Cublas blas;
  gpu::GroupedWorkspace ws;
  const bool vec_ok = H % 8 == 0 && w.inter % 8 == 0;
  std::vector<float> stream_y;
  for (gpu::GroupedStrategy st : kStrategies)
    for (bool host_off : {false, true}) {
      const GroupedRun got = run_grouped(blas, dev, xp, off, st, host_off, ws);
      std::ostringstream what;
      what << "grouped_experts H=" << H << " I=" << w.inter << " E=" << w.num_experts << " rows=" << rows
           << " requested " << gpu::grouped_strategy_name(st) << ", ran " << gpu::grouped_strategy_name(got.used)
           << (host_off ? ", host offsets given" : ", host offsets not given");
      INFO(what.str());
      // The strategy actually run: Auto resolves by rows; impossible choices fall back to CublasLoop.
      gpu::GroupedStrategy expect = st;
      if (st == gpu::GroupedStrategy::Auto)
        expect = rows <= ws.small_rows_max      ? gpu::GroupedStrategy::WeightStream
                 : rows < ws.streams_min_rows ? gpu::GroupedStrategy::CublasGrouped
                                              : gpu::GroupedStrategy::CublasStreams;
      if (!vec_ok && (expect == gpu::GroupedStrategy::WeightStream || expect == gpu::GroupedStrategy::CublasGrouped))
        expect = gpu::GroupedStrategy::CublasLoop;
      // cublas-padded above its cap (one expert with most rows) runs cublas-streams.
      if (expect == gpu::GroupedStrategy::CublasPadded && rows > 0 && !padded_fits(counts))
        expect = gpu::GroupedStrategy::CublasStreams;
      CHECK(got.used == expect);
      if (rows == 0) continue;
      const double rel = rel_l2(got.y, want);
      const auto [row_err, row] = worst_row(got.y, want, H);
      CHECK_MESSAGE(rel <= kYTol, "rel-L2 vs expert_forward_cpu = ", rel);
      CHECK_MESSAGE(row_err <= 2 * kYTol, "worst row ", row, " has rel-L2 ", row_err);
      if (got.used == gpu::GroupedStrategy::WeightStream && stream_y.empty()) stream_y = got.y;
      // Strategies agree with each other (gate_up in bf16 on the cuBLAS side is the only modelled difference).
      if (!stream_y.empty()) {
        const double d = rel_l2(got.y, stream_y);
        CHECK_MESSAGE(d <= kYTol, "rel-L2 between this strategy and weight-stream = ", d);
      }
    }
}

}  // namespace

TEST_CASE("swiglu: h = bf16(silu(a) * b), SiLU on the w1 half only, bf16 and fp32 inputs") {
  Rng rng(11);
  for (int I : {128, 36})      // vectorised (I % 8 == 0) and scalar
    for (int shift : {0, 1}) {  // shift 1: gate_up not 16-byte aligned -> scalar path even for I = 128
      const int rows = 37;
      INFO("I=" << I << " pointer shift " << shift);
      const size_t n = size_t(rows) * 2 * I;
      const Bf16Data gu = random_bf16(rng, n, 3.f);
      std::vector<float> want(size_t(rows) * I);
      for (int r = 0; r < rows; ++r)
        for (int i = 0; i < I; ++i) {
          const float a = gu.f[size_t(r) * 2 * I + i], b = gu.f[size_t(r) * 2 * I + I + i];
          want[size_t(r) * I + i] = a / (1.f + std::exp(-a)) * b;
        }
      Stream s;
      std::vector<bf16_bits> gu_bits(size_t(shift), bf16_bits(0));
      gu_bits.insert(gu_bits.end(), gu.bits.begin(), gu.bits.end());
      std::vector<float> gu_f32(size_t(shift), 0.f);
      gu_f32.insert(gu_f32.end(), gu.f.begin(), gu.f.end());
      DevBuf<bf16_bits> d_gu(gu_bits);
      DevBuf<float> d_gu32(gu_f32);
      DevBuf<bf16_bits> d_h(size_t(rows) * I), d_h32(size_t(rows) * I);
      d_h.poison();
      d_h32.poison();
      device_sync();
      gpu::swiglu(as_bf16(d_gu) + shift, rows, I, as_bf16(d_h), s);
      gpu::swiglu(d_gu32.get() + shift, rows, I, as_bf16(d_h32), s);
      s.sync();
      for (const auto* buf : {&d_h, &d_h32}) {
        const std::vector<float> got = bf16_to_float(std::span<const bf16_bits>(buf->download()));
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i)
          if (!(std::fabs(got[i] - want[i]) <= std::ldexp(std::fabs(want[i]), -8) + 1e-6f) && bad++ < 3)
            FAIL_CHECK("h[", i / I, ", ", i % I, "] = ", got[i], ", want ", want[i], " (a = ",
                       gu.f[(i / I) * 2 * I + i % I], ", b = ", gu.f[(i / I) * 2 * I + I + i % I], ")");
        CHECK(bad == 0);
      }
      gpu::swiglu(as_bf16(d_gu), 0, I, as_bf16(d_h), s);  // rows = 0: a no-op
      s.sync();
    }
}

TEST_CASE("grouped_experts: every strategy vs expert_forward_cpu, rows around the small/large threshold") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 21);
  Rng rng(22);
  for (int rows : {0, 1, 2, 17, 63, 64, 65, 130, 700}) {
    CAPTURE(rows);
    check_grouped_all_strategies(w, random_counts(rng, rows, 16), 100 + rows);
  }
}

TEST_CASE("grouped_experts: one expert with many rows (multi-pass streaming), the rest empty or tiny") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 23);
  std::vector<int> counts(16, 0);
  counts[5] = 41;  // > 5 passes of 8 rows
  counts[15] = 1;
  check_grouped_all_strategies(w, counts, 31);
  counts.assign(16, 0);
  counts[0] = 300;  // every row on one expert
  check_grouped_all_strategies(w, counts, 32);
}

// The tiny HF fixture's expert shape (H 64, I 32: one 16-byte chunk per lane in fewer than a warp's worth of
// chunks), where the model tests disagreed with HF: every strategy at small and large row counts.
TEST_CASE("grouped_experts cublas-padded: empty experts at both ends, the cap boundary, one expert with every row") {
  // rows = 512 over 16 experts: cap = 2 x 32 = 64 rows per expert. An expert with exactly 64 rows fits
  // (M_pad = 64); one with 65 does not (M_pad = 128 > 64: cublas-streams). check_grouped_all_strategies knows
  // which of the two must run (padded_fits) and compares every strategy with expert_forward_cpu.
  const MoeLayerWeights w = random_layer(256, 128, 16, 29);
  std::vector<int> counts(16, 0);
  for (int e = 2; e < 14; ++e) counts[size_t(e)] = 40;  // experts 0, 1, 14, 15 empty: batch = experts 2..13
  counts[2] = 64;                                        // 64 + 11 * 40 = 504
  counts[13] += 8;                                       // 512 rows, largest count exactly the cap
  REQUIRE(std::accumulate(counts.begin(), counts.end(), 0) == 512);
  REQUIRE(padded_fits(counts));
  check_grouped_all_strategies(w, counts, 33);
  counts[2] = 65;  // one row more on the largest expert, one less elsewhere: above the cap
  counts[3] -= 1;
  REQUIRE(!padded_fits(counts));
  check_grouped_all_strategies(w, counts, 34);
  // A single row on the last expert only (M_pad = 64, batch of 1), and 130 rows on expert 0 only (above the cap).
  counts.assign(16, 0);
  counts[15] = 1;
  check_grouped_all_strategies(w, counts, 35);
  counts.assign(16, 0);
  counts[0] = 130;
  check_grouped_all_strategies(w, counts, 36);
}

TEST_CASE("grouped_experts at the tiny HF fixture's shape (H=64, I=32), every strategy") {
  const MoeLayerWeights w = random_layer(64, 32, 16, 27);
  Rng rng(28);
  for (int rows : {1, 2, 5, 32, 33, 64, 200}) {
    CAPTURE(rows);
    check_grouped_all_strategies(w, random_counts(rng, rows, 16), 300 + rows);
  }
}

TEST_CASE("grouped_experts: H and I not multiples of 8 fall back to the per-expert cuBLAS loop, still right") {
  const MoeLayerWeights w = random_layer(100, 36, 6, 24);
  Rng rng(25);
  for (int rows : {1, 9, 70}) {
    CAPTURE(rows);
    check_grouped_all_strategies(w, random_counts(rng, rows, 6), 200 + rows);
  }
}

TEST_CASE("grouped_experts at the Phi-tiny expert shape (H=4096, I=448), every strategy") {
  const MoeLayerWeights& w = phi_layer();
  Rng rng(27);
  for (int rows : {2, 64, 96}) {
    CAPTURE(rows);
    check_grouped_all_strategies(w, random_counts(rng, rows, 16), 300 + rows);
  }
}

TEST_CASE("grouped_experts at Phi-tiny scale, rows = 8192 and 32768 (T = 4096, 16384): every strategy agrees") {
  // Every strategy on the same rows: sampled rows against expert_forward_cpu, all rows against
  // weight-stream. (Their times are chapter 02's `--bench --bench-experts ...`, not a test's business.)
  const MoeLayerWeights& w = phi_layer();
  const int H = w.hidden, E = w.num_experts;
  const DeviceExperts dev(w);
  const Cublas blas;
  Rng rng(81);
  for (int rows : {8192, 32768}) {
    CAPTURE(rows);
    std::vector<int> counts(size_t(E), 0);
    for (int r = 0; r < rows; ++r) ++counts[size_t(rng.next_u64() % unsigned(E))];
    const std::vector<int> off = offsets_of(counts);
    Stream s;
    DevBuf<bf16_bits> d_xp(size_t(rows) * H), d_yp(size_t(rows) * H);
    DevBuf<int> d_off(off);
    gpu::fill_random_bf16(as_bf16(d_xp), size_t(rows) * H, 1.f, 1234 + rows, s);
    s.sync();
    const std::vector<float> xp = bf16_to_float(std::span<const bf16_bits>(d_xp.download()));
    // Sampled rows: the first and last row of every expert, plus every 257th row.
    std::vector<std::pair<int, int>> sample;  // (row, expert)
    for (int e = 0; e < E; ++e)
      for (int r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r)
        if (r == off[size_t(e)] || r == off[size_t(e) + 1] - 1 || r % 257 == 0) sample.emplace_back(r, e);
    std::vector<float> want(sample.size() * H);
    for (size_t i = 0; i < sample.size(); ++i)
      expert_forward_cpu(w, sample[i].second, &xp[size_t(sample[i].first) * H], &want[i * H], true);

    gpu::GroupedWorkspace ws;
    std::vector<float> stream_y;
    for (gpu::GroupedStrategy st : {gpu::GroupedStrategy::WeightStream, gpu::GroupedStrategy::CublasGrouped,
                                    gpu::GroupedStrategy::CublasLoop, gpu::GroupedStrategy::CublasStreams,
                                    gpu::GroupedStrategy::CublasPadded}) {
      INFO("strategy " << std::string(gpu::grouped_strategy_name(st)));
      ws.strategy = st;
      auto run = [&] {
        gpu::grouped_experts(blas.h, dev.view, as_bf16(d_xp), d_off.get(), off.data(), rows, as_bf16(d_yp), ws, s);
      };
      d_yp.poison();
      device_sync();
      run();  // warm-up: workspace growth, cuBLAS heuristics
      s.sync();
      CHECK(ws.last_used == st);
      const std::vector<float> y = bf16_to_float(std::span<const bf16_bits>(d_yp.download()));
      std::vector<float> got(sample.size() * H);
      for (size_t i = 0; i < sample.size(); ++i)
        std::copy_n(&y[size_t(sample[i].first) * H], H, &got[i * H]);
      const double rel = rel_l2(got, want);
      CHECK_MESSAGE(rel <= kYTol, "sampled rows: rel-L2 vs expert_forward_cpu = ", rel);
      if (stream_y.empty()) {
        stream_y = y;
      } else {
        const double d = rel_l2(y, stream_y);
        CHECK_MESSAGE(d <= kYTol, "all rows: rel-L2 vs weight-stream = ", d);
      }
    }
    // cublas-padded's GEMMs alone (what GpuMoeLayer runs: its permute and combine read and write the padded
    // layout directly), on rows padded once here: 2 strided-batched GEMMs + SwiGLU over n x M_pad rows.
    {
      const int m_pad = gpu::padded_rows_per_expert(off.data(), E);
      REQUIRE(m_pad <= gpu::padded_capacity_per_expert(2.f, E, rows));  // uniform random counts
      DevBuf<bf16_bits> d_xpad(size_t(E) * m_pad * H), d_ypad(size_t(E) * m_pad * H);
      gpu::pad_rows(as_bf16(d_xp), d_off.get(), E, m_pad, H, as_bf16(d_xpad), s);
      auto run = [&] { gpu::grouped_experts_padded(blas.h, dev.view, as_bf16(d_xpad), off.data(), m_pad, as_bf16(d_ypad), ws, s); };
      run();
      s.sync();
      d_yp.poison();
      gpu::unpad_rows(as_bf16(d_ypad), d_off.get(), E, m_pad, rows, H, as_bf16(d_yp), s);
      s.sync();
      const std::vector<float> y = bf16_to_float(std::span<const bf16_bits>(d_yp.download()));
      const double d = rel_l2(y, stream_y);
      CHECK_MESSAGE(d <= kYTol, "grouped_experts_padded, all rows: rel-L2 vs weight-stream = ", d);
    }
  }
}

TEST_CASE("GpuMoeLayer vs moe_layer_reference: naive and grouped paths, sparsemixer and softmax-top-k") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 41);
  // 16/17 tokens straddle the default small/large threshold (32 rows at top-2), 2047/2048 the
  // cublas-grouped/cublas-streams one (4096 rows).
  const std::vector<int> Ts = {0, 1, 3, 16, 17, 32, 33, 64, 65, 512, 2047, 2048};
  for (RouterKind kind : {RouterKind::SparseMixer, RouterKind::SoftmaxTopK}) sweep_layer(w, kind, Ts, false, 42);
}

TEST_CASE("GpuMoeLayer: experts that get no tokens, and one expert that gets every token") {
  const MoeLayerWeights w = skewed_layer(256, 128, 16, 43);
  for (RouterKind kind : {RouterKind::SparseMixer, RouterKind::SoftmaxTopK})
    sweep_layer(w, kind, {1, 5, 40, 300}, true, 44);
}

TEST_CASE("GpuMoeLayer with cublas-padded: T = 0, 1, balanced, skewed (empty experts; one expert with every token)") {
  // Balanced routing runs padded (permute straight into the padded layout, combine straight from it); with
  // every token on expert 0 the cap is exceeded at T = 300 (M_pad 320 > cap 128): the GPU permute writes
  // contiguous rows and cublas-streams runs (sweep_layer checks which of the two ran from the GPU's routing).
  const MoeLayerWeights w = random_layer(256, 128, 16, 57);
  sweep_layer(w, RouterKind::SparseMixer, {0, 1, 2, 17, 64, 512, 2048, 3}, false, 58, ExpertStrategy::CublasPadded);
  sweep_layer(w, RouterKind::SoftmaxTopK, {5, 300}, false, 59, ExpertStrategy::CublasPadded);
  const MoeLayerWeights sk = skewed_layer(256, 128, 16, 43);
  for (RouterKind kind : {RouterKind::SparseMixer, RouterKind::SoftmaxTopK})
    sweep_layer(sk, kind, {1, 5, 40, 300}, true, 44, ExpertStrategy::CublasPadded);
  // Scalar paths of the padded kernels (H and I not multiples of 8).
  sweep_layer(random_layer(100, 36, 8, 45), RouterKind::SoftmaxTopK, {1, 7, 50}, false, 46, ExpertStrategy::CublasPadded);
}

TEST_CASE("GpuMoeLayer: H and I not multiples of 8 (scalar kernels, per-expert cuBLAS)") {
  const MoeLayerWeights w = random_layer(100, 36, 8, 45);
  sweep_layer(w, RouterKind::SoftmaxTopK, {1, 7, 50}, false, 46);
  sweep_layer(w, RouterKind::SparseMixer, {2, 50}, false, 47);
}

TEST_CASE("GpuMoeLayer at the tiny HF fixture's shape (H=64, I=32, E=16) and the mini model's (H=256, I=64)") {
  sweep_layer(random_layer(64, 32, 16, 53), RouterKind::SparseMixer, {1, 2, 16, 17, 32, 100}, false, 54);
  sweep_layer(random_layer(256, 64, 16, 55), RouterKind::SparseMixer, {1, 2, 16, 17, 32, 100}, false, 56);
}

TEST_CASE("GpuMoeLayer at the Phi-tiny layer shape (H=4096, I=448, E=16, top-2)") {
  const MoeLayerWeights& w = phi_layer();
  sweep_layer(w, RouterKind::SparseMixer, {1, 3, 40}, false, 49);
  sweep_layer(w, RouterKind::SparseMixer, {256}, false, 50, ExpertStrategy::CublasPadded);
}

TEST_CASE("GpuMoeLayer: every expert strategy forced on the grouped path gives the reference") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 51);
  GpuMoeLayer layer(w, RouterKind::SparseMixer, 2, kEps);
  Rng rng(52);
  // Forced weight-stream: T = 2..300 take the token-direct path (experts_direct_ok); 512 (w2 kernel's shared
  // memory) and 600 (> kDirectMaxRows rows) go through plan + permute + combine.
  for (int T : {2, 40, 300, 512, 600}) {
    const Bf16Data x = random_bf16(rng, size_t(T) * w.hidden);
    const MoeRefResult ref = moe_layer_reference(w, x.f, T, {RouterKind::SparseMixer, 2, kEps, true});
    for (ExpertStrategy st : {ExpertStrategy::WeightStream, ExpertStrategy::CublasGrouped, ExpertStrategy::CublasLoop,
                              ExpertStrategy::CublasStreams, ExpertStrategy::CublasPadded, ExpertStrategy::Auto}) {
      layer.set_expert_strategy(st);
      for (int rep = 0; rep < 3; ++rep) {  // the 2nd call of a sync-free forward captures a graph, the 3rd replays
        const auto got = layer.forward(x.bits, T, MoePath::Grouped);
        std::ostringstream what;
        what << "T=" << T << " strategy " << expert_strategy_name(st) << " (ran "
             << expert_strategy_name(layer.last_expert_strategy()) << "), call " << rep + 1;
        check_forward(w, x, T, RouterKind::SparseMixer, ref, got, what.str());
      }
    }
  }
  CHECK(parse_expert_strategy("cublas-streams") == ExpertStrategy::CublasStreams);
  CHECK(parse_expert_strategy("cublas-padded") == ExpertStrategy::CublasPadded);
  CHECK_THROWS_AS(parse_expert_strategy("fastest"), Error);
}

TEST_CASE("GpuMoeLayer::forward_device: graph replay gives the same bits as eager launches") {
  const MoeLayerWeights w = random_layer(256, 128, 16, 61);
  const int H = w.hidden;
  Rng rng(62);
  for (MoePath path : {MoePath::Grouped, MoePath::Naive})
    for (int T : {1, 3, 16}) {  // all take the host-sync-free route (rows <= small_rows_max = 32)
      INFO(path_str(path) << " path, T=" << T);
      const Bf16Data xa = random_bf16(rng, size_t(T) * H), xb = random_bf16(rng, size_t(T) * H);
      DevBuf<bf16_bits> d_xa(xa.bits), d_xb(xb.bits), d_y(size_t(T) * H);
      Stream s;
      GpuMoeLayer eager(w, RouterKind::SparseMixer, 2, kEps), graphed(w, RouterKind::SparseMixer, 2, kEps);
      eager.set_use_graphs(false);
      auto run = [&](GpuMoeLayer& l, const DevBuf<bf16_bits>& x) {
        d_y.poison();
        device_sync();
        l.forward_device(as_bf16(x), T, as_bf16(d_y), path, s);
        s.sync();
        return d_y.download();
      };
      const auto ya = run(eager, d_xa), yb = run(eager, d_xb);
      CHECK(ya != yb);
      // Alternate the inputs (as the benchmark does): eager, capture, replay for each of the two.
      for (int rep = 0; rep < 4; ++rep) {
        CAPTURE(rep);
        CHECK(run(graphed, d_xa) == ya);
        CHECK(run(graphed, d_xb) == yb);
      }
      CHECK_MESSAGE(graphed.cached_graphs() == 2, "CUDA graph capture did not happen (see the note on stderr)");
      // And the result is the reference's.
      const MoeRefResult ref = moe_layer_reference(w, xa.f, T, {RouterKind::SparseMixer, 2, kEps, true});
      check_forward(w, xa, T, RouterKind::SparseMixer, ref, graphed.forward(xa.bits, T, path), "graphed forward()");
      // T = 0 is a no-op.
      graphed.forward_device(as_bf16(d_xa), 0, as_bf16(d_y), path, s);
      s.sync();
    }
}

TEST_CASE("GpuMoeLayer: random-weights constructor, timings and bad arguments") {
  GpuMoeLayer layer(512, 64, 8, RouterKind::SoftmaxTopK, 2, kEps, 7);
  CHECK(layer.hidden() == 512);
  CHECK(layer.inter() == 64);
  CHECK(layer.num_experts() == 8);
  CHECK(layer.top_k() == 2);
  CHECK(layer.weight_bytes() == size_t(8 * 512 + 8 * 3 * 64 * 512) * 2);
  Rng rng(71);
  const Bf16Data x = random_bf16(rng, size_t(100) * 512);
  for (MoePath path : {MoePath::Grouped, MoePath::Naive}) {
    INFO(path_str(path));
    const auto r = layer.forward(x.bits, 100, path, true);
    const MoeTimings& t = r.timings;
    CHECK(t.total_ms > 0);
    CHECK(t.router_ms >= 0);
    CHECK(t.experts_ms > 0);
    CHECK(t.router_ms + t.routing_ms + t.permute_ms + t.experts_ms + t.combine_ms <= t.total_ms * 1.01 + 1e-3);
    // Random weights are unit-scale: y is finite and not all zero.
    double norm = 0;
    for (float v : r.y) {
      REQUIRE(std::isfinite(v));
      norm += double(v) * v;
    }
    CHECK(norm > 0);
  }
  const auto g = layer.forward(x.bits, 100, MoePath::Grouped), n = layer.forward(x.bits, 100, MoePath::Naive);
  CHECK(g.routing.ids == n.routing.ids);
  CHECK(rel_l2(g.y, n.y) <= kYTol);  // the two paths agree on the same random weights
  CHECK_THROWS_AS(layer.forward(x.bits, 99, MoePath::Grouped), Error);  // x has 100 rows
  CHECK_THROWS_AS(layer.forward(x.bits, -1, MoePath::Grouped), Error);
  CHECK_THROWS_AS(GpuMoeLayer(64, 32, 4, RouterKind::SparseMixer, 3, kEps, 1), Error);  // sparsemixer is top-2
  CHECK_THROWS_AS(GpuMoeLayer(64, 32, 4, RouterKind::SoftmaxTopK, 5, kEps, 1), Error);  // top-k > experts
}
