// The CPU reference of the whole PhiMoE model (common/model/phimoe_cpu.hpp).
//
// 1. Against HF transformers (tests/data/hf_tiny_phimoe/, scripts/hf_moe_fixture.py: PhimoeForCausalLM, fp32 on
//    the CPU, eager attention and experts, on the same bf16 weights). Only the summation order differs between
//    the two fp32 computations, so every recorded tensor must agree to ~1e-6 relative; we allow rel-L2 1e-5 per
//    token row (the fixture's values are O(1), the dot products have <= 64 terms: fp32 rounding of one sum is
//    ~sqrt(64) * 2^-24 ~ 5e-7 relative, compounded over 2 layers and the lm_head). A wrong RoPE convention, mask,
//    GQA head mapping, missing bias or wrong LayerNorm moves these by >= 1e-2. The embedding is a copy of bf16
//    values: exact. Expert ids must be identical (the fixture script keeps every sparsemixer decision >= 1e-4
//    from flipping) and the argmax of the logits identical at every position (we print its smallest HF top-2
//    gap, so a near tie would show).
// 2. Prefill + decode through the KV cache, and a batch of two prompts of different lengths, against the full
//    forward of each sequence alone: rel-L2 <= 1e-5 per row (each row's arithmetic does not depend on its
//    batch-mates, so they are in fact bit-identical today; the bound leaves room for blocked GEMMs later).
// 3. Sliding window on a generated model with window 4 over 12 tokens, against a naive forward written here
//    independently (full score matrix with an explicit mask, RoPE angles in double, LayerNorm and softmax in
//    double, the MoE through moe_layer_reference): rel-L2 <= 1e-5 per row.
#include <doctest/doctest.h>


#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>

#include "model/checkpoint.hpp"
#include "model/generator.hpp"
#include "model/phimoe_cpu.hpp"
#include "model/safetensors.hpp"
#include "moe/reference.hpp"
#include "util/check.hpp"
#include "tmp_dir.hpp"

using namespace eplab;
namespace fs = std::filesystem;

namespace {

const std::string kDir = std::string(EPLAB_TEST_DATA) + "/hf_tiny_phimoe";
constexpr double kTol = 1e-5;  // rel-L2 per row, fp32 summation order only (see the top of the file)
// The MoE block's own output is looser: its multipliers are softmaxes of router logits of magnitude up to ~40,
// whose fp32 rounding (~4e-6 absolute) goes straight into the multipliers (test_hf_fixture.cpp derives the
// per-token allowance); measured 7.5e-6. The residual stream around it is back under kTol.
constexpr double kTolMoe = 3e-5;

std::vector<float> fixture_tensor(const SafetensorsFile& f, const std::string& name, std::vector<std::int64_t> shape) {
  const TensorInfo* t = f.find(name);
  REQUIRE_MESSAGE(t != nullptr, "fixture.safetensors has no tensor '", name,
                  "': run scripts/hf_moe_fixture.py (scripts/README.md)");
  REQUIRE(t->dtype == Dtype::F32);
  REQUIRE_MESSAGE(t->shape == shape, name, " has shape ", t->shape_str());
  std::vector<float> v(size_t(t->numel()));
  std::memcpy(v.data(), f.bytes(*t).data(), v.size() * sizeof(float));
  return v;
}

std::span<const float> row(const std::vector<float>& m, int r, int n) { return {&m[size_t(r) * n], size_t(n)}; }

// Largest per-row rel-L2 of a against b ([rows, n]); CHECKs each row against tol.
double check_rows(const std::vector<float>& a, const std::vector<float>& b, int rows, int n, double tol,
                  const std::string& what) {
  REQUIRE(a.size() == size_t(rows) * n);
  REQUIRE(b.size() == size_t(rows) * n);
  double worst = 0;
  for (int r = 0; r < rows; ++r) {
    const double e = rel_l2(row(a, r, n), row(b, r, n));
    worst = std::max(worst, e);
    if (!(e <= tol)) FAIL_CHECK(what, ": row ", r, " rel-L2 ", e, " > ", tol);
  }
  return worst;
}

// Wraps the model's own MoE block and records what each layer asked of it (the fixture has moe.x / moe.y).
struct SpyMoe : MoeBlock {
  MoeBlock* inner;
  std::vector<std::vector<float>> xs, ys;
  explicit SpyMoe(MoeBlock* in) : inner(in) {}
  MoeBlockOutput forward(int layer, std::span<const float> x, int T) override {
    MoeBlockOutput o = inner->forward(layer, x, T);
    xs.emplace_back(x.begin(), x.end());
    ys.push_back(o.y);
    (void)layer;
    return o;
  }
};

using testing::TmpDir;

std::vector<int> fixture_ids(const SafetensorsFile& fx, int& T) {
  const TensorInfo* t = fx.find("input_ids");
  REQUIRE_MESSAGE(t != nullptr, "fixture.safetensors has no input_ids: run scripts/hf_moe_fixture.py");
  T = int(t->shape.at(0));
  const auto f = fixture_tensor(fx, "input_ids", {T});
  return std::vector<int>(f.begin(), f.end());
}

}  // namespace

TEST_CASE("phimoe cpu: full forward matches HF transformers' PhimoeForCausalLM on the fixture") {
  REQUIRE_MESSAGE(fs::exists(kDir + "/fixture.safetensors"), kDir, " is missing: run scripts/hf_moe_fixture.py");
  const Checkpoint ckpt = Checkpoint::open(kDir);
  const SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  PhimoeCpuModel model = PhimoeCpuModel::load(ckpt);
  const ModelConfig& c = model.config();
  const int H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers, E = c.num_local_experts;
  int T = 0;
  const std::vector<int> ids = fixture_ids(fx, T);

  // Spy on the MoE blocks through the plug-in interface (the local block stays the one doing the work).
  auto local = std::make_unique<LocalMoeBlock>(model.moe_weights(),
                                               MoeRefOptions{{c.router, c.num_experts_per_tok, c.router_jitter_noise}, false});
  auto spy = std::make_unique<SpyMoe>(local.get());
  SpyMoe* spy_ptr = spy.get();
  model.set_moe_block(std::move(spy));

  PhimoeTrace trace;
  trace.hidden = true;
  const std::vector<float> logits = model.forward_full(ids, &trace);
  REQUIRE(int(trace.layer_out.size()) == L);
  REQUIRE(int(spy_ptr->xs.size()) == L);

  const auto hf_embed = fixture_tensor(fx, "embed_out", {T, H});
  CHECK(trace.embed == hf_embed);  // a copy of bf16 values: exact

  for (int l = 0; l < L; ++l) {
    CAPTURE(l);
    const std::string p = "layers." + std::to_string(l) + ".";
    const double e_x = check_rows(spy_ptr->xs[l], fixture_tensor(fx, p + "moe.x", {T, H}), T, H, kTol, p + "moe.x");
    const double e_y = check_rows(spy_ptr->ys[l], fixture_tensor(fx, p + "moe.y", {T, H}), T, H, kTolMoe, p + "moe.y");
    const double e_o = check_rows(trace.layer_out[l], fixture_tensor(fx, p + "out", {T, H}), T, H, kTol, p + "out");
    const auto hf_ids = fixture_tensor(fx, p + "topk_ids", {T, 2});
    const Routing& r = trace.routing[l];
    REQUIRE(r.tokens == T);
    int same = 0;
    for (int i = 0; i < T * 2; ++i) same += r.ids[i] == int(hf_ids[i]);
    CHECK_MESSAGE(same == T * 2, "layer ", l, ": ", T * 2 - same, " expert choices differ from HF's");
    MESSAGE("layer ", l, ": worst row rel-L2 moe.x ", e_x, ", moe.y ", e_y, ", out ", e_o, "; experts ", same, "/",
            T * 2, " identical (", E, " experts)");
  }
  const double e_norm = check_rows(trace.norm_out, fixture_tensor(fx, "norm_out", {T, H}), T, H, kTol, "norm_out");
  const auto hf_logits = fixture_tensor(fx, "logits", {T, V});
  const double e_logits = check_rows(logits, hf_logits, T, V, kTol, "logits");
  double max_abs = 0, min_gap = INFINITY;
  for (int t = 0; t < T; ++t) {
    const auto ours = row(logits, t, V), hf = row(hf_logits, t, V);
    max_abs = std::max(max_abs, max_abs_diff(ours, hf));
    const int a = argmax(hf);
    float second = -INFINITY;
    for (int v = 0; v < V; ++v)
      if (v != a) second = std::max(second, hf[v]);
    min_gap = std::min(min_gap, double(hf[a] - second));
    CHECK_MESSAGE(argmax(ours) == a, "position ", t, ": argmax ", argmax(ours), " vs HF ", a);
  }
  MESSAGE("norm_out worst row rel-L2 ", e_norm, "; logits worst row rel-L2 ", e_logits, ", max |diff| ", max_abs,
          "; argmax identical at all ", T, " positions (smallest HF top-2 gap ", min_gap, ")");
}

TEST_CASE("phimoe cpu: prefill + decode through the KV cache equals the full forward") {
  const Checkpoint ckpt = Checkpoint::open(kDir);
  const SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  PhimoeCpuModel model = PhimoeCpuModel::load(ckpt);
  const int V = model.config().vocab_size;
  int T = 0;
  const std::vector<int> ids = fixture_ids(fx, T);
  const std::vector<float> full = model.forward_full(ids);

  // prefill 13 tokens, then a chunk of 5, then one at a time (the HF fixture's logits as well)
  PhimoeSequence s = model.new_sequence();
  PhimoeSequence* sp = &s;
  std::vector<float> cached;
  int done = 0;
  for (int n : std::vector<int>{13, 5}) {
    const std::vector<std::vector<int>> chunk{std::vector<int>(ids.begin() + done, ids.begin() + done + n)};
    const auto lg = model.forward({&sp, 1}, chunk, LogitRows::All);
    cached.insert(cached.end(), lg.begin(), lg.end());
    done += n;
  }
  for (; done < T; ++done) {
    const std::vector<std::vector<int>> one{{ids[done]}};
    const auto lg = model.forward({&sp, 1}, one, LogitRows::Last);
    cached.insert(cached.end(), lg.begin(), lg.end());
  }
  CHECK(s.length == T);
  CHECK(s.k[0].size() == size_t(T) * model.config().num_key_value_heads * model.config().head_dim);
  const double e = check_rows(cached, full, T, V, kTol, "cached vs full logits");
  const double e_hf = check_rows(cached, fixture_tensor(fx, "logits", {T, V}), T, V, kTol, "cached vs HF logits");
  MESSAGE("prefill 13 + chunk 5 + 14 single-token decodes: worst row rel-L2 ", e, " vs the full forward, ", e_hf,
          " vs HF");

  // A failed forward (token out of range) leaves the cache as it was.
  const std::vector<std::vector<int>> bad{{1, V}};
  CHECK_THROWS_AS(model.forward({&sp, 1}, bad), Error);
  CHECK(s.length == T);
  CHECK(s.k[0].size() == size_t(T) * model.config().num_key_value_heads * model.config().head_dim);
}

TEST_CASE("phimoe cpu: a batch of two prompts of different lengths equals running them one by one") {
  const Checkpoint ckpt = Checkpoint::open(kDir);
  const SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  PhimoeCpuModel model = PhimoeCpuModel::load(ckpt);
  const int V = model.config().vocab_size;
  int T = 0;
  const std::vector<int> ids = fixture_ids(fx, T);
  const std::vector<int> p0(ids.begin(), ids.begin() + 7), p1(ids.begin() + 9, ids.begin() + 9 + 19);

  // logits of the prefill: rows of p0 then rows of p1
  PhimoeSequence s0 = model.new_sequence(), s1 = model.new_sequence();
  std::vector<PhimoeSequence*> both{&s0, &s1};
  const std::vector<std::vector<int>> prompts{p0, p1};
  const auto batched = model.forward(both, prompts, LogitRows::All);
  const auto a = model.forward_full(p0), b = model.forward_full(p1);
  std::vector<float> alone(a);
  alone.insert(alone.end(), b.begin(), b.end());
  const double e = check_rows(batched, alone, int(p0.size() + p1.size()), V, kTol, "batched prefill");

  // one decode step for both, different positions
  const std::vector<std::vector<int>> step{{ids[30]}, {ids[31]}};
  const auto dec = model.forward(both, step, LogitRows::Last);
  std::vector<int> q0 = p0, q1 = p1;
  q0.push_back(ids[30]);
  q1.push_back(ids[31]);
  const auto f0 = model.forward_full(q0), f1 = model.forward_full(q1);
  std::vector<float> want(f0.end() - V, f0.end());
  want.insert(want.end(), f1.end() - V, f1.end());
  const double e_dec = check_rows(dec, want, 2, V, kTol, "batched decode");

  // greedy generation: the same tokens batched and alone
  const auto gen = model.generate({p0, p1}, 6);
  const auto g0 = model.generate({p0}, 6), g1 = model.generate({p1}, 6);
  REQUIRE(gen.size() == 2);
  CHECK(gen[0] == g0[0]);
  CHECK(gen[1] == g1[0]);
  CHECK(gen[0].size() == 6);
  // and greedy decoding is what the full forward's argmax says, token by token
  std::vector<int> seq = p1;
  for (int i = 0; i < 6; ++i) {
    const auto lg = model.forward_full(seq);
    seq.push_back(argmax(std::span<const float>(lg.end() - V, lg.end())));
  }
  CHECK(std::vector<int>(seq.begin() + long(p1.size()), seq.end()) == gen[1]);
  // eos stops a sequence right after it is emitted
  const auto stop = model.generate({p1}, 6, gen[1][2]);
  CHECK(stop[0] == std::vector<int>(gen[1].begin(), gen[1].begin() + 3));
  MESSAGE("batch of ", p0.size(), " + ", p1.size(), " tokens: prefill worst row rel-L2 ", e, ", decode ", e_dec,
          "; greedy tokens identical batched and alone");
}

TEST_CASE("phimoe cpu: loading a subset of experts; an MoE block built on the halves gives the same model") {
  const Checkpoint ckpt = Checkpoint::open(kDir);
  const SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  int T = 0;
  const std::vector<int> ids = fixture_ids(fx, T);
  PhimoeCpuModel full = PhimoeCpuModel::load(ckpt);
  const ModelConfig& c = full.config();
  const int E = c.num_local_experts, H = c.hidden_size;
  PhimoeLoadOptions lo_opt, hi_opt;
  lo_opt.experts = [&](int) { std::vector<int> v; for (int e = 0; e < E / 2; ++e) v.push_back(e); return v; };
  hi_opt.experts = [&](int) { std::vector<int> v; for (int e = E / 2; e < E; ++e) v.push_back(e); return v; };
  PhimoeCpuModel lo = PhimoeCpuModel::load(ckpt, lo_opt), hi = PhimoeCpuModel::load(ckpt, hi_opt);
  CHECK((*lo.moe_weights())[0].num_held() == E / 2);
  PhimoeLoadOptions none_opt;
  none_opt.experts = [](int) { return std::vector<int>{}; };
  const PhimoeCpuModel none = PhimoeCpuModel::load(ckpt, none_opt);  // a rank holding no expert: router only
  CHECK((*none.moe_weights())[0].num_held() == 0);
  CHECK((*none.moe_weights())[0].gate.size() == size_t(E) * H);
  // With half the experts and no EP block, a token routed to a missing expert is a clear error.
  CHECK_THROWS_WITH_AS(lo.forward_full(ids), doctest::Contains("is not loaded"), Error);

  // Two "ranks" in one process: route once, each half computes its own experts' share, then sum.
  struct TwoHalves : MoeBlock {
    std::shared_ptr<const std::vector<MoeLayerWeights>> a, b;
    MoeRefOptions opt;
    MoeBlockOutput forward(int layer, std::span<const float> x, int T) override {
      const MoeLayerWeights& wa = (*a)[layer];
      const MoeLayerWeights& wb = (*b)[layer];
      const int H = wa.hidden, E = wa.num_experts;
      const std::vector<float> gate = bf16_to_float(std::span<const bf16_bits>(wa.gate));
      std::vector<float> logits(size_t(T) * E);
      router_logits_cpu(x, gate, T, H, E, logits);
      MoeBlockOutput o;
      o.routing = route(opt.router.kind, logits, T, E, opt.router.top_k, opt.router.jitter_eps);
      o.y.assign(size_t(T) * H, 0.f);
      std::vector<float> tmp(H);
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < o.routing.k; ++j) {
          const int e = o.routing.id(t, j);
          const MoeLayerWeights& w = e < E / 2 ? wa : wb;
          const int local = int(std::find(w.expert_ids.begin(), w.expert_ids.end(), e) - w.expert_ids.begin());
          REQUIRE(local < w.num_held());
          expert_forward_cpu(w, local, &x[size_t(t) * H], tmp.data(), false);
          for (int h = 0; h < H; ++h) o.y[size_t(t) * H + h] += o.routing.weight(t, j) * tmp[h];
        }
      return o;
    }
  };
  auto two = std::make_unique<TwoHalves>();
  two->a = lo.moe_weights();
  two->b = hi.moe_weights();
  two->opt = MoeRefOptions{{c.router, c.num_experts_per_tok, c.router_jitter_noise}, false};
  lo.set_moe_block(std::move(two));
  const auto want = full.forward_full(ids);
  const auto got = lo.forward_full(ids);
  check_rows(got, want, T, c.vocab_size, kTol, "two halves vs all experts");
}

// ---------------------------------------------------------------- sliding window, against a naive forward

namespace {

// A plain, independent PhiMoE forward of one sequence: full [T, T] score matrix per head with an explicit mask,
// RoPE angles in double, LayerNorm and softmax in double; the MoE through moe_layer_reference.
std::vector<float> naive_forward(const Checkpoint& ck, const std::vector<int>& ids, int window,
                                 std::vector<Routing>* routing) {
  const ModelConfig& c = ck.config();
  const int T = int(ids.size()), H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const int NH = c.num_attention_heads, KVH = c.num_key_value_heads;
  auto get = [&](const std::string& n, std::vector<std::int64_t> s) { return ck.read_f32(n, s); };
  auto ln = [&](const std::vector<float>& x, const std::string& wn, const std::string& bn) {
    const auto w = get(wn, {H}), b = get(bn, {H});
    std::vector<float> y(x.size());
    for (int t = 0; t < T; ++t) {
      double m = 0, q = 0;
      for (int i = 0; i < H; ++i) m += x[size_t(t) * H + i];
      m /= H;
      for (int i = 0; i < H; ++i) q += std::pow(x[size_t(t) * H + i] - m, 2);
      const double sd = std::sqrt(q / H + c.rms_norm_eps);
      for (int i = 0; i < H; ++i) y[size_t(t) * H + i] = float((x[size_t(t) * H + i] - m) / sd * w[i] + b[i]);
    }
    return y;
  };
  auto proj = [&](const std::vector<float>& x, const std::string& wn, const std::string& bn, int out, int in,
                  bool bias) {
    const auto w = get(wn, {out, in});
    std::vector<float> b(out, 0.f);
    if (bias) b = get(bn, {out});
    std::vector<float> y(size_t(T) * out);
    for (int t = 0; t < T; ++t)
      for (int o = 0; o < out; ++o) {
        double s = b[o];
        for (int i = 0; i < in; ++i) s += double(x[size_t(t) * in + i]) * w[size_t(o) * in + i];
        y[size_t(t) * out + o] = float(s);
      }
    return y;
  };
  auto rope = [&](std::vector<float>& m, int heads) {  // pairs (i, i + D/2), as HF's rotate_half
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < D / 2; ++i) {
          const double ang = t * std::pow(double(c.rope_theta), -2.0 * i / D);
          float& a = m[(size_t(t) * heads + h) * D + i];
          float& b = m[(size_t(t) * heads + h) * D + i + D / 2];
          const double na = a * std::cos(ang) - b * std::sin(ang), nb = b * std::cos(ang) + a * std::sin(ang);
          a = float(na);
          b = float(nb);
        }
  };
  std::vector<float> x(size_t(T) * H);
  const auto emb = get(names::embed_tokens(), {V, H});
  for (int t = 0; t < T; ++t) std::copy_n(&emb[size_t(ids[t]) * H], H, &x[size_t(t) * H]);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto h = ln(x, names::layer_norm(l, "input", "weight"), names::layer_norm(l, "input", "bias"));
    auto q = proj(h, names::attn(l, "q", "weight"), names::attn(l, "q", "bias"), NH * D, H, c.attention_bias);
    auto k = proj(h, names::attn(l, "k", "weight"), names::attn(l, "k", "bias"), KVH * D, H, c.attention_bias);
    const auto v = proj(h, names::attn(l, "v", "weight"), names::attn(l, "v", "bias"), KVH * D, H, c.attention_bias);
    rope(q, NH);
    rope(k, KVH);
    std::vector<float> att(size_t(T) * NH * D, 0.f);
    for (int hq = 0; hq < NH; ++hq) {
      const int hk = hq * KVH / NH;
      std::vector<double> S(size_t(T) * T);  // scores with the mask applied as -inf
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) {
          const bool visible = j <= i && (window <= 0 || i - j < window);
          double s = 0;
          for (int d = 0; d < D; ++d) s += double(q[(size_t(i) * NH + hq) * D + d]) * k[(size_t(j) * KVH + hk) * D + d];
          S[size_t(i) * T + j] = visible ? s / std::sqrt(double(D)) : -INFINITY;
        }
      for (int i = 0; i < T; ++i) {
        double mx = -INFINITY, z = 0;
        for (int j = 0; j < T; ++j) mx = std::max(mx, S[size_t(i) * T + j]);
        for (int j = 0; j < T; ++j) z += std::exp(S[size_t(i) * T + j] - mx);
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = 0; j < T; ++j) acc += std::exp(S[size_t(i) * T + j] - mx) / z * v[(size_t(j) * KVH + hk) * D + d];
          att[(size_t(i) * NH + hq) * D + d] = float(acc);
        }
      }
    }
    const auto o = proj(att, names::attn(l, "o", "weight"), names::attn(l, "o", "bias"), H, NH * D, c.attention_bias);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    const auto h2 = ln(x, names::layer_norm(l, "post_attention", "weight"), names::layer_norm(l, "post_attention", "bias"));
    const MoeRefResult moe = moe_layer_reference(load_moe_layer(ck, l), h2, T,
                                                 MoeRefOptions{{c.router, c.num_experts_per_tok, c.router_jitter_noise}, false});
    if (routing) routing->push_back(moe.routing);
    for (size_t i = 0; i < x.size(); ++i) x[i] += moe.y[i];
  }
  const auto hn = ln(x, names::final_norm("weight"), names::final_norm("bias"));
  return proj(hn, names::lm_head("weight"), names::lm_head("bias"), V, H, c.lm_head_bias);
}

}  // namespace

TEST_CASE("phimoe cpu: sliding window (window 4) matches a naive windowed forward, full and through the cache") {
  TmpDir dir;
  ModelConfig c = generator_preset("mini");
  c.hidden_size = 32;
  c.intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.num_local_experts = 4;
  c.vocab_size = 64;
  c.max_position_embeddings = 64;
  c.sliding_window = 4;
  GeneratorOptions gen;
  gen.seed = 7;
  generate_model(dir.path.string(), c, gen);
  const Checkpoint ck = Checkpoint::open(dir.path.string());
  REQUIRE(ck.config().sliding_window == 4);
  PhimoeCpuModel model = PhimoeCpuModel::load(ck);
  const int T = 12, V = c.vocab_size, W = c.sliding_window;
  std::vector<int> ids(T);
  for (int t = 0; t < T; ++t) ids[t] = (7 * t + 3) % V;

  std::vector<Routing> naive_routing;
  const auto want = naive_forward(ck, ids, W, &naive_routing);
  PhimoeTrace trace;
  const auto got = model.forward_full(ids, &trace);
  for (int l = 0; l < c.num_hidden_layers; ++l) CHECK(trace.routing[l].ids == naive_routing[size_t(l)].ids);
  const double e_full = check_rows(got, want, T, V, kTol, "windowed forward vs naive");

  // The window matters here: without it the naive logits differ from position W on, and only there.
  const auto no_window = naive_forward(ck, ids, 0, nullptr);
  double same_before = 0, min_after = INFINITY;
  for (int t = 0; t < T; ++t) {
    const double d = rel_l2(row(no_window, t, V), row(want, t, V));
    if (t < W) same_before = std::max(same_before, d);
    else min_after = std::min(min_after, d);
  }
  CHECK(same_before <= 1e-6);
  CHECK(min_after >= 1e-3);

  // Through the cache: prefill 3 (shorter than the window), then one token at a time past the window.
  PhimoeSequence s = model.new_sequence();
  PhimoeSequence* sp = &s;
  std::vector<float> cached = model.forward({&sp, 1}, std::vector<std::vector<int>>{{ids[0], ids[1], ids[2]}});
  for (int t = 3; t < T; ++t) {
    const auto lg = model.forward({&sp, 1}, std::vector<std::vector<int>>{{ids[t]}}, LogitRows::Last);
    cached.insert(cached.end(), lg.begin(), lg.end());
  }
  const double e_cache = check_rows(cached, want, T, V, kTol, "windowed cache decode vs naive");
  MESSAGE("window ", W, ", ", T, " tokens: worst row rel-L2 ", e_full, " (full), ", e_cache,
          " (prefill 3 + decode); without the window the logits move by >= ", min_after, " from position ", W);
}

TEST_CASE("phimoe cpu: bad input is a clear error") {
  const Checkpoint ckpt = Checkpoint::open(kDir);
  PhimoeCpuModel model = PhimoeCpuModel::load(ckpt);
  const int ctx = model.config().max_position_embeddings;
  CHECK_THROWS_WITH_AS(model.forward_full(std::vector<int>{-1}), doctest::Contains("outside the vocabulary"), Error);
  CHECK_THROWS_WITH_AS(model.forward_full(std::vector<int>(size_t(ctx) + 1, 1)), doctest::Contains("context"), Error);
  CHECK_THROWS_WITH_AS(model.generate({{}}, 2), doctest::Contains("no new tokens"), Error);
  PhimoeSequence s = model.new_sequence();
  std::vector<PhimoeSequence*> twice{&s, &s};
  CHECK_THROWS_WITH_AS(model.forward(twice, std::vector<std::vector<int>>{{1}, {2}}), doctest::Contains("twice"), Error);
  CHECK(model.generate({{1, 2}}, 0) == std::vector<std::vector<int>>{{}});
}
