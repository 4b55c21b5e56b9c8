#include "model/config.hpp"

#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab {

const char* router_name(RouterKind r) { return r == RouterKind::SparseMixer ? "sparsemixer" : "softmax"; }

RouterKind parse_router(const std::string& name) {
  if (name == "sparsemixer") return RouterKind::SparseMixer;
  if (name == "softmax" || name == "softmax-topk") return RouterKind::SoftmaxTopK;
  fail("unknown router '", name, "' (expected sparsemixer or softmax)");
}

namespace {

// Reads j[key] into out when the field is present and not null; a value of the wrong type is an error.
template <typename T>
void get_optional(const nlohmann::json& j, const char* key, T& out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    out = it->get<T>();
  } catch (const nlohmann::json::exception&) {
    fail(where, ": field '", key, "' has the wrong type (", it->type_name(), ")");
  }
}

template <typename T>
void get_required(const nlohmann::json& j, const char* key, T& out, const std::string& where) {
  auto it = j.find(key);
  require(it != j.end() && !it->is_null(), where, ": missing required field '", key, "'");
  get_optional(j, key, out, where);
}

// A float as the double with the same shortest decimal form, so 1e-5f is written as 1e-05 and not as
// 9.999999747378752e-06 (which would read back as a different-looking config).
double json_float(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf - 1, f);
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  require(j.is_object(), where, ": expected a JSON object");
  ModelConfig c;
  get_optional(j, "model_type", c.model_type, where);
  require(c.model_type == "phimoe" || c.model_type == "mixtral", where, ": model_type '", c.model_type,
          "' is not supported (expected phimoe)");
  get_required(j, "hidden_size", c.hidden_size, where);
  get_required(j, "intermediate_size", c.intermediate_size, where);
  get_required(j, "num_hidden_layers", c.num_hidden_layers, where);
  get_required(j, "num_attention_heads", c.num_attention_heads, where);
  get_required(j, "num_local_experts", c.num_local_experts, where);
  get_required(j, "num_experts_per_tok", c.num_experts_per_tok, where);
  get_required(j, "vocab_size", c.vocab_size, where);
  c.num_key_value_heads = c.num_attention_heads;
  get_optional(j, "num_key_value_heads", c.num_key_value_heads, where);
  get_optional(j, "head_dim", c.head_dim, where);
  if (c.head_dim == 0 && c.num_attention_heads > 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  get_optional(j, "max_position_embeddings", c.max_position_embeddings, where);
  get_optional(j, "sliding_window", c.sliding_window, where);
  get_optional(j, "rms_norm_eps", c.rms_norm_eps, where);
  get_optional(j, "rope_theta", c.rope_theta, where);
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object())  // transformers 5 layout
    get_optional(*it, "rope_theta", c.rope_theta, where);
  get_optional(j, "router_jitter_noise", c.router_jitter_noise, where);
  get_optional(j, "input_jitter_noise", c.input_jitter_noise, where);
  get_optional(j, "attention_bias", c.attention_bias, where);
  get_optional(j, "lm_head_bias", c.lm_head_bias, where);
  get_optional(j, "tie_word_embeddings", c.tie_word_embeddings, where);
  get_optional(j, "hidden_act", c.hidden_act, where);
  get_optional(j, "torch_dtype", c.torch_dtype, where);
  get_optional(j, "dtype", c.torch_dtype, where);
  c.router = c.model_type == "phimoe" ? RouterKind::SparseMixer : RouterKind::SoftmaxTopK;
  c.validate(where);
  return c;
}

void ModelConfig::validate(const std::string& where) const {
  auto positive = [&](int v, const char* name) { require(v > 0, where, ": '", name, "' must be > 0, got ", v); };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(num_local_experts, "num_local_experts");
  positive(num_experts_per_tok, "num_experts_per_tok");
  positive(vocab_size, "vocab_size");
  require(num_experts_per_tok <= num_local_experts, where, ": num_experts_per_tok (", num_experts_per_tok,
          ") is larger than num_local_experts (", num_local_experts, ")");
  require(num_attention_heads % num_key_value_heads == 0, where, ": num_attention_heads (", num_attention_heads,
          ") is not a multiple of num_key_value_heads (", num_key_value_heads, ")");
  require(router != RouterKind::SparseMixer || num_experts_per_tok == 2, where,
          ": sparsemixer routing needs num_experts_per_tok = 2, got ", num_experts_per_tok);
  require(hidden_act == "silu", where, ": hidden_act '", hidden_act, "' is not supported (expected silu)");
}

nlohmann::json ModelConfig::to_json() const {
  return {
      {"architectures", {"PhimoeForCausalLM"}},
      {"model_type", model_type},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"num_local_experts", num_local_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"vocab_size", vocab_size},
      {"max_position_embeddings", max_position_embeddings},
      {"sliding_window", sliding_window},
      {"rms_norm_eps", json_float(rms_norm_eps)},
      {"rope_theta", json_float(rope_theta)},
      {"rope_scaling", nullptr},
      {"router_jitter_noise", json_float(router_jitter_noise)},
      {"input_jitter_noise", json_float(input_jitter_noise)},
      {"attention_bias", attention_bias},
      {"lm_head_bias", lm_head_bias},
      {"tie_word_embeddings", tie_word_embeddings},
      {"hidden_act", hidden_act},
      {"torch_dtype", torch_dtype},
  };
}

ModelConfig ModelConfig::load(const std::string& dir) {
  const auto path = std::filesystem::path(dir) / "config.json";
  require(std::filesystem::is_directory(dir), "model directory '", dir,
          "' does not exist (run `make model` to generate the default model, or pass --model DIR)");
  std::ifstream f(path);
  require(bool(f), "cannot open ", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail(path.string(), ": not valid JSON (", e.what(), ")");
  }
  return from_json(j, path.string());
}

}  // namespace eplab
