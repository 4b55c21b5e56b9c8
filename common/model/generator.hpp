// Synthetic PhiMoE checkpoints: random weights in the exact on-disk format of a Hugging Face PhiMoE
// model (config.json, sharded safetensors, model.safetensors.index.json), deterministic by seed, plus
// a copy of a tokenizer.json when one is given (so text prompts work on the model).
//
// Every tensor of phimoe_tensor_specs(config) is written as BF16, in that order, packed greedily into
// shards of at most shard_bytes (a bigger tensor gets a shard of its own). Shards are named as
// transformers' save_pretrained names them: model-00001-of-00003.safetensors.
//
// Determinism: element i of tensor `name` depends only on (seed, name, i / kChunk): each chunk of a
// tensor has its own RNG stream, so the bytes do not depend on the shard size or the thread count.
// The noise is Irwin-Hall (sum of four 16-bit uniforms from one splitmix64 draw, rescaled to unit
// variance): close enough to a normal for synthetic weights, bounded by +-3.46 sigma, and about ten
// times faster than Box-Muller, which matters for the 3.76 B-parameter phi-tiny preset.
//
// Initialisation, chosen so activations stay O(1) and routing is non-trivial (unit-variance inputs x,
// which is what the pre-norm LayerNorm hands each block):
//   embed_tokens                 std 1                 residual stream starts O(1)
//   q/k/v/o_proj.weight          std 1/sqrt(fan_in)    outputs keep the input's scale
//   *.bias (attention, lm_head)  std 0.02              small offsets
//   *_layernorm / norm .weight   1 + 0.05 n            ~1, not exactly 1, so a wrong norm shows up
//   *_layernorm / norm .bias     0.02 n                ~0
//   block_sparse_moe.gate        std 1/sqrt(H)         router logits std ~1: top-2 varies per token,
//                                                      sparsemixer multipliers are not all ~1 or ~0.5
//   experts w1, w3               std 1/sqrt(H)         w1 x, w3 x ~ N(0, 1)
//   experts w2                   std 1/sqrt(I)         expert output O(1)
//   lm_head.weight               std 1/sqrt(H)         logits O(1)
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "model/config.hpp"

namespace eplab {

// "mini": the default model for `make demo` and the tests (hidden 256, 4 layers, 16 experts, top-2,
// vocab 32064; ~46 MB, written as 3 shards at the default shard size so the index path is exercised).
// "phi-tiny": the real Phi-tiny-MoE shape (3.76 B parameters, ~7.5 GB).
ModelConfig generator_preset(const std::string& name);  // throws on an unknown name
std::uint64_t generator_default_shard_mb(const std::string& preset);

// How one tensor is initialised: value = mean + std * n, n ~ unit-variance noise.
struct InitSpec {
  float mean = 0.f;
  float std = 0.f;
};
InitSpec init_spec(const std::string& tensor_name, const ModelConfig& c);

struct GeneratorOptions {
  std::uint64_t seed = 1;
  std::uint64_t shard_bytes = 16ull << 20;
  int threads = 0;                                       // 0: all hardware threads
  std::function<void(const std::string&)> log = nullptr;  // one line per shard written; null = quiet
  std::string name_or_path = "eplab-synthetic";           // written to config.json's _name_or_path
  // An HF tokenizer.json copied into the model as tokenizer.json; empty = none. Its ids must fit the
  // model's vocab_size (checked: a tokenizer with more ids than the embedding has rows is an error).
  std::string tokenizer_json;
  // Write config.json and the index only, no shards: the metadata of the model a download starts with
  // (chapter 00 reads it). The index names the shards the full model would have.
  bool metadata_only = false;
};

struct GeneratedModel {
  int shards = 0;
  std::int64_t tensors = 0;
  std::int64_t params = 0;
  std::uint64_t bytes = 0;  // tensor bytes (= index metadata.total_size)
  int tokenizer_ids = 0;    // ids of the copied tokenizer.json (0: none written)
};

// Writes the model into out_dir (created if needed). Files of an earlier model there (config.json,
// the index, model*.safetensors, tokenizer.json) are removed first; nothing else is touched. Streams: each shard's
// header is written first, then its tensors one at a time from one reused buffer, so memory stays at
// the largest tensor (the 263 MB embedding for phi-tiny), whatever the model or shard size.
GeneratedModel generate_model(const std::string& out_dir, const ModelConfig& config, const GeneratorOptions& opt);

}  // namespace eplab
