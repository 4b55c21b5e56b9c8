// The CPU reference against HF transformers' `phimoe`, on a fixture that scripts/hf_moe_fixture.py recorded:
// a tiny random PhimoeForCausalLM saved with save_pretrained (tests/data/hf_tiny_phimoe/, bf16, the real
// checkpoint's tensor names), and per layer the MoE block's input, router logits, selected experts,
// multipliers and output (fixture.safetensors, fp32, HF run on the CPU in fp32 with eager experts).
//
// The checkpoint goes through the project's own loader (Checkpoint::open, load_moe_layer); the comparison is
// fp32 against fp32 on identical weights (the bf16 values), so only summation order differs. Tolerances:
//  * router logits: |ours - hf| <= 2 (H+1) u sum_h |x_h g_eh|, u = 2^-24 -- the worst-case error of any fp32
//    summation order of H products (HF's GEMM) plus our final rounding (we accumulate in double).
//  * expert ids: identical. The fixture script only accepts inputs whose every sparsemixer decision (top-3 order,
//    each 2*eps mask test) is at least 1e-4 (relative) from flipping, far above the ~1e-7 differences here.
//  * multipliers: from HF's own logits, |ours - hf| <= 2e-6 (fp32 softmax over <= 16 entries, ~18 u relative,
//    and w <= 1); from our logits, additionally + max|logit difference| of the row (|dw/ds_j| summed <= 1/2).
//  * block output, per token, relative L2: our experts on HF's routing <= 1e-5 (fp32 dot products of 64 and 32
//    terms differ by ~1e-7 between summation orders; a wrong SwiGLU, a swapped w1/w3 or a wrong multiplier is
//    >= 1e-2). Our whole layer (our logits and multipliers): <= 1e-5 + 2 sum_j |w_ours - w_hf| ||expert_j(x)|| /
//    ||y||, since router logits of magnitude ~40 carry fp32 rounding of ~4e-6 into the multipliers.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/safetensors.hpp"
#include "moe/reference.hpp"
#include "moe/routing.hpp"
#include "util/bf16.hpp"

using namespace eplab;

namespace {

const std::string kDir = std::string(EPLAB_TEST_DATA) + "/hf_tiny_phimoe";
const std::string kHowTo =
    "run `PYTHONUNBUFFERED=1 python3 scripts/hf_moe_fixture.py` on a machine with torch and transformers >= 5.1 "
    "and commit tests/data/hf_tiny_phimoe/ (see scripts/README.md)";

bool fixture_present() {
  namespace fs = std::filesystem;
  return fs::exists(kDir + "/fixture.safetensors") && fs::exists(kDir + "/config.json") &&
         fs::exists(kDir + "/model.safetensors");
}

// An F32 tensor of the fixture, shape-checked.
std::vector<float> get(const SafetensorsFile& f, const std::string& name, std::vector<std::int64_t> shape) {
  const TensorInfo* t = f.find(name);
  REQUIRE_MESSAGE(t != nullptr, "fixture.safetensors has no tensor '", name, "': ", kHowTo);
  REQUIRE_MESSAGE(t->dtype == Dtype::F32, name, " is ", dtype_name(t->dtype), ", expected F32");
  REQUIRE_MESSAGE(t->shape == shape, name, " has shape ", t->shape_str());
  std::vector<float> v(std::size_t(t->numel()));
  const auto bytes = f.bytes(*t);
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
  return v;
}

// Opens the checkpoint and the fixture, or fails the test saying how to make them.
struct Hf {
  Checkpoint ckpt;
  SafetensorsFile fx;
  int T = 0;
};

Hf open_fixture() {
  if (!fixture_present()) FAIL(kDir, " (fixture.safetensors, config.json, model.safetensors) is missing: ", kHowTo);
  Checkpoint ckpt = Checkpoint::open(kDir);
  SafetensorsFile fx = SafetensorsFile::open(kDir + "/fixture.safetensors");
  const TensorInfo* ids = fx.find("input_ids");
  REQUIRE_MESSAGE(ids != nullptr, "fixture.safetensors has no input_ids: ", kHowTo);
  REQUIRE(ids->shape.size() == 1);
  const int T = int(ids->shape[0]);
  REQUIRE(T >= 16);
  return Hf{std::move(ckpt), std::move(fx), T};
}

}  // namespace

TEST_CASE("hf fixture: checkpoint loads through our loader, config is PhiMoE's") {
  Hf hf = open_fixture();
  const ModelConfig& c = hf.ckpt.config();
  CHECK(c.model_type == "phimoe");
  CHECK(c.router == RouterKind::SparseMixer);
  CHECK(c.num_experts_per_tok == 2);
  CHECK(c.num_local_experts == 16);
  CHECK(c.router_jitter_noise == doctest::Approx(0.01f));
  CHECK(c.attention_bias);
  CHECK(c.lm_head_bias);
  // save_pretrained must have written the real checkpoint's (legacy) names, in bf16, which our loader reads.
  CHECK(hf.ckpt.info(names::router_gate(0)).dtype == Dtype::BF16);
  CHECK(hf.ckpt.has(names::expert_w(c.num_hidden_layers - 1, c.num_local_experts - 1, 2)));
  hf.ckpt.validate_against_config();
  // The tensors the full-model chapters compare against are there, with the shapes the config implies.
  const std::int64_t T = hf.T, H = c.hidden_size, V = c.vocab_size;
  get(hf.fx, "embed_out", {T, H});
  get(hf.fx, "norm_out", {T, H});
  get(hf.fx, "logits", {T, V});
  for (int l = 0; l < c.num_hidden_layers; ++l) get(hf.fx, "layers." + std::to_string(l) + ".out", {T, H});
  const auto ids = get(hf.fx, "input_ids", {T});
  for (float id : ids) CHECK((id >= 0 && id < float(V) && id == std::floor(id)));
}

TEST_CASE("hf fixture: router logits, sparsemixer and the MoE layer match transformers' PhimoeSparseMoeBlock") {
  Hf hf = open_fixture();
  const ModelConfig& c = hf.ckpt.config();
  const int T = hf.T, H = c.hidden_size, E = c.num_local_experts, L = c.num_hidden_layers;
  const float eps = c.router_jitter_noise;
  constexpr double u = 1.0 / (1 << 24);
  int rows_several_kept = 0, rows_one_kept = 0;  // coverage of the fixture itself (see the end)

  for (int l = 0; l < L; ++l) {
    CAPTURE(l);
    const std::string p = "layers." + std::to_string(l) + ".";
    const auto x = get(hf.fx, p + "moe.x", {T, H});
    const auto hf_logits = get(hf.fx, p + "router_logits", {T, E});
    const auto hf_ids = get(hf.fx, p + "topk_ids", {T, 2});
    const auto hf_w = get(hf.fx, p + "topk_weights", {T, 2});
    const auto hf_y = get(hf.fx, p + "moe.y", {T, H});
    const MoeLayerWeights w = load_moe_layer(hf.ckpt, l);
    const std::vector<float> gate = bf16_to_float(std::span<const bf16_bits>(w.gate));

    // 1. Router logits: our router GEMM on the same x and gate.
    std::vector<float> logits(std::size_t(T) * E);
    router_logits_cpu(x, gate, T, H, E, logits);
    double worst_ratio = 0;  // |diff| / bound, largest over all entries
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) {
        double abs_sum = 0;
        for (int h = 0; h < H; ++h) abs_sum += std::fabs(double(x[std::size_t(t) * H + h]) * gate[std::size_t(e) * H + h]);
        const double bound = 2.0 * (H + 1) * u * abs_sum;
        const double d = std::fabs(double(logits[std::size_t(t) * E + e]) - hf_logits[std::size_t(t) * E + e]);
        worst_ratio = std::max(worst_ratio, d / bound);
        if (d > bound) {
          CAPTURE(t);
          CAPTURE(e);
          FAIL_CHECK("router logit differs: ours ", logits[std::size_t(t) * E + e], " hf ",
                     hf_logits[std::size_t(t) * E + e], " (bound ", bound, ")");
        }
      }
    MESSAGE("layer ", l, ": router logits within ", worst_ratio, " of the fp32 summation bound");

    // 2. Sparsemixer on HF's logits (semantics only) and on ours (the whole router).
    const Routing from_hf = route(RouterKind::SparseMixer, hf_logits, T, E, 2, eps);
    const Routing ours = route(RouterKind::SparseMixer, logits, T, E, 2, eps);
    double worst_w_hf = 0, worst_w_ours = 0;
    for (int t = 0; t < T; ++t) {
      double row_logit_diff = 0;
      for (int e = 0; e < E; ++e)
        row_logit_diff = std::max(row_logit_diff, std::fabs(double(logits[std::size_t(t) * E + e]) -
                                                            hf_logits[std::size_t(t) * E + e]));
      for (int j = 0; j < 2; ++j) {
        const int want = int(hf_ids[std::size_t(t) * 2 + j]);
        const float want_w = hf_w[std::size_t(t) * 2 + j];
        CAPTURE(t);
        CAPTURE(j);
        INFO("hf: experts [", hf_ids[std::size_t(t) * 2], ", ", hf_ids[std::size_t(t) * 2 + 1], "] weights [",
             hf_w[std::size_t(t) * 2], ", ", hf_w[std::size_t(t) * 2 + 1], "]; ours from hf logits: [",
             from_hf.id(t, 0), ", ", from_hf.id(t, 1), "] [", from_hf.weight(t, 0), ", ", from_hf.weight(t, 1),
             "]; decision margin ", routing_margin(RouterKind::SparseMixer, hf_logits, t, E, eps));
        CHECK(from_hf.id(t, j) == want);
        CHECK(ours.id(t, j) == want);
        const double d_hf = std::fabs(double(from_hf.weight(t, j)) - want_w);
        const double d_ours = std::fabs(double(ours.weight(t, j)) - want_w);
        CHECK(d_hf <= 2e-6);
        CHECK(d_ours <= 2e-6 + row_logit_diff);
        worst_w_hf = std::max(worst_w_hf, d_hf);
        worst_w_ours = std::max(worst_w_ours, d_ours);
        if (want_w < 0.99f) ++rows_several_kept;
        if (want_w == 1.0f) ++rows_one_kept;
      }
    }
    MESSAGE("layer ", l, ": expert ids identical; multipliers max |diff| ", worst_w_hf, " (hf logits), ",
            worst_w_ours, " (our logits)");

    // 3. The whole layer (our logits, our routing, our experts), and the experts alone on HF's routing.
    const MoeRefResult ref = moe_layer_reference(w, x, T, MoeRefOptions{{RouterKind::SparseMixer, 2, eps}, false});
    Routing hf_routing{T, 2, std::vector<int>(std::size_t(T) * 2), hf_w};
    for (std::size_t i = 0; i < hf_ids.size(); ++i) hf_routing.ids[i] = int(hf_ids[i]);
    const std::vector<float> y_hf_routing = moe_experts_reference(w, x, hf_routing);
    double worst_layer = 0, worst_experts = 0;
    std::vector<float> ex(H);
    for (int t = 0; t < T; ++t) {
      const std::span<const float> want(&hf_y[std::size_t(t) * H], H);
      const double norm_want = std::sqrt(std::inner_product(want.begin(), want.end(), want.begin(), 0.0));
      // Our multipliers come from our logits: allow what their difference from HF's moves the output,
      // sum_j |w_ours - w_hf| * ||expert_j(x_t)|| (the multipliers themselves were checked above).
      double allowance = 0;
      for (int j = 0; j < 2; ++j) {
        expert_forward_cpu(w, ours.id(t, j), &x[std::size_t(t) * H], ex.data(), false);
        const double n = std::sqrt(std::inner_product(ex.begin(), ex.end(), ex.begin(), 0.0));
        allowance += std::fabs(double(ours.weight(t, j)) - hf_w[std::size_t(t) * 2 + j]) * n / norm_want;
      }
      const double e_layer = rel_l2(std::span<const float>(&ref.y[std::size_t(t) * H], H), want);
      const double e_experts = rel_l2(std::span<const float>(&y_hf_routing[std::size_t(t) * H], H), want);
      CAPTURE(t);
      CAPTURE(allowance);
      CHECK(e_experts <= 1e-5);
      CHECK(e_layer <= 1e-5 + 2 * allowance);
      worst_experts = std::max(worst_experts, e_experts);
      worst_layer = std::max(worst_layer, e_layer);
    }
    MESSAGE("layer ", l, ": MoE output rel-L2 ", rel_l2(ref.y, hf_y), " (worst token ", worst_layer,
            "); experts on HF's routing: rel-L2 ", rel_l2(y_hf_routing, hf_y), " (worst token ", worst_experts, ")");
  }
  // The fixture must exercise sparsemixer's mask both ways, or the test above proves little.
  CHECK(rows_several_kept >= 3);
  CHECK(rows_one_kept >= 3);
}

TEST_CASE("hf fixture: sparsemixer on hand-made logits matches transformers' sparsemixer exactly") {
  // Rows made to tell sparsemixer from misreadings of it (elementwise mask factor, 2*eps, the second pass's
  // threshold, ties, zero logits; see crafted_router_rows in scripts/hf_moe_fixture.py). No GEMM in between:
  // both sides run the same IEEE fp32 mask arithmetic on the same numbers, so ids must be identical and
  // multipliers differ only by the softmax's rounding (fp32 in torch, double here).
  Hf hf = open_fixture();
  const int E = hf.ckpt.config().num_local_experts;
  const float eps = hf.ckpt.config().router_jitter_noise;
  const TensorInfo* t = hf.fx.find("sparsemixer.logits");
  REQUIRE_MESSAGE(t != nullptr, "fixture.safetensors has no sparsemixer.logits: ", kHowTo);
  const int R = int(t->shape.at(0));
  REQUIRE(R >= 1);
  const auto logits = get(hf.fx, "sparsemixer.logits", {R, E});
  const auto ids = get(hf.fx, "sparsemixer.ids", {R, 2});
  const auto weights = get(hf.fx, "sparsemixer.weights", {R, 2});
  const Routing r = route(RouterKind::SparseMixer, logits, R, E, 2, eps);
  for (int i = 0; i < R; ++i) {
    CAPTURE(i);
    INFO("hf: experts [", ids[std::size_t(i) * 2], ", ", ids[std::size_t(i) * 2 + 1], "] weights [",
         weights[std::size_t(i) * 2], ", ", weights[std::size_t(i) * 2 + 1], "]; ours: [", r.id(i, 0), ", ",
         r.id(i, 1), "] [", r.weight(i, 0), ", ", r.weight(i, 1), "]");
    for (int j = 0; j < 2; ++j) {
      CHECK(r.id(i, j) == int(ids[std::size_t(i) * 2 + j]));
      CHECK(std::fabs(double(r.weight(i, j)) - weights[std::size_t(i) * 2 + j]) <= 2e-6);
    }
  }
}
