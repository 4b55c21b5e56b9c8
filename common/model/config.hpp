// The model's shape, read from an HF `phimoe` config.json.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace eplab {

enum class RouterKind { SparseMixer, SoftmaxTopK };
const char* router_name(RouterKind r);
RouterKind parse_router(const std::string& name);  // "sparsemixer" | "softmax"; throws on anything else

struct ModelConfig {
  std::string model_type = "phimoe";
  int hidden_size = 0;
  int intermediate_size = 0;  // per expert
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;  // explicit in Phi-tiny-MoE's config; hidden/heads when absent
  int num_local_experts = 0;
  int num_experts_per_tok = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  int sliding_window = 0;  // 0 = none
  float rms_norm_eps = 1e-5f;  // PhiMoE uses LayerNorm; the field keeps its HF name
  float rope_theta = 10000.f;
  float router_jitter_noise = 0.01f;  // sparsemixer's jitter_eps
  float input_jitter_noise = 0.f;     // training only
  bool attention_bias = true;
  bool lm_head_bias = true;
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
  std::string torch_dtype = "bfloat16";
  RouterKind router = RouterKind::SparseMixer;  // PhiMoE always routes with sparsemixer

  // Reads <dir>/config.json. Every field EP Lab reads is checked as the type it is: an integer field must be
  // a JSON integer in its range (4096.5 or 2^32 + 4096 is refused, never truncated or wrapped), sizes are
  // positive and bounded (config.cpp says why each bound), rms_norm_eps and rope_theta positive and finite,
  // router_jitter_noise in [0, 1), booleans and strings of their type, RoPE plain (no rope_scaling). Then
  // the fields together (top-k <= experts, heads a multiple of KV heads, ...). Anything else throws
  // eplab::Error with one line naming the file, the field and the value as the file writes it.
  static ModelConfig load(const std::string& dir);
  // The same checks on parsed JSON (a float's text is then nlohmann's: 1E-5 is quoted as 1e-05).
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where = "config.json");
  nlohmann::json to_json() const;
  // The ranges and the cross-field checks on the struct itself (for configs built in code).
  void validate(const std::string& where = "config.json") const;
};

}  // namespace eplab
