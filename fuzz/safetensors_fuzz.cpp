// Fuzz target: the safetensors reader (common/model/safetensors.cpp) and the checkpoint reads on top of it.
//
// Input: the bytes of one .safetensors file (8-byte little-endian header length, JSON header, data).
// What must hold:
//  - SafetensorsFile::open either throws eplab::Error or returns tensors whose byte ranges lie inside the
//    file (every byte of every tensor is read here, so a range past the mapping crashes);
//  - what the reader returns, SafetensorsWriter writes back, and the reader reads again the same names,
//    dtypes, shapes, metadata and bytes;
//  - the file as a single-file checkpoint (model.safetensors next to a small config.json): read_f32 and
//    read_bf16 of every tensor, disk_counts and validate_against_config throw eplab::Error or succeed.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "model/checkpoint.hpp"
#include "model/safetensors.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

// A tiny PhiMoE shape (the config every input is checked against as a checkpoint).
const char* kConfig = R"({"model_type": "phimoe", "hidden_size": 4, "intermediate_size": 2, "num_hidden_layers": 1,
  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "num_local_experts": 2,
  "num_experts_per_tok": 2, "vocab_size": 8})";

std::uint64_t touch(std::span<const std::byte> b) {
  std::uint64_t h = 0;
  for (std::byte x : b) h = h * 31 + std::uint64_t(x);
  return h;
}

void round_trip(const SafetensorsFile& f) {
  SafetensorsWriter w;
  for (const auto& [name, t] : f.tensors()) {
    if (name.empty()) return;  // the writer refuses empty names (the format allows them)
    w.add(name, t.dtype, t.shape, f.bytes(t));
  }
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  const std::string p = fuzz::ScratchDir::get().file("round_trip.safetensors");
  w.write(p);
  const SafetensorsFile g = SafetensorsFile::open(p);
  if (g.tensors().size() != f.tensors().size()) fuzz::broken("round trip: tensor count differs");
  if (g.metadata() != f.metadata()) fuzz::broken("round trip: metadata differs");
  for (const auto& [name, t] : f.tensors()) {
    const TensorInfo* u = g.find(name);
    if (!u) fuzz::broken("round trip: a tensor is missing");
    if (u->dtype != t.dtype || u->shape != t.shape) fuzz::broken("round trip: dtype or shape differs");
    const auto a = f.bytes(t), b = g.bytes(*u);
    if (a.size() != b.size() || (!a.empty() && std::memcmp(a.data(), b.data(), a.size()) != 0))
      fuzz::broken("round trip: bytes differ");
  }
}

void as_checkpoint(std::string_view bytes) {
  auto& scratch = fuzz::ScratchDir::get();
  static const std::string dir = [&] {
    const std::string d = scratch.subdir("ckpt");
    scratch.write("ckpt/config.json", kConfig);
    return d;
  }();
  scratch.write("ckpt/model.safetensors", bytes);
  const Checkpoint ck = Checkpoint::open(dir);
  std::uint64_t sink = 0;
  for (const std::string& name : ck.tensor_names()) {
    const TensorInfo& t = ck.info(name);
    const auto f = ck.read_f32(name, t.shape);
    const auto b = ck.read_bf16(name, t.shape);
    if (f.size() != std::size_t(t.numel()) || b.size() != f.size()) fuzz::broken("read: wrong element count");
    for (float x : f) sink += std::uint64_t(x == x);
  }
  const DiskCounts d = ck.disk_counts();
  sink += std::uint64_t(d.params) + d.bytes;
  try {
    ck.validate_against_config();
  } catch (const Error& e) {
    fuzz::one_line(e);
  }
  if (sink == 42) std::fputc(' ', stderr);  // keep the reads
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = fuzz::as_view(data, size);
  const std::string path = fuzz::ScratchDir::get().write("input.safetensors", bytes);
  try {
    const SafetensorsFile f = SafetensorsFile::open(path);
    std::uint64_t sink = 0;
    for (const auto& [name, t] : f.tensors()) {
      sink += touch(f.bytes(t)) + std::uint64_t(t.numel()) + t.shape_str().size();
      if (f.find(name) != &t) fuzz::broken("find() does not return the listed tensor");
    }
    if (sink == 42) std::fputc(' ', stderr);
    round_trip(f);
  } catch (const Error& e) {
    fuzz::one_line(e);
    return 0;  // refused with a message: fine (and the checkpoint below would refuse it too)
  }
  try {
    as_checkpoint(bytes);
  } catch (const Error& e) {
    fuzz::one_line(e);
  }
  return 0;
}
