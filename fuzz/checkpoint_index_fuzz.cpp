// Fuzz target: the checkpoint index reader (common/model/checkpoint.cpp, model.safetensors.index.json).
//
// Input: the text of model.safetensors.index.json. It lies in a directory next to a small valid config.json
// and one valid shard, "model-00001-of-00002.safetensors", holding every tensor that config implies (made once
// per process with SafetensorsWriter); "model-00002-of-00002.safetensors" is never there.
// What must hold: Checkpoint::open, with Shards::All and with Shards::AllOrNone, throws eplab::Error or gives a
// checkpoint whose every query (names, shards, total_size, name and shape validation, disk counts, reads of
// every listed tensor) throws eplab::Error or answers; a tensor the index lists and the shard holds reads back.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

const char* kConfig = R"({"model_type": "phimoe", "hidden_size": 4, "intermediate_size": 2, "num_hidden_layers": 1,
  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "num_local_experts": 2,
  "num_experts_per_tok": 2, "vocab_size": 8})";

std::string make_dir() {
  auto& scratch = fuzz::ScratchDir::get();
  const std::string dir = scratch.subdir("index");
  scratch.write("index/config.json", kConfig);
  const ModelConfig c = ModelConfig::load(dir);
  SafetensorsWriter w;
  std::uint16_t v = 0;
  for (const TensorSpec& s : phimoe_tensor_specs(c)) {
    std::int64_t n = 1;
    for (auto d : s.shape) n *= d;
    std::vector<std::uint16_t> data(static_cast<std::size_t>(n));
    for (auto& x : data) x = std::uint16_t(0x3f80 + (v++ & 0x3f));  // bf16 values near 1
    w.add(s.name, Dtype::BF16, s.shape, std::as_bytes(std::span(data)));
  }
  w.write(scratch.file("index/model-00001-of-00002.safetensors"));
  return dir;
}

void exercise(const Checkpoint& ck) {
  std::uint64_t sink = ck.tensor_names().size() + ck.shard_files().size() + ck.index_total_size().value_or(0);
  try {
    ck.validate_names_against_config();
  } catch (const Error& e) {
    fuzz::one_line(e);
  }
  if (!ck.weights_present()) return;
  for (const std::string& name : ck.tensor_names()) {
    if (!ck.has(name)) fuzz::broken("has() denies a listed tensor");
    try {
      const TensorInfo& t = ck.info(name);
      sink += ck.read_f32(name, t.shape).size();
    } catch (const Error& e) {
      fuzz::one_line(e);
    }
  }
  try {
    const DiskCounts d = ck.disk_counts();
    sink += std::uint64_t(d.params);
  } catch (const Error& e) {
    fuzz::one_line(e);
  }
  try {
    ck.validate_against_config();
    const MoeLayerWeights w = load_moe_layer(ck, 0);
    sink += w.gate.size();
  } catch (const Error& e) {
    fuzz::one_line(e);
  }
  if (sink == 42) std::fputc(' ', stderr);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string dir = make_dir();
  fuzz::ScratchDir::get().write("index/model.safetensors.index.json", fuzz::as_view(data, size));
  for (const auto shards : {Checkpoint::Shards::AllOrNone, Checkpoint::Shards::All}) {
    try {
      exercise(Checkpoint::open(dir, shards));
    } catch (const Error& e) {
      fuzz::one_line(e);
    }
  }
  return 0;
}
