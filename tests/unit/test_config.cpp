// ModelConfig: a config.json laid out like Phi-tiny-MoE's (written out here by hand), required and
// optional fields, the checks that reject nonsense, and the to_json -> from_json round trip. Then every
// field checked by value (files written byte for byte: errors quote the value as written), and the config
// against the layers and experts a checkpoint's index holds.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "tmp_dir.hpp"
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
    CHECK(error_of(j).find("field 'hidden_size' must be an integer in [1, 65536], got \"big\"") != std::string::npos);
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
    CHECK(error_of(j).find("field 'num_local_experts' must be an integer in [1, 4096], got 0") != std::string::npos);
  }
  SUBCASE("unsupported model type") {
    j["model_type"] = "llama";
    CHECK(error_of(j).find("field 'model_type' = \"llama\" is not supported") != std::string::npos);
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

namespace {

// The error of loading a config.json whose field `key` is written as `text` (spliced in as raw JSON, so the
// file holds exactly that text: "4096.5", "1E-5", "18446744073709551616"); "" when it loads.
std::string error_with(const std::string& key, const std::string& text, nlohmann::json j = phi_tiny_json()) {
  const eplab::testing::TmpDir d;
  j[key] = "@VALUE@";
  std::string s = j.dump(2);
  s.replace(s.find("\"@VALUE@\""), 9, text);
  d.write("config.json", s);
  try {
    ModelConfig::load(d.path.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The message for field `key` written as `text`, with the file name cut off ("<tmp>/config.json: ...").
std::string message_with(const std::string& key, const std::string& text) {
  const std::string e = error_with(key, text);
  const auto p = e.find("config.json: ");
  return p == std::string::npos ? e : e.substr(p + 13);
}

}  // namespace

TEST_CASE("config: integer fields must be JSON integers that fit, never truncated or wrapped") {
  // Before these checks nlohmann's get<int>() truncated 4096.5 to 4096 and wrapped 2^32 + 4096 to 4096.
  CHECK(message_with("hidden_size", "4096.5") == "field 'hidden_size' must be an integer in [1, 65536], got 4096.5");
  CHECK(message_with("hidden_size", "4096.0") == "field 'hidden_size' must be an integer in [1, 65536], got 4096.0");
  CHECK(message_with("hidden_size", "4294971392") ==  // 2^32 + 4096: 4096 once wrapped to 32 bits
        "field 'hidden_size' must be an integer in [1, 65536], got 4294971392");
  CHECK(message_with("num_hidden_layers", "3567587328") ==  // wrapped: -727379968
        "field 'num_hidden_layers' must be an integer in [1, 1024], got 3567587328");
  CHECK(message_with("vocab_size", "18446744073709551616") ==  // 2^64: beyond 64 bits, quoted as written
        "field 'vocab_size' must be an integer in [1, 2097152], got 18446744073709551616");
  CHECK(message_with("num_local_experts", "-16") == "field 'num_local_experts' must be an integer in [1, 4096], got -16");
  CHECK(message_with("intermediate_size", "1e3") == "field 'intermediate_size' must be an integer in [1, 262144], got 1e3");
  CHECK(message_with("num_key_value_heads", "true") == "field 'num_key_value_heads' must be an integer in [1, 1024], got true");
  CHECK(message_with("head_dim", "0") == "field 'head_dim' must be an integer in [1, 1024], got 0");
  CHECK(message_with("sliding_window", "-1") == "field 'sliding_window' must be an integer in [0, 16777216], got -1");
  CHECK(message_with("max_position_embeddings", "0") ==
        "field 'max_position_embeddings' must be an integer in [1, 16777216], got 0");
  CHECK(message_with("num_experts_per_tok", "2.5") ==
        "field 'num_experts_per_tok' must be an integer in [1, 4096], got 2.5");
  // Sizes are bounded (config.cpp says why): a layer count no model has is a broken file, not a model.
  CHECK(message_with("num_hidden_layers", "100000") == "field 'num_hidden_layers' must be an integer in [1, 1024], got 100000");
  CHECK(message_with("hidden_size", "131072") == "field 'hidden_size' must be an integer in [1, 65536], got 131072");
  // The bounds themselves and null (= not set) are accepted.
  CHECK(error_with("hidden_size", "65536") == "");
  CHECK(error_with("sliding_window", "null") == "");
  CHECK(error_with("sliding_window", "0") == "");
}

TEST_CASE("config: eps, theta and jitter are positive (or in [0, 1)) and finite, quoted as written") {
  CHECK(message_with("rms_norm_eps", "0") == "field 'rms_norm_eps' must be a number in (0, 1), got 0");
  CHECK(message_with("rms_norm_eps", "-1E-5") == "field 'rms_norm_eps' must be a number in (0, 1), got -1E-5");
  CHECK(message_with("rms_norm_eps", "1.5") == "field 'rms_norm_eps' must be a number in (0, 1), got 1.5");
  CHECK(message_with("rms_norm_eps", "\"1e-5\"") == "field 'rms_norm_eps' must be a number in (0, 1), got \"1e-5\"");
  CHECK(message_with("rms_norm_eps", "1e-50") ==  // positive as a double, 0 as the float the model uses
        "field 'rms_norm_eps' = 1e-50 does not fit in a 32-bit float (it would become 0)");
  CHECK(message_with("rope_theta", "0") == "field 'rope_theta' must be a number in (0, inf), got 0");
  CHECK(message_with("rope_theta", "-10000.0") == "field 'rope_theta' must be a number in (0, inf), got -10000.0");
  CHECK(message_with("rope_theta", "1e39") == "field 'rope_theta' = 1e39 does not fit in a 32-bit float (it would become inf)");
  CHECK(message_with("rope_theta", "1e400").find("field 'rope_theta' is not a finite number") == 0);  // overflows a double
  CHECK(message_with("router_jitter_noise", "1") == "field 'router_jitter_noise' must be a number in [0, 1), got 1");
  CHECK(message_with("router_jitter_noise", "-0.01") == "field 'router_jitter_noise' must be a number in [0, 1), got -0.01");
  CHECK(message_with("input_jitter_noise", "2") == "field 'input_jitter_noise' must be a number in [0, 1), got 2");
  CHECK(error_with("router_jitter_noise", "0") == "");
  CHECK(error_with("rope_theta", "10000") == "");  // an integer is a fine number
  SUBCASE("transformers 5 files rope_theta under rope_parameters") {
    auto j = phi_tiny_json();
    j.erase("rope_theta");
    j["rope_parameters"] = {{"rope_theta", 0.0}, {"rope_type", "default"}};
    CHECK(error_of(j).find("cfg.json: field 'rope_parameters.rope_theta' must be a number in (0, inf), got 0.0") !=
          std::string::npos);
    j["rope_parameters"]["rope_theta"] = 500000.0;
    CHECK(ModelConfig::from_json(j).rope_theta == 500000.f);
  }
}

TEST_CASE("config: booleans, strings and RoPE variants are checked as what they are") {
  CHECK(message_with("attention_bias", "1") == "field 'attention_bias' must be true or false, got 1");
  CHECK(message_with("tie_word_embeddings", "\"false\"") == "field 'tie_word_embeddings' must be true or false, got \"false\"");
  CHECK(message_with("hidden_act", "\"gelu\"").find("field 'hidden_act' = \"gelu\" is not supported") == 0);
  CHECK(message_with("torch_dtype", "\"int8\"") ==
        "field 'torch_dtype' = \"int8\" is not supported (expected bfloat16, float16, float32)");
  CHECK(message_with("model_type", "7") == "field 'model_type' must be a string, got 7");
  // A control character in a string stays escaped: the error is one line.
  CHECK(message_with("model_type", "\"phi\\nmoe\"") ==
        "field 'model_type' = \"phi\\nmoe\" is not supported (expected phimoe, mixtral)");
  CHECK(message_with("rope_scaling", "{\"type\": \"longrope\"}").find("field 'rope_scaling' = {\"type\":\"longrope\"} is "
                                                                   "not supported (EP Lab implements plain RoPE") == 0);
  CHECK(error_with("rope_scaling", "{\"rope_type\": \"default\"}") == "");
}

TEST_CASE("config: configs built in code get the same ranges (validate)") {
  ModelConfig c = ModelConfig::from_json(phi_tiny_json());
  auto error_of_validate = [&] {
    try {
      c.validate("gen");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(error_of_validate() == "");
  c.num_hidden_layers = 5000;
  CHECK(error_of_validate() == "gen: 'num_hidden_layers' must be in [1, 1024], got 5000");
  c.num_hidden_layers = 32;
  c.rms_norm_eps = -1e-5f;
  CHECK(error_of_validate() == "gen: 'rms_norm_eps' must be a number in (0, 1), got -1e-05");
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = std::numeric_limits<float>::infinity();
  CHECK(error_of_validate() == "gen: 'rope_theta' must be a number in (0, inf), got inf");
}

TEST_CASE("config against the checkpoint: layers and experts the index does not hold are refused on open") {
  // A metadata-only checkpoint (config.json + index, no shard): what open() checks needs only the names.
  ModelConfig c = ModelConfig::from_json(phi_tiny_json());
  c.num_hidden_layers = 2;
  const eplab::testing::TmpDir d;
  nlohmann::json wm = nlohmann::json::object();
  for (const TensorSpec& s : phimoe_tensor_specs(c)) wm[s.name] = "model-00001-of-00001.safetensors";
  d.write("model.safetensors.index.json", nlohmann::json{{"weight_map", wm}}.dump());
  auto open_with = [&](const char* key, int v) {
    nlohmann::json j = c.to_json();
    j[key] = v;
    d.write("config.json", j.dump());
    try {
      Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(open_with("num_hidden_layers", 2) == "");
  // Before this check a config with more layers than the checkpoint opened, and chapter 01 ran on it.
  CHECK(open_with("num_hidden_layers", 3).find("config.json: num_hidden_layers = 3 but the checkpoint holds 2 layers "
                                               "(it lacks tensor 'model.layers.2.block_sparse_moe.gate.weight')") !=
        std::string::npos);
  CHECK(open_with("num_hidden_layers", 1).find("config.json: num_hidden_layers = 1 but the checkpoint holds layer 1") !=
        std::string::npos);
  CHECK(open_with("num_local_experts", 20).find("config.json: num_local_experts = 20 but the checkpoint holds 16 "
                                                "experts per layer (it lacks tensor "
                                                "'model.layers.0.block_sparse_moe.experts.19.w1.weight')") !=
        std::string::npos);
  // Fewer experts than the checkpoint holds opens (the router's [E, H] shape refuses it when read);
  // validate_names_against_config names it without reading.
  CHECK(open_with("num_local_experts", 8) == "");
}
