// Synthetic PhiMoE checkpoint writer. Layout, determinism and initialisation: generator.hpp.
#include "model/generator.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "model/tokenizer.hpp"
#include "moe/cost_model.hpp"
#include "util/bf16.hpp"
#include "util/check.hpp"
#include "util/report.hpp"
#include "util/rng.hpp"

namespace eplab {

namespace fs = std::filesystem;

namespace {

constexpr std::int64_t kChunk = 1 << 18;  // elements per independent RNG stream

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Unit-variance Irwin-Hall noise from one 64-bit draw (see generator.hpp).
inline float unit_noise(Rng& rng) {
  const std::uint64_t r = rng.next_u64();
  const float s = float(r & 0xffff) + float((r >> 16) & 0xffff) + float((r >> 32) & 0xffff) + float(r >> 48);
  // each 16-bit value has mean 32767.5; the sum of four uniforms on [0,1) has variance 4/12
  constexpr float kScale = 1.7320508f / 65536.f;  // sqrt(3) / 65536
  return (s - 4.f * 32767.5f) * kScale;
}

// Fills out[0, n) for one tensor, splitting the work over threads by chunk.
void fill_tensor(std::vector<bf16_bits>& out, const std::string& name, InitSpec init, std::uint64_t seed, int threads) {
  const std::int64_t n = std::int64_t(out.size());
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  const std::uint64_t name_hash = fnv1a(name);
  std::atomic<std::int64_t> next{0};
  auto work = [&] {
    for (std::int64_t c; (c = next.fetch_add(1)) < chunks;) {
      Rng rng(seed ^ (name_hash * 0x9E3779B97F4A7C15ull) ^ (std::uint64_t(c) * 0xD1B54A32D192ED03ull));
      const std::int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      for (std::int64_t i = lo; i < hi; ++i) out[std::size_t(i)] = float_to_bf16(init.mean + init.std * unit_noise(rng));
    }
  };
  const int t = int(std::min<std::int64_t>(threads, chunks));
  if (t <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  for (int i = 0; i < t; ++i) pool.emplace_back(work);
  for (auto& th : pool) th.join();
}

// Sparsemixer masks every expert whose logit is more than 2*eps (2 %) below the top one, *relative to the
// logit's size*. Router rows of pure noise give logits ~N(0, 1) per expert, so nearly every token keeps only
// its top expert and both multipliers print as 1.00: a dull lesson. Real routers share a large common
// component across experts; we add one (every row gets the same random direction u, |u x| ~ 30x the
// per-expert spread), so the top logits of a token sit within a few percent of each other and the masked
// softmax keeps several experts for many tokens, giving multipliers like 0.6. The argmax (which experts are
// chosen) is unchanged by a shared component, and so is softmax-top-k routing.
void add_shared_router_direction(std::vector<bf16_bits>& gate, const std::string& name, const ModelConfig& c,
                                 std::uint64_t seed) {
  constexpr float kSharedScale = 30.f;  // std of u.x relative to the per-expert std (1)
  const int E = c.num_local_experts, H = c.hidden_size;
  Rng rng(seed ^ fnv1a(name + "#shared"));
  std::vector<float> u(H);
  for (auto& v : u) v = kSharedScale * rng.normal() / std::sqrt(float(H));
  for (int e = 0; e < E; ++e)
    for (int h = 0; h < H; ++h) {
      bf16_bits& w = gate[std::size_t(e) * H + h];
      w = float_to_bf16(bf16_to_float(w) + u[h]);
    }
}

std::string shard_name(int i, int n) { return strf("model-%05d-of-%05d.safetensors", i + 1, n); }

}  // namespace

ModelConfig generator_preset(const std::string& name) {
  if (name == "phi-tiny") return phi_tiny_moe_config();
  require(name == "mini", "unknown preset '", name, "' (expected mini or phi-tiny)");
  ModelConfig c = phi_tiny_moe_config();  // same family and fields; smaller everywhere but vocab and experts
  c.hidden_size = 256;
  c.intermediate_size = 128;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 32;
  c.num_local_experts = 16;
  c.num_experts_per_tok = 2;
  c.vocab_size = 32064;
  c.max_position_embeddings = 4096;
  c.sliding_window = 2047;
  c.rope_theta = 1e4f;
  c.router_jitter_noise = 0.01f;
  c.rms_norm_eps = 1e-5f;
  return c;
}

std::uint64_t generator_default_shard_mb(const std::string& preset) {
  // mini: 16 MB gives 3 shards (embedding | layers + norm | lm_head); phi-tiny: ~8 shards of 1 GB,
  // which bounds the generator's memory to about one shard.
  return preset == "phi-tiny" ? 1024 : 16;
}

InitSpec init_spec(const std::string& name, const ModelConfig& c) {
  const float H = float(c.hidden_size), I = float(c.intermediate_size);
  const float Q = float(c.num_attention_heads) * float(c.head_dim);
  if (name == names::embed_tokens()) return {0.f, 1.f};
  if (contains(name, "layernorm.") || name.rfind("model.norm.", 0) == 0)
    return ends_with(name, ".weight") ? InitSpec{1.f, 0.05f} : InitSpec{0.f, 0.02f};
  if (ends_with(name, ".bias")) return {0.f, 0.02f};
  if (contains(name, ".block_sparse_moe.gate.")) return {0.f, 1.f / std::sqrt(H)};
  if (ends_with(name, ".w2.weight")) return {0.f, 1.f / std::sqrt(I)};
  if (ends_with(name, ".w1.weight") || ends_with(name, ".w3.weight")) return {0.f, 1.f / std::sqrt(H)};
  if (contains(name, ".o_proj.")) return {0.f, 1.f / std::sqrt(Q)};
  if (contains(name, "_proj.") || name == names::lm_head("weight")) return {0.f, 1.f / std::sqrt(H)};
  fail("generator: no initialisation rule for tensor '", name, "'");
}

GeneratedModel generate_model(const std::string& out_dir, const ModelConfig& config, const GeneratorOptions& opt) {
  config.validate("generator config");
  require(opt.shard_bytes > 0, "generator: shard size must be > 0");
  int tokenizer_ids = 0;
  if (!opt.tokenizer_json.empty()) {  // before anything is written: a tokenizer that does not fit is an error
    tokenizer_ids = Tokenizer::load(opt.tokenizer_json).vocab_size();
    require(tokenizer_ids <= config.vocab_size, "tokenizer ", opt.tokenizer_json, " has ", tokenizer_ids,
            " ids but the model's vocab_size is ", config.vocab_size, ": its ids would not fit the embedding");
  }
  const int threads = opt.threads > 0 ? opt.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  require(!ec && fs::is_directory(out_dir), "cannot create output directory '", out_dir, "' (", ec.message(), ")");
  // Remove an earlier model's files so a smaller shard count does not leave stale shards behind.
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    const std::string f = entry.path().filename().string();
    if (f == "config.json" || f == "model.safetensors.index.json" || f == "tokenizer.json" ||
        (f.rfind("model", 0) == 0 && ends_with(f, ".safetensors")))
      fs::remove(entry.path());
  }

  // Plan: pack tensors in canonical order into shards of at most shard_bytes.
  const std::vector<TensorSpec> specs = phimoe_tensor_specs(config);
  std::vector<int> shard_of(specs.size());
  int nshards = 0;
  std::uint64_t in_current = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    std::uint64_t bytes = 2;
    for (auto d : specs[i].shape) bytes *= std::uint64_t(d);
    if (nshards == 0 || (in_current > 0 && in_current + bytes > opt.shard_bytes)) {
      ++nshards;
      in_current = 0;
    }
    in_current += bytes;
    shard_of[i] = nshards - 1;
  }

  GeneratedModel result;
  result.shards = nshards;
  nlohmann::json weight_map = nlohmann::json::object();
  std::vector<bf16_bits> buf;  // one tensor at a time, reused: memory stays at the largest tensor
  std::size_t i = 0;
  for (int s = 0; s < nshards; ++s) {
    const std::size_t first = i;
    while (i < specs.size() && shard_of[i] == s) ++i;
    const std::string name = shard_name(s, nshards);
    if (opt.metadata_only) {  // the index's view of this shard, nothing written
      for (std::size_t k = first; k < i; ++k) {
        std::int64_t numel = 1;
        for (auto d : specs[k].shape) numel *= d;
        weight_map[specs[k].name] = name;
        result.tensors += 1;
        result.params += numel;
        result.bytes += std::uint64_t(numel) * 2;
      }
      continue;
    }
    const std::string path = (fs::path(out_dir) / name).string();
    // Stream the shard: the header first (every shape is known up front), then each tensor generated
    // into `buf` and written straight out. The bytes are what SafetensorsWriter would write for the
    // same tensors (sorted-key header, offsets in order, padded to 8); test_generator checks that.
    nlohmann::json header = nlohmann::json::object();
    header["__metadata__"] = {{"format", "pt"}};
    std::uint64_t off = 0;
    for (std::size_t k = first; k < i; ++k) {
      std::uint64_t bytes = 2;
      for (auto d : specs[k].shape) bytes *= std::uint64_t(d);
      header[specs[k].name] = {{"dtype", "BF16"}, {"shape", specs[k].shape}, {"data_offsets", {off, off + bytes}}};
      off += bytes;
    }
    std::string h = header.dump();
    while ((8 + h.size()) % 8 != 0) h += ' ';
    char len[8];
    for (int b = 0; b < 8; ++b) len[b] = char((std::uint64_t(h.size()) >> (8 * b)) & 0xff);
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    require(bool(f), path, ": cannot open for writing");
    f.write(len, 8);
    f.write(h.data(), std::streamsize(h.size()));
    for (std::size_t k = first; k < i; ++k) {
      const TensorSpec& t = specs[k];
      std::int64_t numel = 1;
      for (auto d : t.shape) numel *= d;
      buf.resize(static_cast<std::size_t>(numel));
      fill_tensor(buf, t.name, init_spec(t.name, config), opt.seed, threads);
      if (contains(t.name, ".block_sparse_moe.gate.")) add_shared_router_direction(buf, t.name, config, opt.seed);
      f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size() * sizeof(bf16_bits)));
      weight_map[t.name] = name;
      result.tensors += 1;
      result.params += numel;
    }
    f.close();
    require(!f.fail(), path, ": write failed (disk full?)");
    result.bytes += off;
    if (opt.log) opt.log(strf("  wrote %s (%s)", name.c_str(), human_bytes(double(off)).c_str()));
  }

  nlohmann::json index = {{"metadata", {{"total_size", result.bytes}}}, {"weight_map", weight_map}};
  const std::string index_path = (fs::path(out_dir) / "model.safetensors.index.json").string();
  {
    std::ofstream f(index_path);
    f << index.dump(2) << '\n';
    require(bool(f), index_path, ": write failed");
  }
  if (!opt.tokenizer_json.empty()) {
    const fs::path to = fs::path(out_dir) / "tokenizer.json";
    std::error_code cec;
    fs::copy_file(opt.tokenizer_json, to, fs::copy_options::overwrite_existing, cec);
    require(!cec, "cannot copy ", opt.tokenizer_json, " to ", to.string(), " (", cec.message(), ")");
    result.tokenizer_ids = tokenizer_ids;
  }
  // config.json last: its presence marks a complete model (the Makefile tests for it).
  nlohmann::json cj = config.to_json();
  cj["_name_or_path"] = opt.name_or_path;
  const std::string config_path = (fs::path(out_dir) / "config.json").string();
  {
    std::ofstream f(config_path);
    f << cj.dump(2) << '\n';
    require(bool(f), config_path, ": write failed");
  }
  return result;
}

}  // namespace eplab
