// A PhiMoE checkpoint directory in Hugging Face format, and the tensor names PhiMoE uses.
//
// <dir>/config.json plus either one model.safetensors or shards listed in model.safetensors.index.json
// ({"weight_map": {"tensor name": "shard file"}}). Shards are opened (and validated) lazily, on first use,
// so a rank that loads only its experts never maps the other shards' pages.
#pragma once
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "util/bf16.hpp"

namespace eplab {

// PhiMoE's on-disk tensor names (see DESIGN.md).
namespace names {
std::string router_gate(int layer);                 // model.layers.{l}.block_sparse_moe.gate.weight  [E, H]
std::string expert_w(int layer, int expert, int w);  // ...experts.{e}.w{1,2,3}.weight
std::string embed_tokens();                          // model.embed_tokens.weight [V, H]
std::string final_norm(const char* part);            // model.norm.{weight,bias}
std::string lm_head(const char* part);               // lm_head.{weight,bias}
std::string attn(int layer, const char* proj, const char* part);  // model.layers.{l}.self_attn.{q,k,v,o}_proj.{weight,bias}
std::string layer_norm(int layer, const char* which, const char* part);  // {input,post_attention}_layernorm.{weight,bias}
}  // namespace names

class Checkpoint {
 public:
  // Reads config.json and the index (or the single file). A missing shard named by the index is
  // reported when the checkpoint is opened, not later.
  static Checkpoint open(const std::string& dir);
  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const std::string& dir() const;
  const ModelConfig& config() const;
  bool has(const std::string& name) const;
  // Validated info for a tensor; throws naming the tensor when it is absent.
  const TensorInfo& info(const std::string& name) const;
  // Reads a tensor, checks its shape equals `shape`, converts to the requested type.
  std::vector<bf16_bits> read_bf16(const std::string& name, const std::vector<std::int64_t>& shape) const;
  std::vector<float> read_f32(const std::string& name, const std::vector<std::int64_t>& shape) const;
  std::vector<std::string> tensor_names() const;
  std::vector<std::string> shard_files() const;  // file names, relative to dir()

 private:
  Checkpoint();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One MoE layer's router and a subset of its experts, bf16, as on disk.
struct MoeLayerWeights {
  int layer = 0, hidden = 0, inter = 0, num_experts = 0;
  std::vector<int> expert_ids;    // the global expert ids held here, ascending
  std::vector<bf16_bits> gate;    // [E, H] router weight (every rank keeps all of it)
  std::vector<bf16_bits> w1, w3;  // [n, I, H], n = expert_ids.size(), in expert_ids order
  std::vector<bf16_bits> w2;      // [n, H, I]
  int num_held() const { return int(expert_ids.size()); }
};

// Loads layer `layer`'s gate and the listed experts (empty = all). Throws on a bad id, a missing tensor
// or a shape that disagrees with the config.
MoeLayerWeights load_moe_layer(const Checkpoint& ckpt, int layer, std::span<const int> experts = {});

}  // namespace eplab
