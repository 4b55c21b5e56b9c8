// Checkpoint: PhiMoE names, the index path and the single-file path, lazy shard opening, shape checks,
// BF16/F16/F32 conversion, loading any subset of a layer's experts, validate_against_config, metadata-only
// checkpoints (config + index, no shards) and data/phi-tiny-moe, the real model's metadata.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "model/generator.hpp"
#include "moe/cost_model.hpp"
#include "util/check.hpp"
#include "tmp_dir.hpp"

using namespace eplab;
namespace fs = std::filesystem;

namespace {

using testing::TmpDir;

ModelConfig small_config() {
  ModelConfig c = generator_preset("mini");
  c.hidden_size = 64;
  c.intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 100;
  return c;  // 16 experts, top-2
}

void make_small(const fs::path& dir, std::uint64_t shard_bytes = 64 << 10) {
  GeneratorOptions o;
  o.seed = 7;
  o.shard_bytes = shard_bytes;
  generate_model(dir.string(), small_config(), o);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Rewrites every tensor of a shard through `edit` (which may change dtype, shape and bytes).
using Edit = std::function<void(const std::string&, Dtype&, std::vector<std::int64_t>&, std::vector<std::byte>&)>;
void rewrite_shard(const fs::path& path, const Edit& edit) {
  SafetensorsWriter w;
  {
    const SafetensorsFile f = SafetensorsFile::open(path.string());
    for (const auto& [name, t] : f.tensors()) {
      auto b = f.bytes(t);
      std::vector<std::byte> bytes(b.begin(), b.end());
      Dtype dt = t.dtype;
      auto shape = t.shape;
      edit(name, dt, shape, bytes);
      w.add(name, dt, shape, bytes);
    }
  }
  w.write(path.string());
}

std::string shard_of(const fs::path& dir, const std::string& tensor) {
  std::ifstream f(dir / "model.safetensors.index.json");
  return nlohmann::json::parse(f).at("weight_map").at(tensor).get<std::string>();
}

}  // namespace

TEST_CASE("checkpoint: PhiMoE tensor names") {
  CHECK(names::router_gate(3) == "model.layers.3.block_sparse_moe.gate.weight");
  CHECK(names::expert_w(3, 7, 2) == "model.layers.3.block_sparse_moe.experts.7.w2.weight");
  CHECK(names::expert_w(0, 15, 1) == "model.layers.0.block_sparse_moe.experts.15.w1.weight");
  CHECK(names::embed_tokens() == "model.embed_tokens.weight");
  CHECK(names::final_norm("bias") == "model.norm.bias");
  CHECK(names::lm_head("weight") == "lm_head.weight");
  CHECK(names::attn(31, "k", "bias") == "model.layers.31.self_attn.k_proj.bias");
  CHECK(names::layer_norm(2, "post_attention", "weight") == "model.layers.2.post_attention_layernorm.weight");
  CHECK(names::layer_norm(0, "input", "bias") == "model.layers.0.input_layernorm.bias");
  CHECK_THROWS_AS(names::expert_w(0, 0, 4), Error);
}

TEST_CASE("checkpoint: tensor list for a config") {
  const ModelConfig c = small_config();
  const auto specs = phimoe_tensor_specs(c);
  // per layer: 4 norm tensors, 8 attention tensors, 1 gate, 3 per expert; plus embed, norm x2, lm_head x2
  CHECK(specs.size() == std::size_t(1 + 2 * (4 + 8 + 1 + 3 * 16) + 2 + 2));
  auto find = [&](const std::string& n) -> std::vector<std::int64_t> {
    for (const auto& s : specs)
      if (s.name == n) return s.shape;
    return {};
  };
  CHECK(find("model.layers.1.self_attn.q_proj.weight") == std::vector<std::int64_t>{64, 64});
  CHECK(find("model.layers.1.self_attn.k_proj.weight") == std::vector<std::int64_t>{32, 64});  // 2 KV heads x 16
  CHECK(find("model.layers.1.self_attn.o_proj.bias") == std::vector<std::int64_t>{64});
  CHECK(find("model.layers.0.block_sparse_moe.gate.weight") == std::vector<std::int64_t>{16, 64});
  CHECK(find("model.layers.0.block_sparse_moe.experts.3.w1.weight") == std::vector<std::int64_t>{32, 64});
  CHECK(find("model.layers.0.block_sparse_moe.experts.3.w2.weight") == std::vector<std::int64_t>{64, 32});
  CHECK(find("lm_head.bias") == std::vector<std::int64_t>{100});
}

TEST_CASE("checkpoint: open a sharded checkpoint, read, validate, count") {
  TmpDir d;
  make_small(d.path);
  const Checkpoint ck = Checkpoint::open(d.path.string());
  CHECK(ck.config().num_local_experts == 16);
  CHECK(ck.shard_files().size() >= 3);
  CHECK(ck.tensor_names().size() == phimoe_tensor_specs(small_config()).size());
  CHECK(ck.has(names::router_gate(1)));
  CHECK_FALSE(ck.has("model.layers.2.block_sparse_moe.gate.weight"));
  CHECK(ck.info(names::router_gate(1)).shape == std::vector<std::int64_t>{16, 64});
  CHECK(error_of([&] { ck.info("nope"); }).find("has no tensor 'nope'") != std::string::npos);
  ck.validate_against_config();

  const DiskCounts dc = ck.disk_counts();
  CHECK(dc.tensors == std::int64_t(ck.tensor_names().size()));
  CHECK(dc.expert_params == 2 * 16 * 3 * 64 * 32);
  CHECK(dc.bytes == std::uint64_t(dc.params) * 2);

  // read_bf16 returns the stored bits; read_f32 widens them exactly
  const auto g16 = ck.read_bf16(names::router_gate(0), {16, 64});
  const auto g32 = ck.read_f32(names::router_gate(0), {16, 64});
  REQUIRE(g16.size() == 16 * 64);
  for (std::size_t i = 0; i < g16.size(); ++i) REQUIRE(g32[i] == bf16_to_float(g16[i]));
  const SafetensorsFile raw = SafetensorsFile::open((d.path / shard_of(d.path, names::router_gate(0))).string());
  CHECK(std::memcmp(raw.bytes(*raw.find(names::router_gate(0))).data(), g16.data(), g16.size() * 2) == 0);

  // a wrong shape is an error naming the tensor and both shapes
  const auto e = error_of([&] { ck.read_bf16(names::router_gate(0), {64, 16}); });
  CHECK(e.find("tensor 'model.layers.0.block_sparse_moe.gate.weight' has shape [16, 64], expected [64, 16]") !=
        std::string::npos);
}

TEST_CASE("checkpoint: load_moe_layer, all experts and any subset") {
  TmpDir d;
  make_small(d.path);
  const Checkpoint ck = Checkpoint::open(d.path.string());
  const MoeLayerWeights all = load_moe_layer(ck, 1);
  CHECK(all.num_held() == 16);
  CHECK(all.hidden == 64);
  CHECK(all.inter == 32);
  CHECK(all.gate == ck.read_bf16(names::router_gate(1), {16, 64}));
  const std::size_t per = 32 * 64;
  CHECK(all.w1.size() == 16 * per);

  const std::vector<int> want = {11, 2, 5};
  const MoeLayerWeights sub = load_moe_layer(ck, 1, want);
  CHECK(sub.expert_ids == std::vector<int>{2, 5, 11});
  CHECK(sub.gate == all.gate);  // every rank keeps the whole router
  REQUIRE(sub.w1.size() == 3 * per);
  for (int i = 0; i < 3; ++i) {
    const int e = sub.expert_ids[i];
    CHECK(std::equal(sub.w1.begin() + i * per, sub.w1.begin() + (i + 1) * per, all.w1.begin() + e * per));
    CHECK(std::equal(sub.w3.begin() + i * per, sub.w3.begin() + (i + 1) * per, all.w3.begin() + e * per));
    CHECK(std::equal(sub.w2.begin() + i * per, sub.w2.begin() + (i + 1) * per, all.w2.begin() + e * per));
  }
  // each expert's slice is what the file holds under its own name
  CHECK(std::vector<bf16_bits>(sub.w2.begin() + 2 * per, sub.w2.begin() + 3 * per) ==
        ck.read_bf16(names::expert_w(1, 11, 2), {64, 32}));

  const std::vector<int> bad_id = {16}, dup = {3, 3};
  CHECK(error_of([&] { load_moe_layer(ck, 1, bad_id); }).find("expert id 16 is out of range") != std::string::npos);
  CHECK(error_of([&] { load_moe_layer(ck, 1, dup); }).find("listed twice") != std::string::npos);
  CHECK(error_of([&] { load_moe_layer(ck, 2); }).find("layer 2 is out of range") != std::string::npos);
}

TEST_CASE("checkpoint: shards open lazily, but a missing shard is reported at open()") {
  TmpDir d;
  make_small(d.path);
  const std::string head_shard = shard_of(d.path, names::lm_head("weight"));
  REQUIRE(head_shard != shard_of(d.path, names::router_gate(0)));

  SUBCASE("missing shard") {
    fs::remove(d.path / head_shard);
    const auto e = error_of([&] { Checkpoint::open(d.path.string()); });
    CHECK(e.find(head_shard) != std::string::npos);
    CHECK(e.find("is missing") != std::string::npos);
  }
  SUBCASE("a corrupt shard is found when it is first used, not before") {
    {
      std::fstream f(d.path / head_shard, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(8);
      f.write("#garbage", 8);  // the header's first bytes: no longer JSON
    }
    const Checkpoint ck = Checkpoint::open(d.path.string());
    CHECK(load_moe_layer(ck, 0).num_held() == 16);  // other shards are fine
    CHECK(error_of([&] { ck.info(names::lm_head("weight")); }).find("header is not valid JSON") != std::string::npos);
    CHECK(error_of([&] { ck.validate_against_config(); }).find(head_shard) != std::string::npos);
  }
  SUBCASE("index problems") {
    std::ofstream(d.path / "model.safetensors.index.json") << R"({"weight_map": {"a": "../etc/passwd"}})";
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("invalid shard file name") != std::string::npos);
    std::ofstream(d.path / "model.safetensors.index.json") << R"({"metadata": {}})";
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("missing 'weight_map'") != std::string::npos);
    std::ofstream(d.path / "model.safetensors.index.json") << "{ not json";
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("not valid JSON") != std::string::npos);
  }
  SUBCASE("no weights at all") {
    for (const auto& e : fs::directory_iterator(d.path))
      if (e.path().filename() != "config.json") fs::remove(e.path());
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("neither model.safetensors.index.json nor") !=
          std::string::npos);
  }
  SUBCASE("no directory") {
    CHECK(error_of([&] { Checkpoint::open((d.path / "nope").string()); }).find("does not exist") != std::string::npos);
  }
}

TEST_CASE("checkpoint: validate_against_config catches configs and tensors that disagree") {
  TmpDir d;
  make_small(d.path);
  auto set_config = [&](const char* key, int v) {
    nlohmann::json c;
    std::ifstream(d.path / "config.json") >> c;
    c[key] = v;
    std::ofstream(d.path / "config.json") << c.dump();
  };
  SUBCASE("config says fewer experts than the tensors hold") {
    set_config("num_local_experts", 8);
    const auto e = error_of([&] { Checkpoint::open(d.path.string()).validate_against_config(); });
    CHECK(e.find("num_local_experts = 8 but the checkpoint holds expert 15") != std::string::npos);
  }
  SUBCASE("config says more experts than the tensors hold") {
    set_config("num_local_experts", 32);
    const auto e = error_of([&] { Checkpoint::open(d.path.string()).validate_against_config(); });
    CHECK(e.find("lacks tensor") != std::string::npos);
  }
  SUBCASE("config says fewer layers") {
    set_config("num_hidden_layers", 1);
    const auto e = error_of([&] { Checkpoint::open(d.path.string()).validate_against_config(); });
    CHECK(e.find("num_hidden_layers = 1 but the checkpoint holds layer 1") != std::string::npos);
  }
  SUBCASE("wrong intermediate size") {
    set_config("intermediate_size", 48);
    const auto e = error_of([&] { Checkpoint::open(d.path.string()).validate_against_config(); });
    CHECK(e.find("but config.json implies [48, 64]") != std::string::npos);
  }
  SUBCASE("one expert's w2 stored transposed") {
    const std::string w2 = names::expert_w(1, 3, 2);
    rewrite_shard(d.path / shard_of(d.path, w2), [&](const std::string& n, Dtype&, auto& shape, auto&) {
      if (n == w2) std::swap(shape[0], shape[1]);
    });
    const Checkpoint ck = Checkpoint::open(d.path.string());
    const auto e = error_of([&] { ck.validate_against_config(); });
    CHECK(e.find("tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight' has shape [32, 64]") !=
          std::string::npos);
    CHECK(e.find("implies [64, 32]") != std::string::npos);
    CHECK(error_of([&] { load_moe_layer(ck, 1); }).find("experts.3.w2.weight' has shape [32, 64], expected [64, 32]") !=
          std::string::npos);
    CHECK(load_moe_layer(ck, 0).num_held() == 16);
  }
}

TEST_CASE("checkpoint: single model.safetensors in F32 and F16 reads like the BF16 original") {
  TmpDir src, dst;
  make_small(src.path);
  const Checkpoint a = Checkpoint::open(src.path.string());
  // Rewrite everything into one file: expert tensors as F32 (exactly the bf16 values widened), the
  // router gate as F16 (holding hand-picked F16 bit patterns), the rest as it was.
  SafetensorsWriter w;
  const std::string gate0 = names::router_gate(0);
  const std::vector<std::uint16_t> f16_bits = {0x3c00, 0xc000, 0x3555, 0x0001, 0x7bff, 0x8000};
  const std::vector<float> f16_vals = {1.0f, -2.0f, 0.333251953125f, 5.9604644775390625e-8f, 65504.f, -0.f};
  for (const auto& name : a.tensor_names()) {
    const TensorInfo& t = a.info(name);
    if (name.find(".experts.") != std::string::npos) {
      const auto f = a.read_f32(name, t.shape);
      w.add(name, Dtype::F32, t.shape, std::as_bytes(std::span<const float>(f)));
    } else if (name == gate0) {
      std::vector<std::uint16_t> h(std::size_t(t.numel()));
      for (std::size_t i = 0; i < h.size(); ++i) h[i] = f16_bits[i % f16_bits.size()];
      w.add(name, Dtype::F16, t.shape, std::as_bytes(std::span<const std::uint16_t>(h)));
    } else {
      const auto b = a.read_bf16(name, t.shape);
      w.add(name, Dtype::BF16, t.shape, std::as_bytes(std::span<const bf16_bits>(b)));
    }
  }
  w.write((dst.path / "model.safetensors").string());
  fs::copy_file(src.path / "config.json", dst.path / "config.json");

  const Checkpoint b = Checkpoint::open(dst.path.string());
  CHECK(b.shard_files() == std::vector<std::string>{"model.safetensors"});
  b.validate_against_config();
  CHECK(b.info(names::expert_w(0, 0, 1)).dtype == Dtype::F32);

  // F32 -> bf16 gives back the original bits; F32 -> f32 the widened values
  const MoeLayerWeights wa = load_moe_layer(a, 1), wb = load_moe_layer(b, 1);
  CHECK(wa.w1 == wb.w1);
  CHECK(wa.w2 == wb.w2);
  CHECK(wa.w3 == wb.w3);
  CHECK(a.read_f32(names::expert_w(1, 4, 3), {32, 64}) == b.read_f32(names::expert_w(1, 4, 3), {32, 64}));

  // F16 -> f32 is exact; F16 -> bf16 rounds (0.333251953125 -> 0.333984375, 65504 -> 65536)
  const auto g32 = b.read_f32(gate0, {16, 64});
  const auto g16 = b.read_bf16(gate0, {16, 64});
  for (std::size_t i = 0; i < f16_vals.size(); ++i) CHECK(g32[i] == f16_vals[i]);
  CHECK(std::signbit(g32[5]));
  CHECK(bf16_to_float(g16[0]) == 1.0f);
  CHECK(bf16_to_float(g16[1]) == -2.0f);
  CHECK(bf16_to_float(g16[2]) == 0.333984375f);
  CHECK(bf16_to_float(g16[4]) == 65536.f);
  CHECK(g16[3] == 0x3380);  // 2^-24 is exact in bf16: exponent 127-24 = 103 -> bits 0x3380
}

TEST_CASE("checkpoint: metadata only (config.json + index, no shards) with Shards::AllOrNone") {
  TmpDir d;
  make_small(d.path);
  const std::uint64_t bytes = [&] {
    std::ifstream f(d.path / "model.safetensors.index.json");
    return nlohmann::json::parse(f).at("metadata").at("total_size").get<std::uint64_t>();
  }();
  const Checkpoint full = Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone);
  CHECK(full.weights_present());  // every shard there: a full checkpoint, whatever the mode
  CHECK(full.index_total_size() == bytes);
  const std::vector<std::string> shards = full.shard_files();
  REQUIRE(shards.size() >= 2);

  SUBCASE("no shard: metadata only") {
    for (const auto& s : shards) fs::remove(d.path / s);
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("is missing (0 of") != std::string::npos);
    const Checkpoint ck = Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone);
    CHECK_FALSE(ck.weights_present());
    CHECK(ck.index_total_size() == bytes);
    CHECK(ck.tensor_names().size() == phimoe_tensor_specs(small_config()).size());
    CHECK(ck.shard_files() == shards);
    ck.validate_names_against_config();  // names need no shard
    CHECK(error_of([&] { ck.info(names::router_gate(0)); }).find("holds metadata only") != std::string::npos);
    CHECK(error_of([&] { ck.validate_against_config(); }).find("holds metadata only") != std::string::npos);
    CHECK(error_of([&] { load_moe_layer(ck, 0); }).find("holds metadata only") != std::string::npos);
  }
  SUBCASE("some shards: an incomplete download, reported in either mode") {
    fs::remove(d.path / shards.back());
    const std::string want = "is missing (" + std::to_string(shards.size() - 1) + " of " +
                             std::to_string(shards.size()) + " shards present";
    CHECK(error_of([&] { Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone); }).find(want) !=
          std::string::npos);
  }
  SUBCASE("names checked without shards: wrong expert count, a missing tensor") {
    for (const auto& s : shards) fs::remove(d.path / s);
    nlohmann::json c;
    std::ifstream(d.path / "config.json") >> c;
    c["num_local_experts"] = 8;
    std::ofstream(d.path / "config.json") << c.dump();
    const Checkpoint ck8 = Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone);
    CHECK(error_of([&] { ck8.validate_names_against_config(); }).find("num_local_experts = 8 but the checkpoint holds "
                                                                      "expert 15") != std::string::npos);
    c["num_local_experts"] = 16;
    std::ofstream(d.path / "config.json") << c.dump();
    nlohmann::json idx;
    std::ifstream(d.path / "model.safetensors.index.json") >> idx;
    idx["weight_map"].erase(names::expert_w(1, 5, 3));
    std::ofstream(d.path / "model.safetensors.index.json") << idx.dump();
    const Checkpoint ck = Checkpoint::open(d.path.string(), Checkpoint::Shards::AllOrNone);
    CHECK(error_of([&] { ck.validate_names_against_config(); }).find("lacks tensor '" + names::expert_w(1, 5, 3)) !=
          std::string::npos);
  }
  SUBCASE("total_size that is not a byte count") {
    nlohmann::json idx;
    std::ifstream(d.path / "model.safetensors.index.json") >> idx;
    idx["metadata"]["total_size"] = "7.5 GB";
    std::ofstream(d.path / "model.safetensors.index.json") << idx.dump();
    CHECK(error_of([&] { Checkpoint::open(d.path.string()); }).find("metadata.total_size is not a byte count") !=
          std::string::npos);
    idx["metadata"].erase("total_size");
    std::ofstream(d.path / "model.safetensors.index.json") << idx.dump();
    CHECK_FALSE(Checkpoint::open(d.path.string()).index_total_size().has_value());
  }
}

TEST_CASE("checkpoint: a file given as the model directory is named as a file") {
  TmpDir d;
  const std::string f = d.write("README.md", "# not a model\n");
  const auto e = error_of([&] { Checkpoint::open(f); });
  CHECK(e.find("is a file, not a directory") != std::string::npos);
  CHECK(e.find("does not exist") == std::string::npos);
}

TEST_CASE("checkpoint: data/phi-tiny-moe, the real Phi-tiny-MoE metadata, agrees with the built-in shape") {
  const std::string dir = std::string(EPLAB_SOURCE_DIR) + "/data/phi-tiny-moe";
  CHECK(error_of([&] { Checkpoint::open(dir); }).find("is missing") != std::string::npos);  // no shards in git
  const Checkpoint ck = Checkpoint::open(dir, Checkpoint::Shards::AllOrNone);
  CHECK_FALSE(ck.weights_present());
  const ModelConfig& c = ck.config();
  const ModelConfig phi = phi_tiny_moe_config();
  CHECK(c.hidden_size == phi.hidden_size);
  CHECK(c.intermediate_size == phi.intermediate_size);
  CHECK(c.num_hidden_layers == phi.num_hidden_layers);
  CHECK(c.num_attention_heads == phi.num_attention_heads);
  CHECK(c.num_key_value_heads == phi.num_key_value_heads);
  CHECK(c.head_dim == phi.head_dim);
  CHECK(c.num_local_experts == phi.num_local_experts);
  CHECK(c.num_experts_per_tok == phi.num_experts_per_tok);
  CHECK(c.vocab_size == phi.vocab_size);
  CHECK(c.sliding_window == phi.sliding_window);
  CHECK(c.rope_theta == phi.rope_theta);
  CHECK(c.rms_norm_eps == phi.rms_norm_eps);
  CHECK(c.router_jitter_noise == phi.router_jitter_noise);
  CHECK(c.attention_bias);
  CHECK(c.lm_head_bias);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.torch_dtype == "bfloat16");
  ck.validate_names_against_config();
  CHECK(ck.tensor_names().size() == phimoe_tensor_specs(c).size());  // 1957: exactly the names PhiMoE needs
  CHECK(ck.index_total_size() == std::uint64_t(3'755'220'288) * 2);  // 3.76 B bf16 parameters
}
