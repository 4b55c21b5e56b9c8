// The dense-model kernels of chapter 05 (embedding, LayerNorm, linear, RoPE, attention with KV cache)
// against independent references: the CPU model's own pieces (layer_norm_cpu, rope_cos_sin/rope_apply,
// checked against HF transformers by the unit tests) or fp64 loops written here; then all of them chained
// into the tiny HF PhiMoE fixture model and compared with transformers' recorded logits.
//
// Every output buffer is poisoned (0xFF bytes = NaN) before each kernel, so an element a kernel forgets
// fails. Every mismatch report names the element (row, head, dim) and the got/want values.
//
// Tolerances (u_bf16 = 2^-8: bf16 keeps 8 significant bits, so rounding moves a value by <= 2^-8 of it).
//  * embedding, kv_append, the fused residual sum bf16(x + r): bit-exact (copies; one fp32 add rounded once,
//    the same on both sides).
//  * LayerNorm y: |got - want| <= u_bf16 |want| + 1e-5 |w| (|xhat| + 1) + 1e-6. The first term is y's own
//    rounding; the second covers fp32 statistics against the reference's double (mean and 1/std are off by
//    ~1e-7 relative for rows of <= 4096; 1e-5 is 100x that and still far below one bf16 step, so a wrong
//    variance (unbiased instead of biased, eps outside the sqrt, a lost mean) fails). Plus rel-L2 <= 4e-3.
//  * linear, bf16 out: |got - want| <= u_bf16 |want| + 2 K 2^-24 (sum_k |x_k w_k| + |b|) (one rounding of
//    y, plus the worst-case fp32 summation error of any order), rel-L2 <= 4e-3. fp32 out (lm_head): the
//    same fp32 bound without the bf16 term, rel-L2 <= 1e-4 (typical ~1e-6; room for tensor-core
//    accumulation that truncates instead of rounding).
//  * RoPE: |got - want| <= u_bf16 |want| + 1e-6 (|a| + |b|): identical cos/sin tables (RopeTable is built
//    by rope_cos_sin), so only fp32 contraction (fma) and the final bf16 rounding differ.
//  * attention: |got - want| <= u_bf16 |want| + 1e-4 max|V| against an fp64 reference: fp32 exp and sums
//    over <= 300 keys err by ~1e-6 relative; 1e-4 max|V| (~4e-4) is still ~10x below what dropping or
//    adding one key at the window edge changes (~|V| / n). On failure the test also prints the distance to
//    references with the window off by one and with the GQA map h % kv_heads, to name the likely bug.
//  * full model vs HF: see the last test case.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "attention.cuh"
#include "embedding.cuh"
#include "kernel_test_util.cuh"
#include "layernorm.cuh"
#include "linear.cuh"
#include "model/checkpoint.hpp"
#include "model/phimoe_cpu.hpp"
#include "model/safetensors.hpp"
#include "moe/reference.hpp"
#include "moe_gpu.hpp"
#include "rope.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

constexpr double kUbf16 = 1.0 / 256;  // 2^-8
constexpr double kU32 = 1.0 / (1 << 24);

std::vector<float> widen(const std::vector<bf16_bits>& b) { return bf16_to_float(std::span<const bf16_bits>(b)); }
std::vector<float> download_f(const DevBuf<bf16_bits>& d) { return widen(d.download()); }

Bf16Data bf16_of(const std::vector<float>& f) {
  Bf16Data d;
  d.bits = float_to_bf16(std::span<const float>(f));
  d.f = widen(d.bits);
  return d;
}

struct Cublas {
  cublasHandle_t h{};
  Cublas() { CUBLAS_CHECK(cublasCreate(&h)); }
  ~Cublas() { cublasDestroy(h); }
  operator cublasHandle_t() const { return h; }
};

// Element-wise check with a bound per element. Returns "" when all pass, else the count and the first five
// offenders as "<what>[where] got g want w (bound b)". NaN always fails.
std::string close_report(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                         const std::function<double(size_t)>& bound,
                         const std::function<std::string(size_t)>& where) {
  if (got.size() != want.size()) return what + ": size " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
  std::ostringstream os;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - double(want[i]));
    const double b = bound(i);
    if (!(d <= b)) {
      if (bad < 5) os << (bad ? "; " : "") << what << where(i) << " got " << got[i] << " want " << want[i] << " (bound " << b << ")";
      ++bad;
    }
  }
  if (bad) os << "  [" << bad << " of " << got.size() << " out of bounds]";
  return os.str();
}

std::function<std::string(size_t)> rc_where(int cols) {
  return [cols](size_t i) { return "[row " + std::to_string(i / cols) + ", col " + std::to_string(i % cols) + "]"; };
}

// ------------------------------------------------------------------------------------------ embedding

TEST_CASE("embedding: rows gathered bit-exactly; out-of-range ids raise the error flag") {
  const int V = 1000;
  Stream s;
  for (int H : {64, 4096}) {
    Rng rng(100 + H);
    const Bf16Data table = random_bf16(rng, size_t(V) * H);
    DevBuf<bf16_bits> d_table(table.bits);
    DevBuf<int> d_err(std::vector<int>{0});
    for (int T : {1, 7, 64, 300}) {
      CAPTURE(H);
      CAPTURE(T);
      std::vector<int> ids(T);
      for (int t = 0; t < T; ++t) ids[t] = t == 0 ? V - 1 : t == 1 ? 0 : int(rng.next_u64() % V);
      DevBuf<int> d_ids(ids);
      DevBuf<bf16_bits> d_out(size_t(T) * H);
      d_out.poison();
      device_sync();
      gpu::embedding(as_bf16(d_table), V, H, d_ids.get(), T, as_bf16(d_out), d_err.get(), s);
      s.sync();
      CHECK_NOTHROW(gpu::embedding_check_error(d_err.get(), V, s));
      const auto got = d_out.download();
      std::vector<int> want(size_t(T) * H), gi(got.begin(), got.end());
      for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) want[size_t(t) * H + h] = table.bits[size_t(ids[t]) * H + h];
      const std::string m = int_mismatches("embedding bits", gi, want);
      CHECK_MESSAGE(m.empty(), m);
    }
    // Bad ids at rows 3 (-1) and 5 (V): flag raised, those rows zero, the others still exact.
    const int T = 8;
    std::vector<int> ids = {1, 2, 3, -1, 4, V, 6, 7};
    DevBuf<int> d_ids(ids);
    DevBuf<bf16_bits> d_out(size_t(T) * H);
    d_out.poison();
    device_sync();
    gpu::embedding(as_bf16(d_table), V, H, d_ids.get(), T, as_bf16(d_out), d_err.get(), s);
    s.sync();
    const int flag = d_err.download()[0];
    CHECK_MESSAGE((flag == 4 || flag == 6), "error flag ", flag, ", expected 4 or 6 (row 3 or 5, + 1)");
    CHECK_THROWS_WITH_AS(gpu::embedding_check_error(d_err.get(), V, s), doctest::Contains("outside the vocabulary"),
                         eplab::Error);
    CHECK(d_err.download()[0] == 0);  // reset by the check
    const auto got = d_out.download();
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        const bf16_bits want = (ids[t] < 0 || ids[t] >= V) ? bf16_bits(0) : table.bits[size_t(ids[t]) * H + h];
        if (got[size_t(t) * H + h] != want) {
          FAIL_CHECK("H ", H, " bad-id case: row ", t, " col ", h, " got bits ", got[size_t(t) * H + h], " want ", want);
          break;
        }
      }
  }
}

// ------------------------------------------------------------------------------------------ layernorm

TEST_CASE("layer_norm and add_layer_norm match layer_norm_cpu (fp32 statistics, bf16 out)") {
  Stream s;
  const float eps = 1e-5f;
  for (int n : {64, 200, 4096}) {
    Rng rng(7 + n);
    const Bf16Data w = bf16_of(random_normal(rng, n, 0.2f, 1.f));
    const Bf16Data b = bf16_of(random_normal(rng, n, 0.1f));
    DevBuf<bf16_bits> d_w(w.bits), d_b(b.bits);
    for (int rows : {1, 7, 64, 300}) {
      for (int mode = 0; mode < 3; ++mode) {  // 0 plain, 1 fused (sum separate), 2 fused in place (sum = x)
        CAPTURE(n);
        CAPTURE(rows);
        CAPTURE(mode);
        const Bf16Data x = bf16_of(random_normal(rng, size_t(rows) * n, 2.f, 3.f));  // mean 3, std 2
        const Bf16Data r = bf16_of(random_normal(rng, size_t(rows) * n, 1.f, -1.f));
        DevBuf<bf16_bits> d_x(x.bits), d_r(r.bits), d_sum(size_t(rows) * n), d_y(size_t(rows) * n);
        d_y.poison();
        d_sum.poison();
        device_sync();
        std::vector<float> src = x.f;  // what is normalised
        std::vector<bf16_bits> want_sum_bits;
        if (mode == 0) {
          gpu::layer_norm(as_bf16(d_x), as_bf16(d_w), as_bf16(d_b), rows, n, eps, as_bf16(d_y), s);
        } else {
          bf16* sum = mode == 1 ? as_bf16(d_sum) : as_bf16(d_x);
          gpu::add_layer_norm(as_bf16(d_x), as_bf16(d_r), sum, as_bf16(d_w), as_bf16(d_b), rows, n, eps,
                              as_bf16(d_y), s);
          want_sum_bits.resize(src.size());
          for (size_t i = 0; i < src.size(); ++i) {
            want_sum_bits[i] = float_to_bf16(x.f[i] + r.f[i]);  // one fp32 add, rounded once
            src[i] = bf16_to_float(want_sum_bits[i]);
          }
        }
        s.sync();
        if (mode != 0) {
          const auto got_sum = (mode == 1 ? d_sum : d_x).download();
          std::vector<int> gs(got_sum.begin(), got_sum.end()), ws(want_sum_bits.begin(), want_sum_bits.end());
          const std::string m = int_mismatches("residual sum bits", gs, ws);
          CHECK_MESSAGE(m.empty(), m);
        }
        std::vector<float> want(src.size());
        layer_norm_cpu(src, w.f, b.f, rows, n, eps, want);
        const auto got = download_f(d_y);
        // xhat from want: (want - b) / w (w ~ 1 +- 0.2, never 0 here)
        const std::string m = close_report(
            "y", got, want,
            [&](size_t i) {
              const int c = int(i % n);
              const double xhat = std::fabs((double(want[i]) - b.f[c]) / w.f[c]);
              return kUbf16 * std::fabs(want[i]) + 1e-5 * std::fabs(w.f[c]) * (xhat + 1) + 1e-6;
            },
            rc_where(n));
        CHECK_MESSAGE(m.empty(), m);
        CHECK(rel_l2(got, want) <= 4e-3);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ linear

TEST_CASE("linear (bf16 out) and linear_f32 (fp32 out) match an fp64 x W^T + b") {
  Stream s;
  Cublas cb;
  struct Shape { int K, N; bool bias, f32; };
  const Shape shapes[] = {{64, 48, true, false}, {1024, 200, true, false}, {256, 96, false, false},
                          {256, 1000, true, true}, {64, 512, false, true}};
  for (const Shape& sh : shapes) {
    Rng rng(31 + sh.K + sh.N);
    const Bf16Data w = random_bf16(rng, size_t(sh.N) * sh.K, 1.f / std::sqrt(float(sh.K)));
    const Bf16Data b = random_bf16(rng, sh.N, 0.5f);
    DevBuf<bf16_bits> d_w(w.bits), d_b(b.bits);
    for (int T : {1, 7, 64, 300}) {
      CAPTURE(sh.K);
      CAPTURE(sh.N);
      CAPTURE(sh.bias);
      CAPTURE(sh.f32);
      CAPTURE(T);
      const Bf16Data x = random_bf16(rng, size_t(T) * sh.K);
      DevBuf<bf16_bits> d_x(x.bits);
      std::vector<float> want(size_t(T) * sh.N), absum(want.size());
      for (int t = 0; t < T; ++t)
        for (int o = 0; o < sh.N; ++o) {
          double acc = sh.bias ? b.f[o] : 0.0, a = sh.bias ? std::fabs(b.f[o]) : 0.0;
          for (int k = 0; k < sh.K; ++k) {
            const double p = double(x.f[size_t(t) * sh.K + k]) * w.f[size_t(o) * sh.K + k];
            acc += p;
            a += std::fabs(p);
          }
          want[size_t(t) * sh.N + o] = float(acc);
          absum[size_t(t) * sh.N + o] = float(a);
        }
      const bf16* bias = sh.bias ? as_bf16(d_b) : nullptr;
      std::vector<float> got;
      if (sh.f32) {
        DevBuf<float> d_y(size_t(T) * sh.N);
        d_y.poison();
        device_sync();
        gpu::linear_f32(cb, as_bf16(d_x), T, sh.K, as_bf16(d_w), sh.N, bias, d_y.get(), s);
        s.sync();
        got = d_y.download();
      } else {
        DevBuf<bf16_bits> d_y(size_t(T) * sh.N);
        d_y.poison();
        device_sync();
        gpu::linear(cb, as_bf16(d_x), T, sh.K, as_bf16(d_w), sh.N, bias, as_bf16(d_y), s);
        s.sync();
        got = download_f(d_y);
      }
      const double round = sh.f32 ? 0.0 : kUbf16;
      const std::string m = close_report(
          "y", got, want,
          [&](size_t i) { return round * std::fabs(want[i]) + 2.0 * sh.K * kU32 * absum[i] + 1e-30; },
          rc_where(sh.N));
      CHECK_MESSAGE(m.empty(), m);
      CHECK(rel_l2(got, want) <= (sh.f32 ? 1e-4 : 4e-3));
    }
  }
}

// ------------------------------------------------------------------------------------------ rope

TEST_CASE("rope_inplace matches rope_cos_sin + rope_apply (rotate_half, fp32 angles)") {
  Stream s;
  const float theta = 10000.f;
  const int table_len = 4096;
  struct Case { int T, heads, kvh, D, pos0; };
  const Case cases[] = {{1, 4, 2, 32, 0},     {7, 4, 2, 32, 5},      {64, 16, 4, 128, 0},
                        {300, 16, 4, 128, 1000}, {3, 16, 4, 128, 4093}, {7, 4, 2, 16, 17}};
  for (const Case& c : cases) {
    CAPTURE(c.T);
    CAPTURE(c.heads);
    CAPTURE(c.kvh);
    CAPTURE(c.D);
    CAPTURE(c.pos0);
    gpu::RopeTable table(table_len, c.D, theta);
    Rng rng(c.T * 131 + c.D);
    const Bf16Data q = random_bf16(rng, size_t(c.T) * c.heads * c.D);
    const Bf16Data k = random_bf16(rng, size_t(c.T) * c.kvh * c.D);
    DevBuf<bf16_bits> d_q(q.bits), d_k(k.bits);
    device_sync();  // pageable uploads may still be in flight for a non-blocking stream
    gpu::rope_inplace(as_bf16(d_q), c.heads, as_bf16(d_k), c.kvh, c.T, c.pos0, table, s);
    s.sync();
    std::vector<float> cs(c.D), sn(c.D);
    const int half = c.D / 2;
    auto check = [&](const char* what, const Bf16Data& in, const DevBuf<bf16_bits>& d, int nh) {
      std::vector<float> want = in.f;
      for (int t = 0; t < c.T; ++t) {
        rope_cos_sin(c.pos0 + t, c.D, theta, cs.data(), sn.data());
        for (int h = 0; h < nh; ++h) rope_apply(&want[(size_t(t) * nh + h) * c.D], c.D, cs.data(), sn.data());
      }
      const auto got = download_f(d);
      const std::string m = close_report(
          what, got, want,
          [&](size_t i) {
            const size_t base = i - i % c.D;
            const int e = int(i % c.D) % half;
            return kUbf16 * std::fabs(want[i]) + 1e-6 * (std::fabs(in.f[base + e]) + std::fabs(in.f[base + e + half]));
          },
          [&](size_t i) {
            return "[t " + std::to_string(i / (size_t(nh) * c.D)) + ", head " + std::to_string((i / c.D) % nh) +
                   ", dim " + std::to_string(i % c.D) + "]";
          });
      CHECK_MESSAGE(m.empty(), m);
    };
    check("q", q, d_q, c.heads);
    check("k", k, d_k, c.kvh);
  }
  gpu::RopeTable small(8, 32, theta);
  DevBuf<bf16_bits> d_q(size_t(2) * 32);
  CHECK_THROWS_AS(gpu::rope_inplace(as_bf16(d_q), 1, nullptr, 0, 2, 7, small, s), eplab::Error);  // pos 8 > table
}

// ------------------------------------------------------------------------------------------ attention

// fp64 attention for tokens at positions pos0 + t over keys K/V [len, kvh, D] (len >= pos0 + T).
// gqa_mod: query head h reads kv head h % kvh instead of h / (heads / kvh) (a diagnostic, not PhiMoE).
std::vector<float> attention_ref(const std::vector<float>& q, int T, int heads, int kvh, int D, int pos0,
                                 const std::vector<float>& K, const std::vector<float>& V, int window,
                                 bool gqa_mod = false) {
  std::vector<float> out(size_t(T) * heads * D);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> p, o(D);
  for (int t = 0; t < T; ++t) {
    const int pos = pos0 + t, lo = window > 0 ? std::max(0, pos - window + 1) : 0;
    for (int h = 0; h < heads; ++h) {
      const int g = gqa_mod ? h % kvh : h / (heads / kvh);
      const float* qr = &q[(size_t(t) * heads + h) * D];
      p.assign(pos - lo + 1, 0.0);
      double mx = -INFINITY;
      for (int j = lo; j <= pos; ++j) {
        double d = 0;
        for (int e = 0; e < D; ++e) d += double(qr[e]) * K[(size_t(j) * kvh + g) * D + e];
        p[j - lo] = d * scale;
        mx = std::max(mx, p[j - lo]);
      }
      double sum = 0;
      for (double& x : p) sum += (x = std::exp(x - mx));
      std::fill(o.begin(), o.end(), 0.0);
      for (int j = lo; j <= pos; ++j)
        for (int e = 0; e < D; ++e) o[e] += p[j - lo] / sum * V[(size_t(j) * kvh + g) * D + e];
      for (int e = 0; e < D; ++e) out[(size_t(t) * heads + h) * D + e] = float(o[e]);
    }
  }
  return out;
}

// Compares one attention output with the reference; on failure prints what near-miss references it is
// closer to (window off by one, no window, GQA modulo map).
void check_attention(const std::vector<float>& got, const std::vector<float>& q, int T, int heads, int kvh, int D,
                     int pos0, const std::vector<float>& K, const std::vector<float>& V, int window) {
  const std::vector<float> want = attention_ref(q, T, heads, kvh, D, pos0, K, V, window);
  double vmax = 0;
  for (size_t i = 0; i < size_t(pos0 + T) * kvh * D; ++i) vmax = std::max(vmax, double(std::fabs(V[i])));
  const std::string m = close_report(
      "out", got, want, [&](size_t i) { return kUbf16 * std::fabs(want[i]) + 1e-4 * vmax; },
      [&](size_t i) {
        return "[t " + std::to_string(i / (size_t(heads) * D)) + " (pos " + std::to_string(pos0 + i / (size_t(heads) * D)) +
               "), head " + std::to_string((i / D) % heads) + ", dim " + std::to_string(i % D) + "]";
      });
  const double rel = rel_l2(got, want);
  if (!m.empty() || rel > 4e-3) {
    std::ostringstream os;
    os << "rel-L2 vs reference " << rel << "; vs window-1: "
       << rel_l2(got, attention_ref(q, T, heads, kvh, D, pos0, K, V, window > 0 ? std::max(1, window - 1) : 0))
       << ", window+1: " << rel_l2(got, attention_ref(q, T, heads, kvh, D, pos0, K, V, window > 0 ? window + 1 : 0))
       << ", no window: " << rel_l2(got, attention_ref(q, T, heads, kvh, D, pos0, K, V, 0))
       << ", GQA h % kv_heads: " << rel_l2(got, attention_ref(q, T, heads, kvh, D, pos0, K, V, window, true));
    MESSAGE(os.str());
  }
  CHECK_MESSAGE(m.empty(), m);
  CHECK(rel <= 4e-3);
}

struct HeadCfg { int heads, kvh, D; };
const HeadCfg kHeadCfgs[] = {{4, 2, 32}, {16, 4, 128}, {4, 2, 16}};

TEST_CASE("attention prefill: causal + sliding window + GQA vs fp64; cache rows beyond the sequence never read") {
  Stream s;
  for (const HeadCfg& hc : kHeadCfgs) {
    for (int T : {1, 7, 64, 300}) {
      for (int window : {0, 1, 5, 2047}) {
        CAPTURE(hc.heads);
        CAPTURE(hc.kvh);
        CAPTURE(hc.D);
        CAPTURE(T);
        CAPTURE(window);
        const int max_len = T + 5;
        Rng rng(T * 7 + window + hc.D);
        const Bf16Data q = random_bf16(rng, size_t(T) * hc.heads * hc.D);
        const Bf16Data k = random_bf16(rng, size_t(T) * hc.kvh * hc.D);
        const Bf16Data v = random_bf16(rng, size_t(T) * hc.kvh * hc.D);
        DevBuf<bf16_bits> d_q(q.bits), d_k(k.bits), d_v(v.bits);
        DevBuf<bf16_bits> kc(size_t(max_len) * hc.kvh * hc.D), vc(kc.size()), out(q.bits.size());
        kc.poison();  // rows >= T stay NaN: reading one would turn the output into NaN
        vc.poison();
        out.poison();
        device_sync();
        gpu::kv_append(as_bf16(d_k), as_bf16(d_v), T, hc.kvh, hc.D, 0, as_bf16(kc), as_bf16(vc), max_len, s);
        gpu::attention(as_bf16(d_q), T, hc.heads, hc.kvh, hc.D, 0, as_bf16(kc), as_bf16(vc), max_len, window,
                       as_bf16(out), s);
        s.sync();
        check_attention(download_f(out), q.f, T, hc.heads, hc.kvh, hc.D, 0, k.f, v.f, window);
      }
    }
  }
}

TEST_CASE("attention through the KV cache: prefill, single-token decode steps, a 3-token chunk") {
  Stream s;
  const HeadCfg hc{16, 4, 128};
  for (int window : {16, 0}) {
    CAPTURE(window);
    const int prefill = 20, max_len = 40;
    const std::vector<int> steps = {prefill, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3};  // ends at 35 < 40
    Rng rng(99 + window);
    const size_t kv_row = size_t(hc.kvh) * hc.D;
    DevBuf<bf16_bits> kc(size_t(max_len) * kv_row), vc(kc.size());
    kc.poison();
    vc.poison();
    device_sync();
    std::vector<float> K_all, V_all;           // every key/value so far (bf16 values)
    std::vector<bf16_bits> Kb_all, Vb_all;     // and their bits, for the cache check
    int pos0 = 0;
    for (size_t step = 0; step < steps.size(); ++step) {
      const int T = steps[step];
      CAPTURE(step);
      CAPTURE(pos0);
      CAPTURE(T);
      const Bf16Data q = random_bf16(rng, size_t(T) * hc.heads * hc.D);
      const Bf16Data k = random_bf16(rng, size_t(T) * kv_row);
      const Bf16Data v = random_bf16(rng, size_t(T) * kv_row);
      K_all.insert(K_all.end(), k.f.begin(), k.f.end());
      V_all.insert(V_all.end(), v.f.begin(), v.f.end());
      Kb_all.insert(Kb_all.end(), k.bits.begin(), k.bits.end());
      Vb_all.insert(Vb_all.end(), v.bits.begin(), v.bits.end());
      DevBuf<bf16_bits> d_q(q.bits), d_k(k.bits), d_v(v.bits), out(q.bits.size());
      out.poison();
      device_sync();
      gpu::kv_append(as_bf16(d_k), as_bf16(d_v), T, hc.kvh, hc.D, pos0, as_bf16(kc), as_bf16(vc), max_len, s);
      gpu::attention(as_bf16(d_q), T, hc.heads, hc.kvh, hc.D, pos0, as_bf16(kc), as_bf16(vc), max_len, window,
                     as_bf16(out), s);
      s.sync();
      check_attention(download_f(out), q.f, T, hc.heads, hc.kvh, hc.D, pos0, K_all, V_all, window);
      // The cache: rows [0, pos0 + T) are exactly what was appended, the rest still poison (0xFFFF).
      for (int which = 0; which < 2; ++which) {
        const auto got = (which ? vc : kc).download();
        const auto& want = which ? Vb_all : Kb_all;
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const bf16_bits w = i < want.size() ? want[i] : bf16_bits(0xFFFF);
          if (got[i] != w && bad++ == 0) first = i;
        }
        CHECK_MESSAGE(bad == 0, (which ? "V" : "K"), " cache: ", bad, " elements wrong, first at row ",
                      first / kv_row, " (rows [0, ", pos0 + T, ") appended, the rest must be untouched)");
      }
      pos0 += T;
    }
  }
  // A sequence longer than the cache is an error, not a write past its end.
  DevBuf<bf16_bits> kc(size_t(4) * 2 * 16), vc(kc.size()), k(size_t(2) * 2 * 16);
  CHECK_THROWS_AS(gpu::kv_append(as_bf16(k), as_bf16(k), 2, 2, 16, 3, as_bf16(kc), as_bf16(vc), 4, s), eplab::Error);
}

// ------------------------------------------------------------------------------------------ the whole model

// The tiny HF PhiMoE fixture (tests/data/hf_tiny_phimoe, made by scripts/hf_moe_fixture.py: 2 layers, H 64,
// 4 heads / 2 KV heads, D 16, 16 experts, V 512, 32 tokens) run through the kernels above plus GpuMoeLayer,
// compared with transformers' fp32 run (fixture.safetensors), stage by stage so a failure names the stage.
//
// Tolerances. Our chain stores every activation in bf16 (h, q, k, v after RoPE, attention out, o, the
// residual stream, the MoE input and output, the final norm): ~10 roundings per layer, each moving a
// value by up to 2^-8 (RMS ~1e-3 relative). Independent roundings add in quadrature to ~5e-3 per layer;
// LayerNorm and attention pass relative errors on roughly unchanged, so after 2 layers + final norm we
// expect ~1e-2 at the logits. rel-L2 <= 3e-2 for every compared stage (MoE input, layer output, final norm,
// logits) leaves 3x room; real bugs (RoPE pairs interleaved instead of halves, wrong GQA map, missing
// bias, a dropped residual, off-by-one causal mask) give >= 1e-1. Argmax: must equal HF's on every row
// whose top-2 HF logits differ by more than 4 * 3e-2 * rms(row) (each of the two logits may be off by up
// to ~2x the RMS error that rel-L2 3e-2 allows). Routing: bf16 activations can flip a sparsemixer decision
// where HF's margin is small; flips are printed per layer (a flipped token changes that token's MoE output,
// and if the logits check fails while flips are reported, look there first).
namespace fixture {

const std::string kDir = std::string(EPLAB_TEST_DATA) + "/hf_tiny_phimoe";
constexpr double kTol = 3e-2;

std::vector<float> get(const SafetensorsFile& f, const std::string& name, std::vector<std::int64_t> shape) {
  const TensorInfo* t = f.find(name);
  REQUIRE_MESSAGE(t != nullptr, "fixture.safetensors has no tensor '", name, "' (scripts/hf_moe_fixture.py)");
  REQUIRE_MESSAGE(t->dtype == Dtype::F32, name, " is not F32");
  REQUIRE_MESSAGE(t->shape == shape, name, " has shape ", t->shape_str());
  std::vector<float> v(size_t(t->numel()));
  const auto bytes = f.bytes(*t);
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
  return v;
}

// One layer's weights on the GPU, its MoE and its KV cache.
struct Layer {
  DevBuf<bf16_bits> ln_in_w, ln_in_b, ln_post_w, ln_post_b, qw, qb, kw, kb, vw, vb, ow, ob, kc, vc;
  std::unique_ptr<GpuMoeLayer> moe;
};

// What one forward records, rows of this forward only.
struct Trace {
  std::vector<std::vector<float>> moe_x, moe_y, resid, layer_out;  // [L][T, H]; resid = x + attention
  std::vector<Routing> routing;                      // [L]
  std::vector<float> embed, norm_out, logits;        // [T, H], [T, H], [T, V]
};

class GpuPhimoe {
 public:
  GpuPhimoe(const Checkpoint& ckpt, int max_len) : c_(ckpt.config()), max_len_(max_len),
      rope_(max_len, ckpt.config().head_dim, ckpt.config().rope_theta) {
    const std::int64_t H = c_.hidden_size, V = c_.vocab_size, D = c_.head_dim;
    const std::int64_t NQ = c_.num_attention_heads * D, NKV = c_.num_key_value_heads * D;
    REQUIRE(c_.attention_bias);
    REQUIRE(c_.lm_head_bias);
    REQUIRE(!c_.tie_word_embeddings);
    auto up = [&](const std::string& name, std::vector<std::int64_t> shape) {
      return DevBuf<bf16_bits>(ckpt.read_bf16(name, shape));
    };
    embed_ = up(names::embed_tokens(), {V, H});
    for (int l = 0; l < c_.num_hidden_layers; ++l) {
      Layer L;
      L.ln_in_w = up(names::layer_norm(l, "input", "weight"), {H});
      L.ln_in_b = up(names::layer_norm(l, "input", "bias"), {H});
      L.ln_post_w = up(names::layer_norm(l, "post_attention", "weight"), {H});
      L.ln_post_b = up(names::layer_norm(l, "post_attention", "bias"), {H});
      L.qw = up(names::attn(l, "q", "weight"), {NQ, H});
      L.qb = up(names::attn(l, "q", "bias"), {NQ});
      L.kw = up(names::attn(l, "k", "weight"), {NKV, H});
      L.kb = up(names::attn(l, "k", "bias"), {NKV});
      L.vw = up(names::attn(l, "v", "weight"), {NKV, H});
      L.vb = up(names::attn(l, "v", "bias"), {NKV});
      L.ow = up(names::attn(l, "o", "weight"), {H, NQ});
      L.ob = up(names::attn(l, "o", "bias"), {H});
      L.kc = DevBuf<bf16_bits>(size_t(max_len) * NKV);
      L.vc = DevBuf<bf16_bits>(size_t(max_len) * NKV);
      L.kc.poison();  // positions not yet appended are NaN: reading one poisons the logits
      L.vc.poison();
      L.moe = std::make_unique<GpuMoeLayer>(load_moe_layer(ckpt, l), c_.router, c_.num_experts_per_tok,
                                            c_.router_jitter_noise);
      layers_.push_back(std::move(L));
    }
    fw_ = up(names::final_norm("weight"), {H});
    fb_ = up(names::final_norm("bias"), {H});
    lw_ = up(names::lm_head("weight"), {V, H});
    lb_ = up(names::lm_head("bias"), {V});
    device_sync();
  }

  // Appends `ids` at positions pos_, pos_ + 1, ... and returns the trace (logits for every new row).
  Trace forward(const std::vector<int>& ids) {
    const int T = int(ids.size()), H = c_.hidden_size, V = c_.vocab_size, D = c_.head_dim;
    const int NH = c_.num_attention_heads, KVH = c_.num_key_value_heads, NQ = NH * D, NKV = KVH * D;
    const float eps = c_.rms_norm_eps;
    Trace tr;
    DevBuf<int> d_ids(ids), d_err(std::vector<int>{0});
    DevBuf<bf16_bits> x(size_t(T) * H), h(x.size()), q(size_t(T) * NQ), k(size_t(T) * NKV), v(k.size()),
        a(q.size()), o(x.size()), y(x.size());
    DevBuf<float> logits(size_t(T) * V);
    for (auto* b : {&x, &h, &q, &k, &v, &a, &o, &y}) b->poison();
    logits.poison();
    device_sync();

    gpu::embedding(as_bf16(embed_), V, H, d_ids.get(), T, as_bf16(x), d_err.get(), s_);
    gpu::embedding_check_error(d_err.get(), V, s_);
    tr.embed = download_f(x);
    for (int l = 0; l < c_.num_hidden_layers; ++l) {
      Layer& L = layers_[l];
      if (l == 0)
        gpu::layer_norm(as_bf16(x), as_bf16(L.ln_in_w), as_bf16(L.ln_in_b), T, H, eps, as_bf16(h), s_);
      else  // x += previous layer's MoE output; h = LN_in(x)
        gpu::add_layer_norm(as_bf16(x), as_bf16(y), as_bf16(x), as_bf16(L.ln_in_w), as_bf16(L.ln_in_b), T, H, eps,
                            as_bf16(h), s_);
      gpu::linear(cb_, as_bf16(h), T, H, as_bf16(L.qw), NQ, as_bf16(L.qb), as_bf16(q), s_);
      gpu::linear(cb_, as_bf16(h), T, H, as_bf16(L.kw), NKV, as_bf16(L.kb), as_bf16(k), s_);
      gpu::linear(cb_, as_bf16(h), T, H, as_bf16(L.vw), NKV, as_bf16(L.vb), as_bf16(v), s_);
      gpu::rope_inplace(as_bf16(q), NH, as_bf16(k), KVH, T, pos_, rope_, s_);
      gpu::kv_append(as_bf16(k), as_bf16(v), T, KVH, D, pos_, as_bf16(L.kc), as_bf16(L.vc), max_len_, s_);
      gpu::attention(as_bf16(q), T, NH, KVH, D, pos_, as_bf16(L.kc), as_bf16(L.vc), max_len_, c_.sliding_window,
                     as_bf16(a), s_);
      gpu::linear(cb_, as_bf16(a), T, NQ, as_bf16(L.ow), H, as_bf16(L.ob), as_bf16(o), s_);
      // x += o; h = LN_post(x)
      gpu::add_layer_norm(as_bf16(x), as_bf16(o), as_bf16(x), as_bf16(L.ln_post_w), as_bf16(L.ln_post_b), T, H, eps,
                          as_bf16(h), s_);
      s_.sync();
      // The MoE through its host API (it returns the routing for the flip report); y comes back as the bf16
      // values widened to float, so narrowing it again is exact.
      const std::vector<bf16_bits> hb = h.download();
      GpuMoeLayer::Result r = L.moe->forward(hb, T, MoePath::Grouped);
      y.upload(float_to_bf16(std::span<const float>(r.y)));
      device_sync();  // a pageable upload may still be in flight for the non-blocking stream
      tr.moe_x.push_back(widen(hb));
      tr.moe_y.push_back(r.y);
      tr.routing.push_back(std::move(r.routing));
      const std::vector<float> xf = download_f(x);
      tr.resid.push_back(xf);
      std::vector<float> out(xf.size());
      for (size_t i = 0; i < xf.size(); ++i) out[i] = round_bf16(xf[i] + r.y[i]);  // what add_layer_norm stores
      tr.layer_out.push_back(std::move(out));
    }
    gpu::add_layer_norm(as_bf16(x), as_bf16(y), as_bf16(x), as_bf16(fw_), as_bf16(fb_), T, H, eps, as_bf16(h), s_);
    gpu::linear_f32(cb_, as_bf16(h), T, H, as_bf16(lw_), V, as_bf16(lb_), logits.get(), s_);
    s_.sync();
    tr.norm_out = download_f(h);
    tr.logits = logits.download();
    pos_ += T;
    return tr;
  }

 private:
  ModelConfig c_;
  int max_len_ = 0, pos_ = 0;
  gpu::RopeTable rope_;
  Stream s_;
  Cublas cb_;
  DevBuf<bf16_bits> embed_, fw_, fb_, lw_, lb_;
  std::vector<Layer> layers_;
};

// Rows [r0, r0 + n) of a [*, cols] matrix.
std::vector<float> rows_of(const std::vector<float>& m, int cols, int r0, int n) {
  return std::vector<float>(m.begin() + size_t(r0) * cols, m.begin() + size_t(r0 + n) * cols);
}

// rel-L2 check of one stage, printed either way.
// The rows of a [T, cols] matrix that are not in `skip`.
std::vector<float> rows_except(const std::vector<float>& m, int cols, const std::set<int>& skip) {
  std::vector<float> out;
  const int T = int(m.size() / size_t(cols));
  for (int t = 0; t < T; ++t)
    if (!skip.count(t)) out.insert(out.end(), m.begin() + size_t(t) * cols, m.begin() + size_t(t + 1) * cols);
  return out;
}

// rel-L2 check of one stage, printed either way, over the rows not in `skip` (rows a routing flip changed).
void stage(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
           const std::set<int>& skip = {}, int cols = 1) {
  const std::vector<float> g = skip.empty() ? got : rows_except(got, cols, skip);
  const std::vector<float> w = skip.empty() ? want : rows_except(want, cols, skip);
  const double e = rel_l2(g, w);
  MESSAGE(what, ": rel-L2 ", e, " (max |diff| ", max_abs_diff(g, w), ")",
          skip.empty() ? "" : (", " + std::to_string(skip.size()) + " flipped rows left out").c_str());
  CHECK_MESSAGE(e <= kTol, what, ": rel-L2 ", e, " > ", kTol);
}

// Argmax agreement on rows where HF's top-2 gap exceeds the margin (see the header of this section).
void argmax_check(const std::string& what, const std::vector<float>& got, const std::vector<float>& hf, int T, int V,
                  const std::set<int>& skip = {}) {
  int checked = 0, agree_all = 0;
  for (int t = 0; t < T; ++t) {
    if (skip.count(t)) continue;
    const std::span<const float> hr(&hf[size_t(t) * V], V), gr(&got[size_t(t) * V], V);
    std::vector<float> sorted(hr.begin(), hr.end());
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    double ss = 0;
    for (float x : hr) ss += double(x) * x;
    const double margin = 4 * kTol * std::sqrt(ss / V);
    const int a_hf = argmax(hr), a_us = argmax(gr);
    agree_all += a_hf == a_us;
    if (sorted[0] - sorted[1] > margin) {
      ++checked;
      CHECK_MESSAGE(a_hf == a_us, what, " row ", t, ": argmax ", a_us, " (logit ", gr[a_us], "), HF ", a_hf,
                    " (logit ", hr[a_hf], ", gap to 2nd ", sorted[0] - sorted[1], " > margin ", margin, ")");
    }
  }
  MESSAGE(what, ": argmax checked on ", checked, " of ", T, " rows (gap > margin); equal to HF on ", agree_all, " of ", T);
  CHECK(checked >= (T - int(skip.size())) / 4);  // the check must cover a good part of the rows to mean anything
}

// A bf16 model may route a row differently from HF where HF's decision was a near-tie: its MoE input differs
// from HF's by the stages' rounding (rel-L2 ~1e-2 by layer 1), and so do its router logits. Each flipped row
// must have an HF decision margin (routing_margin: the gap between the deciding logit and its competitor,
// relative to the logits' scale) below kFlipMargin, 5x the relative error of the router's input; a routing
// bug flips rows with large margins. Flipped rows are added to `flipped` and left out of later comparisons.
constexpr float kFlipMargin = 5e-2f;
// A multiplier more than kWeightFlip from HF's with the same experts is a flip of sparsemixer's threshold
// mask (a hard decision at 2 * jitter_eps): counted and left out like an expert flip.
constexpr float kWeightFlip = 1e-2f;
void routing_report(const std::string& what, const Routing& got, const std::vector<float>& hf_ids,
                    const std::vector<float>& hf_w, const std::vector<float>& hf_logits, int E, float eps, int row0,
                    std::set<int>& flipped) {
  int flips = 0;
  std::string list;
  for (int t = 0; t < got.tokens; ++t) {
    bool differs = false, weight_only = true;
    for (int j = 0; j < got.k; ++j) {
      const bool id_differs = got.id(t, j) != int(hf_ids[size_t(row0 + t) * 2 + j]);
      differs |= id_differs || std::fabs(got.weight(t, j) - hf_w[size_t(row0 + t) * 2 + j]) > kWeightFlip;
      weight_only &= !id_differs;
    }
    if (!differs) continue;
    ++flips;
    if (weight_only) {
      list += " row " + std::to_string(row0 + t) + " (multiplier: mask near-tie)";
      flipped.insert(row0 + t);
      continue;
    }
    const float m = routing_margin(RouterKind::SparseMixer, hf_logits, row0 + t, E, eps);
    list += " row " + std::to_string(row0 + t) + " (HF margin " + std::to_string(m) + ")";
    CHECK_MESSAGE(m <= kFlipMargin, what, " row ", row0 + t, ": routed differently from HF although HF's decision "
                  "margin ", m, " > ", kFlipMargin, " (not a near-tie: a routing bug)");
    flipped.insert(row0 + t);
  }
  MESSAGE(what, ": ", flips, " of ", got.tokens, " rows routed differently from HF", list);
}

}  // namespace fixture

TEST_CASE("tiny HF PhiMoE end to end on the GPU kernels: embedding .. lm_head vs transformers' logits") {
  using namespace fixture;
  namespace fs = std::filesystem;
  REQUIRE_MESSAGE((fs::exists(kDir + "/fixture.safetensors") && fs::exists(kDir + "/model.safetensors")),
                  kDir, " is missing (scripts/hf_moe_fixture.py makes it)");
  const Checkpoint ckpt = Checkpoint::open(kDir);
  const SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  const ModelConfig& c = ckpt.config();
  const int H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  const TensorInfo* ti = fx.find("input_ids");
  REQUIRE(ti != nullptr);
  const int T = int(ti->shape.at(0));
  const auto ids_f = get(fx, "input_ids", {T});
  const std::vector<int> ids(ids_f.begin(), ids_f.end());
  const auto hf_logits = get(fx, "logits", {T, V});

  SUBCASE("prefill of the whole sequence, every stage compared") {
    GpuPhimoe m(ckpt, T + 8);
    const Trace tr = m.forward(ids);
    const auto hf_embed = get(fx, "embed_out", {T, H});
    CHECK_MESSAGE(max_abs_diff(tr.embed, hf_embed) == 0.0, "embedding must equal HF's exactly (bf16 table rows)");
    std::set<int> flipped;  // rows routed differently from HF in this layer or an earlier one
    for (int l = 0; l < L; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      stage("layer " + std::to_string(l) + " MoE input (attention + post-norm)", tr.moe_x[l],
            get(fx, p + "moe.x", {T, H}), flipped, H);
      routing_report("layer " + std::to_string(l), tr.routing[l], get(fx, p + "topk_ids", {T, 2}),
                     get(fx, p + "topk_weights", {T, 2}), get(fx, p + "router_logits", {T, c.num_local_experts}),
                     c.num_local_experts,
                     c.router_jitter_noise, 0, flipped);
      // Where a layer's output error comes from: the MoE's output, or the residual stream x + attention
      // (HF's is out - moe.y).
      const auto hf_y = get(fx, p + "moe.y", {T, H}), hf_out = get(fx, p + "out", {T, H});
      std::vector<float> hf_resid(hf_out.size());
      for (size_t i = 0; i < hf_out.size(); ++i) hf_resid[i] = hf_out[i] - hf_y[i];
      stage("layer " + std::to_string(l) + " MoE output", tr.moe_y[l], hf_y, flipped, H);
      stage("layer " + std::to_string(l) + " residual x + attention", tr.resid[l], hf_resid, flipped, H);
      stage("layer " + std::to_string(l) + " output (residual stream)", tr.layer_out[l], get(fx, p + "out", {T, H}),
            flipped, H);
    }
    CHECK_MESSAGE(flipped.size() * 8 <= size_t(T), flipped.size(), " of ", T, " rows flipped: more than near-ties");
    stage("final norm", tr.norm_out, get(fx, "norm_out", {T, H}), flipped, H);
    stage("logits (prefill)", tr.logits, hf_logits, flipped, V);
    argmax_check("prefill", tr.logits, hf_logits, T, V, flipped);
  }

  SUBCASE("prefill of a prefix, then one token at a time through the KV cache") {
    const int prefill = T / 2;
    GpuPhimoe m(ckpt, T);  // exactly T rows: decoding past the cache would throw
    std::set<int> flipped;
    auto note_flips = [&](const Trace& tr, int row0) {
      for (int l = 0; l < L; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        routing_report("layer " + std::to_string(l) + " rows from " + std::to_string(row0), tr.routing[l],
                       get(fx, p + "topk_ids", {T, 2}), get(fx, p + "topk_weights", {T, 2}),
                       get(fx, p + "router_logits", {T, c.num_local_experts}),
                       c.num_local_experts, c.router_jitter_noise, row0, flipped);
      }
    };
    const Trace first = m.forward(std::vector<int>(ids.begin(), ids.begin() + prefill));
    note_flips(first, 0);
    std::vector<float> all = first.logits;
    double worst = 0;
    int worst_pos = -1;
    for (int p = prefill; p < T; ++p) {
      const Trace tr = m.forward({ids[p]});
      note_flips(tr, p);
      const double e = rel_l2(tr.logits, rows_of(hf_logits, V, p, 1));
      if (!flipped.count(p) && e > worst) worst = e, worst_pos = p;
      all.insert(all.end(), tr.logits.begin(), tr.logits.end());
    }
    MESSAGE("decode steps: worst single-row logits rel-L2 ", worst, " at position ", worst_pos, " (rows with a "
            "routing flip left out)");
    CHECK_MESSAGE(flipped.size() * 8 <= size_t(T), flipped.size(), " of ", T, " rows flipped: more than near-ties");
    stage("logits (prefill " + std::to_string(prefill) + " + " + std::to_string(T - prefill) + " decode steps)", all,
          hf_logits, flipped, V);
    argmax_check("prefill + decode", all, hf_logits, T, V, flipped);
  }
}

}  // namespace
