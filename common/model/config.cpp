#include "model/config.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <vector>

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

using json = nlohmann::json;

// The ranges every size in a config must lie in. The upper bounds are several times the largest published
// model's value, so no real config is refused, and small enough that every count the code derives from them
// (parameters L*E*3*I*H <= 2^10 * 2^12 * 3 * 2^18 * 2^16 < 2^58, bytes of it in fp32 < 2^60) fits in 64 bits
// and every single dimension fits in an int with room to spare. A value outside them is a broken file, not a
// model: refusing it here gives one line naming the field instead of an allocation failure or an overflow
// much later.
struct IntRange {
  long long lo, hi;
};
constexpr IntRange kHidden{1, 1 << 16};        // largest published: 16384 (Llama 3.1 405B); Phi-tiny: 4096
constexpr IntRange kIntermediate{1, 1 << 18};  // per expert; largest dense FFN published: 53248; Phi-tiny: 448
constexpr IntRange kLayers{1, 1024};           // deepest published: 126; Phi-tiny: 32
constexpr IntRange kHeads{1, 1024};            // most query heads published: 128; Phi-tiny: 16 (KV: 4)
constexpr IntRange kHeadDim{1, 1024};          // published: 64..256; Phi-tiny: 128
constexpr IntRange kExperts{1, 4096};          // most routed experts published: 512; Phi-tiny: 16
constexpr IntRange kVocab{1, 1 << 21};         // largest published: 262144; Phi-tiny: 32064
constexpr IntRange kPositions{1, 1 << 24};     // longest context published: 10 M tokens; Phi-tiny: 4096
constexpr IntRange kWindow{0, 1 << 24};        // sliding_window; 0 (or null) = none; Phi-tiny: 2047

// A real interval, open or closed at each end, as written in messages: "(0, 1)", "[0, 1)", "(0, inf)".
struct RealRange {
  double lo, hi;
  bool lo_open, hi_open;
  bool holds(double v) const {
    return std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  }
  std::string str() const {
    auto num = [](double v) {
      char buf[32];
      return std::isinf(v) ? std::string("inf") : std::string(buf, std::to_chars(buf, buf + sizeof buf, v).ptr);
    };
    return std::string(lo_open ? "(" : "[") + num(lo) + ", " + num(hi) + (hi_open ? ")" : "]");
  }
};
constexpr double kInf = std::numeric_limits<double>::infinity();
// LayerNorm's eps: HF configs use 1e-5 or 1e-6; an eps of 1 or more would swamp the variance of the
// normalized activations (which is about 1), and 0 or less divides by zero on a constant row.
constexpr RealRange kEps{0, 1, true, true};
constexpr RealRange kTheta{0, kInf, true, true};  // RoPE base: any positive finite number (Phi-tiny: 1e4)
// Sparsemixer's jitter_eps (and the training-only input jitter) is a fraction: its mask keeps experts whose
// logit is within 2 * eps of the top one (relatively), so eps >= 1 would keep every expert.
constexpr RealRange kJitter{0, 1, false, true};

// The text of every number in a config.json as the file writes it, by field path ("hidden_size",
// "rope_parameters.rope_theta"), so that an error can quote it as written: nlohmann keeps integers exactly
// but not a float's text (1E-5 becomes 1e-05, and an integer beyond 64 bits becomes 1.8446744073709552e+19).
// When the JSON cannot be parsed because a number overflows a double, `overflow_field` says whose it was.
class NumberText : public json::json_sax_t {
 public:
  std::map<std::string, std::string> text;
  std::string overflow_field, error;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t& s) override {
    text[path()] = s;
    return true;
  }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    keys_.back() = k;
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    keys_.emplace_back("[]");
    return true;
  }
  bool end_array() override {
    keys_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const json::exception& ex) override {
    error = ex.what();
    if (ex.id == 406 && !keys_.empty()) overflow_field = path();  // out_of_range.406: number overflow
    return false;
  }

 private:
  std::vector<std::string> keys_;
  std::string path() const {
    std::string p;
    for (const auto& k : keys_) p += (p.empty() ? "" : ".") + k;
    return p;
  }
};

// Reads the fields of one JSON object of a config (the file's top level, or rope_parameters), checking each
// as the type it is and naming the file, the field and the value as written in every error.
class FieldReader {
 public:
  FieldReader(const json& obj, const std::string& where, const std::map<std::string, std::string>* text,
              std::string prefix = "")
      : obj_(obj), where_(where), text_(text), prefix_(std::move(prefix)) {}

  // The field's value, or null when it is absent or JSON null (HF writes null for "not set").
  const json* find(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  std::string name(const char* key) const { return prefix_ + key; }
  // The value as the file writes it (strings quoted and escaped as in JSON, so the message stays one line).
  std::string written(const char* key, const json& v) const {
    if (text_ && v.is_number_float())
      if (auto it = text_->find(name(key)); it != text_->end()) return it->second;
    return v.dump();
  }

  void require_present(const char* key) const {
    require(find(key) != nullptr, where_, ": missing required field '", name(key), "'");
  }

  // An integer field: a JSON integer (not 4096.5, not 4096.0) in [r.lo, r.hi]; never truncated or wrapped.
  void integer(const char* key, int& out, IntRange r) const {
    const json* v = find(key);
    if (!v) return;
    bool ok = false;
    if (v->is_number_unsigned()) {
      ok = v->get<std::uint64_t>() <= std::uint64_t(r.hi) && v->get<std::uint64_t>() >= std::uint64_t(std::max(0ll, r.lo));
    } else if (v->is_number_integer()) {
      ok = v->get<std::int64_t>() >= r.lo && v->get<std::int64_t>() <= r.hi;
    }
    require(ok, where_, ": field '", name(key), "' must be an integer in [", r.lo, ", ", r.hi, "], got ",
            written(key, *v));
    out = int(v->get<std::int64_t>());
  }

  // A real field: a JSON number in `r` that a 32-bit float holds (1e39 would become inf, 1e-50 zero).
  void real(const char* key, float& out, RealRange r) const {
    const json* v = find(key);
    if (!v) return;
    const double d = v->is_number() ? v->get<double>() : std::nan("");
    require(v->is_number() && r.holds(d), where_, ": field '", name(key), "' must be a number in ", r.str(),
            ", got ", written(key, *v));
    const float f = float(d);
    require(std::isfinite(f) && (d == 0 || std::isnormal(f)), where_, ": field '", name(key), "' = ",
            written(key, *v), " does not fit in a 32-bit float (it would become ", f, ")");
    out = f;
  }

  void boolean(const char* key, bool& out) const {
    const json* v = find(key);
    if (!v) return;
    require(v->is_boolean(), where_, ": field '", name(key), "' must be true or false, got ", written(key, *v));
    out = v->get<bool>();
  }

  // A string field whose value must be one of `allowed` (empty: any string).
  void string(const char* key, std::string& out, std::initializer_list<const char*> allowed = {},
              const char* what = "") const {
    const json* v = find(key);
    if (!v) return;
    require(v->is_string(), where_, ": field '", name(key), "' must be a string, got ", written(key, *v));
    const std::string s = v->get<std::string>();
    if (allowed.size()) {
      bool ok = false;
      std::string list;
      for (const char* a : allowed) {
        ok |= s == a;
        list += std::string(list.empty() ? "" : ", ") + a;
      }
      require(ok, where_, ": field '", name(key), "' = ", written(key, *v), " is not supported", what, " (expected ",
              list, ")");
    }
    out = s;
  }

  // A RoPE scaling block (rope_scaling, or transformers 5's rope_parameters): only plain RoPE is implemented.
  void plain_rope(const char* key) const {
    const json* v = find(key);
    if (!v) return;
    const json* type = nullptr;
    if (v->is_object())
      for (const char* k : {"rope_type", "type"})
        if (auto it = v->find(k); it != v->end() && !it->is_null()) type = &*it;
    require(v->is_object() && (!type || *type == "default"), where_, ": field '", name(key), "' = ", v->dump(),
            " is not supported (EP Lab implements plain RoPE: rope_type \"default\", no scaling)");
  }

 private:
  const json& obj_;
  const std::string& where_;
  const std::map<std::string, std::string>* text_;
  std::string prefix_;
};

// A float as the double with the same shortest decimal form, so 1e-5f is written as 1e-05 and not as
// 9.999999747378752e-06 (which would read back as a different-looking config).
double json_float(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf - 1, f);
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

ModelConfig read_config(const json& j, const std::string& where, const std::map<std::string, std::string>* text) {
  require(j.is_object(), where, ": expected a JSON object");
  const FieldReader f(j, where, text);
  ModelConfig c;
  f.string("model_type", c.model_type, {"phimoe", "mixtral"});
  for (const char* k : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_local_experts", "num_experts_per_tok", "vocab_size"})
    f.require_present(k);
  f.integer("hidden_size", c.hidden_size, kHidden);
  f.integer("intermediate_size", c.intermediate_size, kIntermediate);
  f.integer("num_hidden_layers", c.num_hidden_layers, kLayers);
  f.integer("num_attention_heads", c.num_attention_heads, kHeads);
  f.integer("num_local_experts", c.num_local_experts, kExperts);
  f.integer("num_experts_per_tok", c.num_experts_per_tok, kExperts);
  f.integer("vocab_size", c.vocab_size, kVocab);
  c.num_key_value_heads = c.num_attention_heads;
  f.integer("num_key_value_heads", c.num_key_value_heads, kHeads);
  if (f.find("head_dim")) {
    f.integer("head_dim", c.head_dim, kHeadDim);
  } else {  // as HF's PhiMoE: hidden_size // num_attention_heads
    c.head_dim = c.hidden_size / c.num_attention_heads;
    require(c.head_dim >= 1, where, ": head_dim is absent and hidden_size (", c.hidden_size,
            ") / num_attention_heads (", c.num_attention_heads, ") is 0");
  }
  f.integer("max_position_embeddings", c.max_position_embeddings, kPositions);
  f.integer("sliding_window", c.sliding_window, kWindow);
  f.real("rms_norm_eps", c.rms_norm_eps, kEps);
  f.real("rope_theta", c.rope_theta, kTheta);
  f.plain_rope("rope_scaling");
  if (const json* rp = f.find("rope_parameters")) {  // transformers 5 files rope_theta here
    f.plain_rope("rope_parameters");
    FieldReader(*rp, where, text, "rope_parameters.").real("rope_theta", c.rope_theta, kTheta);
  }
  f.real("router_jitter_noise", c.router_jitter_noise, kJitter);
  f.real("input_jitter_noise", c.input_jitter_noise, kJitter);
  f.boolean("attention_bias", c.attention_bias);
  f.boolean("lm_head_bias", c.lm_head_bias);
  f.boolean("tie_word_embeddings", c.tie_word_embeddings);
  f.string("hidden_act", c.hidden_act, {"silu"}, " (PhiMoE's experts are SwiGLU)");
  f.string("torch_dtype", c.torch_dtype, {"bfloat16", "float16", "float32"});
  f.string("dtype", c.torch_dtype, {"bfloat16", "float16", "float32"});  // transformers 5's name
  c.router = c.model_type == "phimoe" ? RouterKind::SparseMixer : RouterKind::SoftmaxTopK;
  c.validate(where);
  return c;
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  return read_config(j, where, nullptr);
}

void ModelConfig::validate(const std::string& where) const {
  // The same ranges as a config.json's fields (for configs built in code: the generator's flags).
  auto in = [&](int v, const char* name, IntRange r) {
    require(v >= r.lo && v <= r.hi, where, ": '", name, "' must be in [", r.lo, ", ", r.hi, "], got ", v);
  };
  auto real = [&](float v, const char* name, RealRange r) {
    require(r.holds(v), where, ": '", name, "' must be a number in ", r.str(), ", got ", v);
  };
  in(hidden_size, "hidden_size", kHidden);
  in(intermediate_size, "intermediate_size", kIntermediate);
  in(num_hidden_layers, "num_hidden_layers", kLayers);
  in(num_attention_heads, "num_attention_heads", kHeads);
  in(num_key_value_heads, "num_key_value_heads", kHeads);
  in(head_dim, "head_dim", kHeadDim);
  in(num_local_experts, "num_local_experts", kExperts);
  in(num_experts_per_tok, "num_experts_per_tok", kExperts);
  in(vocab_size, "vocab_size", kVocab);
  if (max_position_embeddings != 0) in(max_position_embeddings, "max_position_embeddings", kPositions);  // 0: unknown
  in(sliding_window, "sliding_window", kWindow);
  real(rms_norm_eps, "rms_norm_eps", kEps);
  real(rope_theta, "rope_theta", kTheta);
  real(router_jitter_noise, "router_jitter_noise", kJitter);
  real(input_jitter_noise, "input_jitter_noise", kJitter);
  require(num_experts_per_tok <= num_local_experts, where, ": num_experts_per_tok (", num_experts_per_tok,
          ") is larger than num_local_experts (", num_local_experts, ")");
  require(num_attention_heads % num_key_value_heads == 0, where, ": num_attention_heads (", num_attention_heads,
          ") is not a multiple of num_key_value_heads (", num_key_value_heads, ")");
  require(router != RouterKind::SparseMixer || num_experts_per_tok == 2, where,
          ": sparsemixer routing needs num_experts_per_tok = 2, got ", num_experts_per_tok);
  require(model_type == "phimoe" || model_type == "mixtral", where, ": model_type ", json(model_type).dump(),
          " is not supported (expected phimoe)");
  require(hidden_act == "silu", where, ": hidden_act ", json(hidden_act).dump(), " is not supported (expected silu)");
  require(torch_dtype == "bfloat16" || torch_dtype == "float16" || torch_dtype == "float32", where, ": torch_dtype ",
          json(torch_dtype).dump(), " is not supported (expected bfloat16, float16 or float32)");
}

nlohmann::json ModelConfig::to_json() const {
  nlohmann::json j = {
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
  // 0 means the file named no context length: leave the field out (0 is not a valid value to read back).
  if (max_position_embeddings != 0) j["max_position_embeddings"] = max_position_embeddings;
  return j;
}

ModelConfig ModelConfig::load(const std::string& dir) {
  const auto path = std::filesystem::path(dir) / "config.json";
  std::error_code ec;  // a path the system refuses (e.g. too long) is reported like a missing one
  require(std::filesystem::is_directory(dir, ec), "model directory '", dir,
          "' does not exist (run `make model` to generate the default model, or pass --model DIR)");
  std::ifstream f(path, std::ios::binary);
  require(bool(f), "cannot open ", path.string());
  const std::string bytes{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  // First pass: the numbers' text as written (and, for a number too large for a double, whose it is).
  NumberText text;
  if (!nlohmann::json::sax_parse(bytes, &text)) {
    if (!text.overflow_field.empty())
      fail(path.string(), ": field '", text.overflow_field, "' is not a finite number (", text.error, ")");
    fail(path.string(), ": not valid JSON (", text.error, ")");
  }
  return read_config(nlohmann::json::parse(bytes), path.string(), &text.text);
}

}  // namespace eplab
