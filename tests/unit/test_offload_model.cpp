// The offload-vs-EP model (common/moe/offload_model.hpp): the card fields of each published config, the note's
// formulas evaluated independently here (plain arithmetic on the card's numbers), γ = 1 at the crossover, the
// latency terms, the measured N_ue, and bad input.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "moe/offload_model.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

const std::string kData = EPLAB_SOURCE_DIR "/data";

SystemSpec pcie_ib() {
  SystemSpec s;
  s.b_pcie = 64e9;
  s.b_net = 50e9;
  return s;
}

}  // namespace

TEST_CASE("offload model: the cards read their published config fields") {
  const MoeCard r1 = load_card("deepseek-r1", kData);
  CHECK(r1.hidden == 7168);
  CHECK(r1.expert_inter == 2048);  // moe_intermediate_size, not the dense layers' 18432
  CHECK(r1.experts == 256);
  CHECK(r1.shared_experts == 1);
  CHECK(r1.top_k == 8);
  CHECK(r1.layers == 61);
  CHECK(r1.moe_layers == 58);      // first_k_dense_replace = 3
  CHECK(r1.weight_bytes == 1);     // FP8
  CHECK(r1.expert_params() == doctest::Approx(3.0 * 7168 * 2048));
  const MoeCard mx = load_card("mixtral-8x7b", kData);
  CHECK(mx.experts == 8);
  CHECK(mx.expert_inter == 14336);
  CHECK(mx.moe_layers == 32);
  CHECK(mx.weight_bytes == 2);
  const MoeCard qw = load_card("qwen3-30b-a3b", kData);
  CHECK(qw.experts == 128);
  CHECK(qw.expert_inter == 768);
  CHECK(qw.moe_layers == 48);      // decoder_sparse_step 1, no mlp_only_layers
  const MoeCard phi = load_card("phi-tiny-moe", kData);
  CHECK(phi.experts == 16);
  CHECK(phi.expert_inter == 448);
  CHECK(phi.moe_layers == 32);
}

TEST_CASE("offload model: T_P, T_EP and gamma as the note writes them (DeepSeek-R1, PCIe Gen5 vs 400 Gb/s IB)") {
  const MoeCard c = load_card("deepseek-r1", kData);
  const SystemSpec s = pcie_ib();
  const double SE = 3.0 * 7168 * 2048, L = 58;
  for (double nt : {1.0, 8.0, 32.0, 64.0, 4096.0, 1e6}) {
    CAPTURE(nt);
    const double nue = std::min(8 * nt, 256.0);
    const GammaPoint g = gamma_point(c, s, nt);
    CHECK(g.used_experts == nue);
    CHECK(g.t_offload == doctest::Approx(L * SE * 1 * nue / 64e9));
    CHECK(g.t_ep == doctest::Approx(2 * L * nt * 7168 * 2 / 50e9));
    // the boxed form: ½ · (S_E f_E)/(d f_a) · B_net/B_pcie · N_ue/N_t
    CHECK(g.gamma == doctest::Approx(0.5 * SE / (7168.0 * 2) * (50e9 / 64e9) * nue / nt));
  }
  // while k · N_t < E, γ does not depend on N_t: ½ · 3072 · 50/64 · 8 = 9600
  CHECK(gamma_point(c, s, 1).gamma == doctest::Approx(9600));
  CHECK(gamma_point(c, s, 31).gamma == doctest::Approx(9600));
  // the crossover: γ = 1 there, above 1 just below it
  const double x = crossover_tokens(c, s);
  CHECK(x == doctest::Approx(0.5 * 3072 * 50.0 / 64 * 256));
  CHECK(gamma_point(c, s, x).gamma == doctest::Approx(1.0));
  CHECK(gamma_point(c, s, 0.9 * x).gamma > 1.0);
  // a system where offload wins from the first token: γ(1) <= 1 -> crossover 1
  SystemSpec fast = s;
  fast.b_pcie = 1e15;
  CHECK(crossover_tokens(c, fast) == 1);
}

TEST_CASE("offload model: latency terms, T_B at given ceilings, the measured N_ue") {
  const MoeCard c = load_card("mixtral-8x7b", kData);
  SystemSpec s = pcie_ib();
  const GammaPoint plain = gamma_point(c, s, 4);
  s.pcie_latency_s = 10e-6;
  s.net_latency_s = 20e-6;
  const GammaPoint lat = gamma_point(c, s, 4);
  CHECK(lat.t_offload == doctest::Approx(plain.t_offload + 32 * 8 * 10e-6));  // L x N_ue transfers
  CHECK(lat.t_ep == doctest::Approx(plain.t_ep + 2 * 32 * 20e-6));            // 2 all-to-alls per layer
  CHECK(plain.t_base == 0);  // no ceilings, no T_B
  s.peak_flops = 800e12;
  s.hbm_bytes_s = 4e12;
  const double SE = 3.0 * 4096 * 14336;
  const GammaPoint tb = gamma_point(c, s, 4);  // tiny batch: reading the used experts' weights dominates
  CHECK(tb.t_base == doctest::Approx(32 * std::max(2 * 4 * 2 * SE / 800e12, 8 * SE * 2 / 4e12)));
  // measured: distinct ids among the first n tokens' k choices, per layer, averaged
  const std::vector<std::vector<int>> ids = {{0, 1, 0, 2, 1, 2}, {3, 3, 3, 3, 4, 5}};
  CHECK(measured_used_experts(ids, 2, 1) == doctest::Approx((2 + 1) / 2.0));
  CHECK(measured_used_experts(ids, 2, 3) == doctest::Approx((3 + 3) / 2.0));
  CHECK(gamma_point(c, pcie_ib(), 3, 1.5).used_experts == 1.5);
}

TEST_CASE("offload model: bad input is one clear error") {
  CHECK_THROWS_AS(load_card("gpt-5", kData), Error);
  CHECK_THROWS_AS(load_card("deepseek-r1", "/no/such/data"), Error);
  CHECK_THROWS_AS(card_from_config(nlohmann::json{{"hidden_size", 64}}, "x"), Error);  // no layers, experts, ...
  nlohmann::json c = {{"hidden_size", 64}, {"num_hidden_layers", 2}, {"num_experts_per_tok", 9},
                      {"num_local_experts", 8}, {"intermediate_size", 32}};
  CHECK_THROWS_AS(card_from_config(c, "k > E"), Error);
  c["num_experts_per_tok"] = 2;
  c["hidden_size"] = -64;
  CHECK_THROWS_AS(card_from_config(c, "negative"), Error);
  const MoeCard ok = load_card("phi-tiny-moe", kData);
  SystemSpec s = pcie_ib();
  CHECK_THROWS_AS(gamma_point(ok, s, 0), Error);
  s.b_net = 0;
  CHECK_THROWS_AS(gamma_point(ok, s, 1), Error);
  CHECK_THROWS_AS(measured_used_experts({{0, 1}}, 2, 2), Error);  // 1 routed token, 2 asked
}
