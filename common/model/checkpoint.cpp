// PhiMoE checkpoint directory: config + index, lazily opened shards, shape-checked reads, per-expert loading.
#include "model/checkpoint.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab {

namespace fs = std::filesystem;

namespace {
// The filesystem queries without exceptions: a path the system refuses (too long, no permission) counts as
// absent, so it ends as the usual one-line "missing" error instead of an escaped std::filesystem_error.
bool exists_(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}
bool is_dir_(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}
bool is_file_(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}
}  // namespace

// ---------------------------------------------------------------------------------------------- names

namespace names {
std::string router_gate(int layer) {
  return "model.layers." + std::to_string(layer) + ".block_sparse_moe.gate.weight";
}
std::string expert_w(int layer, int expert, int w) {
  require(w >= 1 && w <= 3, "names::expert_w: w must be 1, 2 or 3, got ", w);
  return "model.layers." + std::to_string(layer) + ".block_sparse_moe.experts." + std::to_string(expert) + ".w" +
         std::to_string(w) + ".weight";
}
std::string embed_tokens() { return "model.embed_tokens.weight"; }
std::string final_norm(const char* part) { return std::string("model.norm.") + part; }
std::string lm_head(const char* part) { return std::string("lm_head.") + part; }
std::string attn(int layer, const char* proj, const char* part) {
  return "model.layers." + std::to_string(layer) + ".self_attn." + proj + "_proj." + part;
}
std::string layer_norm(int layer, const char* which, const char* part) {
  return "model.layers." + std::to_string(layer) + "." + which + "_layernorm." + part;
}
}  // namespace names

std::vector<TensorSpec> phimoe_tensor_specs(const ModelConfig& c) {
  using S = std::vector<std::int64_t>;
  const std::int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, E = c.num_local_experts;
  const std::int64_t Q = std::int64_t(c.num_attention_heads) * c.head_dim;
  const std::int64_t KV = std::int64_t(c.num_key_value_heads) * c.head_dim;
  std::vector<TensorSpec> out;
  out.push_back({names::embed_tokens(), S{V, H}});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    for (const char* which : {"input", "post_attention"}) {
      out.push_back({names::layer_norm(l, which, "weight"), S{H}});
      out.push_back({names::layer_norm(l, which, "bias"), S{H}});
    }
    const struct { const char* proj; std::int64_t out_f, in_f; } projs[] = {
        {"q", Q, H}, {"k", KV, H}, {"v", KV, H}, {"o", H, Q}};
    for (const auto& p : projs) {
      out.push_back({names::attn(l, p.proj, "weight"), S{p.out_f, p.in_f}});
      if (c.attention_bias) out.push_back({names::attn(l, p.proj, "bias"), S{p.out_f}});
    }
    out.push_back({names::router_gate(l), S{E, H}});
    for (int e = 0; e < E; ++e) {
      out.push_back({names::expert_w(l, e, 1), S{I, H}});
      out.push_back({names::expert_w(l, e, 2), S{H, I}});
      out.push_back({names::expert_w(l, e, 3), S{I, H}});
    }
  }
  out.push_back({names::final_norm("weight"), S{H}});
  out.push_back({names::final_norm("bias"), S{H}});
  if (!c.tie_word_embeddings) out.push_back({names::lm_head("weight"), S{V, H}});
  if (c.lm_head_bias) out.push_back({names::lm_head("bias"), S{V}});
  return out;
}

// ---------------------------------------------------------------------------------------------- Checkpoint

namespace {

// Parses "model.layers.<l>." and "...experts.<e>." out of a tensor name; -1 where absent.
int number_after(const std::string& name, const std::string& prefix) {
  const auto p = name.find(prefix);
  if (p == std::string::npos) return -1;
  std::size_t i = p + prefix.size();
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  long v = 0;
  while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])) && v < 1000000000) v = v * 10 + (name[i++] - '0');
  return int(v);
}

// The highest layer and expert numbers among the tensor names, with a tensor that has each.
struct NameCounts {
  int max_layer = -1, max_expert = -1;
  std::string layer_example, expert_example;
};
NameCounts name_counts(const std::map<std::string, std::string>& weight_map) {
  NameCounts n;
  for (const auto& [name, file] : weight_map) {
    if (int l = number_after(name, "model.layers."); l > n.max_layer) { n.max_layer = l; n.layer_example = name; }
    if (int e = number_after(name, ".experts."); e > n.max_expert) { n.max_expert = e; n.expert_example = name; }
  }
  return n;
}

// A config that says the model has a layer the checkpoint does not hold; the message of the reverse case
// (a layer the config does not have) is validate_names_against_config's.
void check_layer_count(const NameCounts& n, const ModelConfig& c, const std::string& cfg) {
  require(n.max_layer < c.num_hidden_layers, cfg, ": num_hidden_layers = ", c.num_hidden_layers,
          " but the checkpoint holds layer ", n.max_layer, " (tensor '", n.layer_example,
          "'): config.json does not match the weights");
  require(n.max_layer + 1 >= c.num_hidden_layers, cfg, ": num_hidden_layers = ", c.num_hidden_layers,
          " but the checkpoint holds ", n.max_layer + 1, " layers (it lacks tensor '",
          names::router_gate(c.num_hidden_layers - 1), "'): config.json does not match the weights");
}

}  // namespace

struct Checkpoint::Impl {
  std::string dir;
  ModelConfig config;
  std::string index_path;                           // empty for a single model.safetensors
  std::map<std::string, std::string> weight_map;    // tensor name -> shard file (relative to dir)
  std::vector<std::string> shards;                  // sorted, unique
  bool weights_present = true;                      // false: metadata only (no shard on disk)
  std::optional<std::uint64_t> total_size;          // the index's metadata.total_size
  mutable std::mutex mu;                            // guards `files` (lazy opening from several threads)
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> files;

  const SafetensorsFile& shard(const std::string& file) const {
    require(weights_present, "checkpoint ", dir, " holds metadata only (config.json and ", index_path,
            ", none of the shards): its weights cannot be read; download the shards into ", dir);
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = files[file];
    if (!slot) slot = std::make_unique<SafetensorsFile>(SafetensorsFile::open((fs::path(dir) / file).string()));
    return *slot;
  }
  std::string where(const std::string& file) const { return (fs::path(dir) / file).string(); }

  // A tensor's info and bytes, after checking it exists and has exactly `shape`.
  std::pair<const TensorInfo*, std::span<const std::byte>> located(const std::string& name,
                                                                   const std::vector<std::int64_t>& shape) const {
    auto it = weight_map.find(name);
    require(it != weight_map.end(), "checkpoint ", dir, " has no tensor '", name, "'");
    const SafetensorsFile& f = shard(it->second);
    const TensorInfo* t = f.find(name);
    require(t != nullptr, f.path(), ": tensor '", name, "' is listed in the index for this shard but not in it");
    if (t->shape != shape) {
      TensorInfo want;
      want.shape = shape;
      fail(f.path(), ": tensor '", name, "' has shape ", t->shape_str(), ", expected ", want.shape_str());
    }
    return {t, f.bytes(*t)};
  }
};

Checkpoint::Checkpoint() : impl_(std::make_unique<Impl>()) {}
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

Checkpoint Checkpoint::open(const std::string& dir, Shards shards) {
  Checkpoint ck;
  Impl& m = *ck.impl_;
  m.dir = dir;
  require(!exists_(dir) || is_dir_(dir), "model directory '", dir,
          "' is a file, not a directory (pass the directory that holds config.json)");
  m.config = ModelConfig::load(dir);  // also reports a missing directory

  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (exists_(index)) {
    m.index_path = index.string();
    std::ifstream f(index);
    require(bool(f), m.index_path, ": cannot open");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::parse_error& e) {
      fail(m.index_path, ": not valid JSON (byte ", e.byte, ")");
    }
    require(j.is_object(), m.index_path, ": expected a JSON object");
    auto wm = j.find("weight_map");
    require(wm != j.end() && wm->is_object(), m.index_path, ": missing 'weight_map' object");
    require(!wm->empty(), m.index_path, ": 'weight_map' is empty");
    std::set<std::string> shard_set;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      require(it.value().is_string(), m.index_path, ": weight_map entry for tensor '", it.key(), "' is not a string");
      const std::string file = it.value().get<std::string>();
      // Shards sit next to the index; refusing paths keeps a hostile index from pointing elsewhere.
      require(!file.empty() && file.find('/') == std::string::npos && file != "." && file != "..", m.index_path,
              ": tensor '", it.key(), "' maps to invalid shard file name '", file, "'");
      m.weight_map[it.key()] = file;
      shard_set.insert(file);
    }
    m.shards.assign(shard_set.begin(), shard_set.end());
    if (auto md = j.find("metadata"); md != j.end() && md->is_object()) {
      if (auto ts = md->find("total_size"); ts != md->end() && !ts->is_null()) {
        require(ts->is_number_unsigned() || (ts->is_number_integer() && ts->get<std::int64_t>() >= 0),
                m.index_path, ": metadata.total_size is not a byte count (", ts->dump(), ")");
        m.total_size = ts->get<std::uint64_t>();
      }
    }
    std::size_t present = 0;
    for (const auto& s : m.shards) present += is_file_(fs::path(dir) / s) ? 1 : 0;
    if (present == 0 && shards == Shards::AllOrNone) {
      m.weights_present = false;
    } else {
      for (const auto& s : m.shards)
        require(is_file_(fs::path(dir) / s), m.where(s), ": shard named by ", m.index_path,
                " is missing (", present, " of ", m.shards.size(),
                " shards present: incomplete download? re-fetch or regenerate the model)");
    }
  } else if (exists_(single)) {
    m.shards = {"model.safetensors"};
    const SafetensorsFile& f = m.shard("model.safetensors");
    for (const auto& [name, t] : f.tensors()) m.weight_map[name] = "model.safetensors";
  } else {
    fail("model directory '", dir, "' has config.json but neither model.safetensors.index.json nor model.safetensors");
  }
  // The config against the names (no shard is opened, so a metadata-only checkpoint is checked too): every
  // layer and expert config.json gives the model must be in the checkpoint, and no layer beyond them (no later
  // check would see that one; a config with fewer experts fails on the router's [E, H] shape when read).
  const NameCounts n = name_counts(m.weight_map);
  const std::string cfg = (fs::path(dir) / "config.json").string();
  check_layer_count(n, m.config, cfg);
  require(n.max_expert + 1 >= m.config.num_local_experts, cfg, ": num_local_experts = ", m.config.num_local_experts,
          " but the checkpoint holds ", n.max_expert + 1, " experts per layer (it lacks tensor '",
          names::expert_w(0, m.config.num_local_experts - 1, 1), "'): config.json does not match the weights");
  return ck;
}

const std::string& Checkpoint::dir() const { return impl_->dir; }
const ModelConfig& Checkpoint::config() const { return impl_->config; }
bool Checkpoint::weights_present() const { return impl_->weights_present; }
std::optional<std::uint64_t> Checkpoint::index_total_size() const { return impl_->total_size; }
bool Checkpoint::has(const std::string& name) const { return impl_->weight_map.count(name) != 0; }

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = impl_->weight_map.find(name);
  require(it != impl_->weight_map.end(), "checkpoint ", impl_->dir, " has no tensor '", name, "'");
  const SafetensorsFile& f = impl_->shard(it->second);
  const TensorInfo* t = f.find(name);
  require(t != nullptr, f.path(), ": tensor '", name, "' is listed in the index for this shard but not in it");
  return *t;
}

std::vector<bf16_bits> Checkpoint::read_bf16(const std::string& name, const std::vector<std::int64_t>& shape) const {
  const auto [tp, bytes] = impl_->located(name, shape);
  const TensorInfo& t = *tp;
  const std::size_t n = std::size_t(t.numel());
  std::vector<bf16_bits> out(n);
  switch (t.dtype) {
    case Dtype::BF16:
      if (n) std::memcpy(out.data(), bytes.data(), n * 2);  // an empty tensor has no data pointer
      break;
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, bytes.data() + 2 * i, 2);
        out[i] = float_to_bf16(f16_to_float(h));
      }
      break;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, bytes.data() + 4 * i, 4);
        out[i] = float_to_bf16(f);
      }
      break;
  }
  return out;
}

std::vector<float> Checkpoint::read_f32(const std::string& name, const std::vector<std::int64_t>& shape) const {
  const auto [tp, bytes] = impl_->located(name, shape);
  const TensorInfo& t = *tp;
  const std::size_t n = std::size_t(t.numel());
  std::vector<float> out(n);
  switch (t.dtype) {
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        bf16_bits b;
        std::memcpy(&b, bytes.data() + 2 * i, 2);
        out[i] = bf16_to_float(b);
      }
      break;
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, bytes.data() + 2 * i, 2);
        out[i] = f16_to_float(h);
      }
      break;
    case Dtype::F32:
      if (n) std::memcpy(out.data(), bytes.data(), n * 4);  // an empty tensor has no data pointer
      break;
  }
  return out;
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> out;
  out.reserve(impl_->weight_map.size());
  for (const auto& [name, file] : impl_->weight_map) out.push_back(name);
  return out;
}

std::vector<std::string> Checkpoint::shard_files() const { return impl_->shards; }

void Checkpoint::open_all_shards() const {
  for (const auto& s : impl_->shards) impl_->shard(s);
}

void Checkpoint::validate_names_against_config() const {
  const ModelConfig& c = impl_->config;
  const std::string cfg = (fs::path(impl_->dir) / "config.json").string();

  // First, tensors for layers or experts the config does not have: the clearest sign of a config that
  // does not belong to these weights (e.g. num_local_experts = 8 over a 16-expert checkpoint).
  const NameCounts n = name_counts(impl_->weight_map);
  require(n.max_expert < c.num_local_experts, cfg, ": num_local_experts = ", c.num_local_experts,
          " but the checkpoint holds expert ", n.max_expert, " (tensor '", n.expert_example,
          "'): config.json does not match the weights");
  check_layer_count(n, c, cfg);

  // Then every tensor PhiMoE needs exists (a missing expert says more than the router's shape would).
  for (const TensorSpec& s : phimoe_tensor_specs(c)) {
    if (impl_->weight_map.count(s.name)) continue;
    TensorInfo want;
    want.shape = s.shape;
    fail("checkpoint ", impl_->dir, " lacks tensor '", s.name, "' ", want.shape_str(), " that ", cfg, " implies (",
         c.num_hidden_layers, " layers, ", c.num_local_experts, " experts): wrong config or incomplete checkpoint");
  }
}

void Checkpoint::validate_against_config() const {
  const ModelConfig& c = impl_->config;
  open_all_shards();
  validate_names_against_config();
  // Then that every tensor has the shape the config implies.
  for (const TensorSpec& s : phimoe_tensor_specs(c)) {
    auto it = impl_->weight_map.find(s.name);
    const TensorInfo& t = info(s.name);
    if (t.shape != s.shape) {
      TensorInfo want;
      want.shape = s.shape;
      fail(impl_->where(it->second), ": tensor '", s.name, "' has shape ", t.shape_str(), " (", dtype_name(t.dtype),
           ") but config.json implies ", want.shape_str(), " (hidden ", c.hidden_size, ", intermediate ",
           c.intermediate_size, ", ", c.num_local_experts, " experts)");
    }
  }
}

DiskCounts Checkpoint::disk_counts() const {
  DiskCounts d;
  d.shards = int(impl_->shards.size());
  for (const auto& [name, file] : impl_->weight_map) {
    const TensorInfo& t = info(name);
    d.tensors += 1;
    d.params += t.numel();
    d.bytes += t.end - t.begin;
    if (name.find(".block_sparse_moe.experts.") != std::string::npos) d.expert_params += t.numel();
  }
  return d;
}

// ---------------------------------------------------------------------------------------------- MoE layer

MoeLayerWeights load_moe_layer(const Checkpoint& ckpt, int layer, std::span<const int> experts) {
  const ModelConfig& c = ckpt.config();
  require(layer >= 0 && layer < c.num_hidden_layers, "load_moe_layer: layer ", layer, " is out of range (the model has ",
          c.num_hidden_layers, " layers)");
  MoeLayerWeights w;
  w.layer = layer;
  w.hidden = c.hidden_size;
  w.inter = c.intermediate_size;
  w.num_experts = c.num_local_experts;
  if (experts.empty()) {
    for (int e = 0; e < c.num_local_experts; ++e) w.expert_ids.push_back(e);
  } else {
    w.expert_ids.assign(experts.begin(), experts.end());
    std::sort(w.expert_ids.begin(), w.expert_ids.end());
    for (std::size_t i = 0; i < w.expert_ids.size(); ++i) {
      const int e = w.expert_ids[i];
      require(e >= 0 && e < c.num_local_experts, "load_moe_layer: expert id ", e, " is out of range (the model has ",
              c.num_local_experts, " experts)");
      require(i == 0 || w.expert_ids[i - 1] != e, "load_moe_layer: expert id ", e, " is listed twice");
    }
  }
  const std::int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_local_experts;
  w.gate = ckpt.read_bf16(names::router_gate(layer), {E, H});
  const std::size_t n = w.expert_ids.size(), per = std::size_t(I * H);
  w.w1.resize(n * per);
  w.w3.resize(n * per);
  w.w2.resize(n * per);
  for (std::size_t i = 0; i < n; ++i) {
    const int e = w.expert_ids[i];
    auto copy_in = [&](std::vector<bf16_bits>& dst, int which, std::vector<std::int64_t> shape) {
      const auto v = ckpt.read_bf16(names::expert_w(layer, e, which), shape);
      std::copy(v.begin(), v.end(), dst.begin() + std::ptrdiff_t(i * per));
    };
    copy_in(w.w1, 1, {I, H});
    copy_in(w.w3, 3, {I, H});
    copy_in(w.w2, 2, {H, I});
  }
  return w;
}

MoeLayerWeights weights_for_slots(const MoeLayerWeights& held, std::span<const int> slot_experts) {
  MoeLayerWeights w;
  w.layer = held.layer;
  w.hidden = held.hidden;
  w.inter = held.inter;
  w.num_experts = held.num_experts;
  w.gate = held.gate;
  const std::size_t per = std::size_t(held.inter) * held.hidden;
  for (int e : slot_experts) {
    const auto it = std::find(held.expert_ids.begin(), held.expert_ids.end(), e);
    require(it != held.expert_ids.end(), "weights_for_slots: expert ", e, " of layer ", held.layer,
            " is not among the ", held.num_held(), " experts loaded");
    const std::size_t i = std::size_t(it - held.expert_ids.begin());
    w.expert_ids.push_back(e);
    for (auto [dst, src] : {std::pair{&w.w1, &held.w1}, std::pair{&w.w3, &held.w3}, std::pair{&w.w2, &held.w2}})
      dst->insert(dst->end(), src->begin() + std::ptrdiff_t(i * per), src->begin() + std::ptrdiff_t((i + 1) * per));
  }
  return w;
}

}  // namespace eplab
