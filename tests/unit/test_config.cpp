// ModelConfig: a config.json laid out like Phi-tiny-MoE's (written out here by hand), required and
// optional fields, the checks that reject nonsense, and the to_json -> from_json round trip.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "model/config.hpp"
#include "util/check.hpp"

using namespace eplab;
namespace fs = std::filesystem;

namespace {

// Field names and values as in microsoft/Phi-tiny-MoE-instruct's config.json (plus fields EP Lab ignores).
nlohmann::json phi_tiny_json() {
  return nlohmann::json::parse(R"({
    "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe", "attention_bias": true,
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 448,
    "lm_head_bias": true, "max_position_embeddings": 4096, "num_attention_heads": 16, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 4, "num_local_experts": 16, "rms_norm_eps": 1e-05,
    "rope_scaling": null, "rope_theta": 10000.0, "router_jitter_noise": 0.01, "sliding_window": 2047,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32064
  })");
}

std::string error_of(const nlohmann::json& j) {
  try {
    ModelConfig::from_json(j, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("config: Phi-tiny-MoE's config.json") {
  const ModelConfig c = ModelConfig::from_json(phi_tiny_json());
  CHECK(c.hidden_size == 4096);
  CHECK(c.intermediate_size == 448);
  CHECK(c.num_hidden_layers == 32);
  CHECK(c.num_attention_heads == 16);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 128);  // explicit: not hidden / heads (= 256)
  CHECK(c.num_local_experts == 16);
  CHECK(c.num_experts_per_tok == 2);
  CHECK(c.vocab_size == 32064);
  CHECK(c.sliding_window == 2047);
  CHECK(c.rms_norm_eps == doctest::Approx(1e-5));
  CHECK(c.router_jitter_noise == doctest::Approx(0.01));
  CHECK(c.attention_bias);
  CHECK(c.lm_head_bias);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.router == RouterKind::SparseMixer);
}

TEST_CASE("config: head_dim defaults to hidden / heads; num_key_value_heads to heads") {
  auto j = phi_tiny_json();
  j.erase("head_dim");
  j.erase("num_key_value_heads");
  const ModelConfig c = ModelConfig::from_json(j);
  CHECK(c.head_dim == 256);
  CHECK(c.num_key_value_heads == 16);
}

TEST_CASE("config: bad fields give one clear error naming the field") {
  auto j = phi_tiny_json();
  SUBCASE("missing required") {
    j.erase("num_local_experts");
    CHECK(error_of(j).find("cfg.json: missing required field 'num_local_experts'") != std::string::npos);
  }
  SUBCASE("wrong type") {
    j["hidden_size"] = "big";
    CHECK(error_of(j).find("field 'hidden_size' has the wrong type") != std::string::npos);
  }
  SUBCASE("top-k larger than the experts") {
    j["num_experts_per_tok"] = 17;
    CHECK(error_of(j).find("num_experts_per_tok (17) is larger than num_local_experts (16)") != std::string::npos);
  }
  SUBCASE("heads not a multiple of KV heads") {
    j["num_key_value_heads"] = 3;
    CHECK(error_of(j).find("not a multiple of num_key_value_heads") != std::string::npos);
  }
  SUBCASE("zero experts") {
    j["num_local_experts"] = 0;
    CHECK(error_of(j).find("'num_local_experts' must be > 0") != std::string::npos);
  }
  SUBCASE("unsupported model type") {
    j["model_type"] = "llama";
    CHECK(error_of(j).find("model_type 'llama' is not supported") != std::string::npos);
  }
  SUBCASE("not an object") { CHECK(error_of(nlohmann::json::array()).find("expected a JSON object") != std::string::npos); }
}

TEST_CASE("config: to_json -> from_json round trip, floats written in their short form") {
  const ModelConfig a = ModelConfig::from_json(phi_tiny_json());
  const nlohmann::json j = a.to_json();
  CHECK(j.dump().find("\"rms_norm_eps\":1e-05") != std::string::npos);
  CHECK(j.dump().find("\"router_jitter_noise\":0.01") != std::string::npos);
  const ModelConfig b = ModelConfig::from_json(j);
  CHECK(b.to_json() == j);
  CHECK(b.head_dim == 128);
  CHECK(b.rms_norm_eps == a.rms_norm_eps);
}

TEST_CASE("config: load() from a directory") {
  const fs::path d = fs::temp_directory_path() / ("eplab_cfg_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  SUBCASE("missing directory") {
    try {
      ModelConfig::load((d / "absent").string());
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("does not exist") != std::string::npos);
    }
  }
  SUBCASE("not JSON") {
    std::ofstream(d / "config.json") << "{ oops";
    CHECK_THROWS_AS(ModelConfig::load(d.string()), Error);
  }
  SUBCASE("good") {
    std::ofstream(d / "config.json") << phi_tiny_json().dump();
    CHECK(ModelConfig::load(d.string()).num_local_experts == 16);
  }
  fs::remove_all(d);
}
