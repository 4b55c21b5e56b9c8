// A PhiMoE checkpoint directory in Hugging Face format, and the tensor names PhiMoE uses.
//
// <dir>/config.json plus either one model.safetensors or shards listed in model.safetensors.index.json
// ({"metadata": {"total_size": bytes}, "weight_map": {"tensor name": "shard file"}}). Shards are opened
// (and validated) lazily, on first use, so a rank that loads only its experts never maps the other shards'
// pages. Opened with Shards::AllOrNone, a directory with config.json and the index but none of the shards
// (what a student downloads first, a few KB) is a metadata-only checkpoint: its names and sizes can be
// checked against the config, its weights cannot be read.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
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

// One tensor a PhiMoE checkpoint must hold, with the shape its config implies.
struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;
};
// Every tensor PhiMoE needs for config `c`, in a fixed order: embedding, then per layer (norms, attention,
// router, experts 0..E-1 as w1, w2, w3), final norm, lm_head. Honours attention_bias, lm_head_bias and
// tie_word_embeddings. The model generator writes exactly this list; validate_against_config checks it.
std::vector<TensorSpec> phimoe_tensor_specs(const ModelConfig& c);

// What is on disk, summed over every tensor in every shard (numbers chapter 00 checks against the config).
struct DiskCounts {
  std::int64_t tensors = 0;
  std::int64_t params = 0;         // sum of numel
  std::int64_t expert_params = 0;  // numel of ...block_sparse_moe.experts.* tensors
  std::uint64_t bytes = 0;         // tensor bytes (headers not included)
  int shards = 0;
};

class Checkpoint {
 public:
  // What open() requires of the shards an index names.
  enum class Shards {
    All,        // every shard must be there (everything that reads weights)
    AllOrNone,  // every shard, or none of them: a metadata-only checkpoint (chapter 00)
  };
  // Reads config.json and the index (or the single file). A missing shard named by the index is
  // reported when the checkpoint is opened, not later (with AllOrNone: unless every shard is missing).
  // `dir` must be a directory; a file or a missing path is reported as such. The config is checked against
  // the tensor names (no shard opened): a layer count or an expert count the checkpoint does not hold is
  // refused here, with one line.
  static Checkpoint open(const std::string& dir, Shards shards = Shards::All);
  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const std::string& dir() const;
  const ModelConfig& config() const;
  // False only for a metadata-only checkpoint (Shards::AllOrNone, no shard on disk); then every call that
  // reads a shard (info, read_*, open_all_shards, validate_against_config, disk_counts) throws saying so.
  bool weights_present() const;
  // The index's metadata.total_size (tensor bytes, headers excluded) when the index gives it; none for a
  // single model.safetensors.
  std::optional<std::uint64_t> index_total_size() const;
  bool has(const std::string& name) const;
  // Validated info for a tensor; throws naming the tensor when it is absent.
  const TensorInfo& info(const std::string& name) const;
  // Reads a tensor, checks its shape equals `shape`, converts to the requested type.
  std::vector<bf16_bits> read_bf16(const std::string& name, const std::vector<std::int64_t>& shape) const;
  std::vector<float> read_f32(const std::string& name, const std::vector<std::int64_t>& shape) const;
  std::vector<std::string> tensor_names() const;
  std::vector<std::string> shard_files() const;  // file names, relative to dir()

  // Opens and validates every shard's header now (no tensor data is read).
  void open_all_shards() const;
  // The names alone, no shard opened (works on a metadata-only checkpoint): no tensor belongs to a layer or
  // expert the config does not have, and every tensor of phimoe_tensor_specs(config()) is listed. Throws
  // eplab::Error naming the tensor. Names the config does not imply are left to the caller to count.
  void validate_names_against_config() const;
  // validate_names_against_config(), then that every tensor in phimoe_tensor_specs(config()) has exactly
  // that shape. Throws eplab::Error naming the tensor, its file and the expected shape. Opens every shard.
  void validate_against_config() const;
  // Counts over all tensors listed by the index (opens every shard).
  DiskCounts disk_counts() const;

 private:
  Checkpoint();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One MoE layer's router and a subset of its experts, bf16, as on disk.
struct MoeLayerWeights {
  int layer = 0, hidden = 0, inter = 0, num_experts = 0;
  std::vector<int> expert_ids;    // the global expert ids held here: ascending, or a placement's slots (below)
  std::vector<bf16_bits> gate;    // [E, H] router weight (every rank keeps all of it)
  std::vector<bf16_bits> w1, w3;  // [n, I, H], n = expert_ids.size(), in expert_ids order
  std::vector<bf16_bits> w2;      // [n, H, I]
  int num_held() const { return int(expert_ids.size()); }
};

// Loads layer `layer`'s gate and the listed experts (empty = all). Throws on a bad id, a missing tensor
// or a shape that disagrees with the config.
MoeLayerWeights load_moe_layer(const Checkpoint& ckpt, int layer, std::span<const int> experts = {});

// The weights of a rank's slots (placement.hpp: one copy per slot, so a replicated expert appears as often as
// it has slots here, in slot order) from a layer that holds each of those experts. Throws when one is missing.
MoeLayerWeights weights_for_slots(const MoeLayerWeights& held, std::span<const int> slot_experts);

}  // namespace eplab
