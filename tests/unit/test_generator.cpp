// Model generator: same seed -> same bytes (whatever the thread count or shard size), the HF layout
// (index, shard names, total_size), the mini preset's shape, and the documented init scales, including
// that the router's logits have std ~1 so top-2 routing spreads over the experts.
#include <doctest/doctest.h>

#include "moe/routing.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "model/generator.hpp"
#include "model/tokenizer.hpp"
#include "util/check.hpp"
#include "util/rng.hpp"
#include "tmp_dir.hpp"

using namespace eplab;
namespace fs = std::filesystem;

namespace {

using testing::TmpDir;

ModelConfig tiny() {
  ModelConfig c = generator_preset("mini");
  c.hidden_size = 48;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 12;
  c.vocab_size = 50;
  c.num_local_experts = 6;
  return c;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::map<std::string, std::string> dir_contents(const fs::path& d) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::directory_iterator(d)) m[e.path().filename().string()] = slurp(e.path());
  return m;
}

GeneratedModel gen(const fs::path& d, std::uint64_t seed, std::uint64_t shard_bytes, int threads,
                   const ModelConfig& c = tiny()) {
  GeneratorOptions o;
  o.seed = seed;
  o.shard_bytes = shard_bytes;
  o.threads = threads;
  return generate_model(d.string(), c, o);
}

struct Stats {
  double mean = 0, std = 0;
};
Stats stats(const std::vector<float>& v) {
  double s = 0, s2 = 0;
  for (float x : v) s += x;
  const double m = s / double(v.size());
  for (float x : v) s2 += (x - m) * (x - m);
  return {m, std::sqrt(s2 / double(v.size()))};
}

}  // namespace

TEST_CASE("generator: same seed -> same bytes; threads and shard size do not change tensor bytes") {
  TmpDir a, b, c, d;
  gen(a.path, 5, 20 << 10, 1);
  gen(b.path, 5, 20 << 10, 3);
  const auto ca = dir_contents(a.path), cb = dir_contents(b.path);
  CHECK(ca.size() >= 4);  // config, index, >= 2 shards
  CHECK(ca == cb);

  // Another shard size: other files, same tensors.
  gen(c.path, 5, 1 << 30, 2);
  const Checkpoint ka = Checkpoint::open(a.path.string()), kc = Checkpoint::open(c.path.string());
  CHECK(kc.shard_files().size() == 1);
  CHECK(ka.shard_files().size() > 1);
  for (const auto& name : ka.tensor_names()) {
    const auto& s = ka.info(name).shape;
    REQUIRE(ka.read_bf16(name, s) == kc.read_bf16(name, s));
  }

  // Another seed: different weights.
  gen(d.path, 6, 20 << 10, 1);
  const Checkpoint kd = Checkpoint::open(d.path.string());
  CHECK(ka.read_bf16(names::router_gate(0), {6, 48}) != kd.read_bf16(names::router_gate(0), {6, 48}));

  // Regenerating into a used directory leaves no stale shards behind.
  gen(a.path, 5, 1 << 30, 1);
  CHECK(dir_contents(a.path) == dir_contents(c.path));
}

TEST_CASE("generator: HF layout (shard names, index, total_size) that the loader validates") {
  TmpDir a;
  const GeneratedModel g = gen(a.path, 1, 16 << 10, 2);
  nlohmann::json idx;
  std::ifstream(a.path / "model.safetensors.index.json") >> idx;
  const auto& wm = idx.at("weight_map");
  std::set<std::string> files;
  for (auto it = wm.begin(); it != wm.end(); ++it) files.insert(it.value().get<std::string>());
  CHECK(int(files.size()) == g.shards);
  const std::regex shard_re("model-[0-9]{5}-of-[0-9]{5}\\.safetensors");
  std::uint64_t data = 0;
  for (const auto& f : files) {
    CHECK(std::regex_match(f, shard_re));
    const SafetensorsFile sf = SafetensorsFile::open((a.path / f).string());
    CHECK(sf.metadata().at("format") == "pt");
    for (const auto& [n, t] : sf.tensors()) {
      CHECK(t.dtype == Dtype::BF16);
      CHECK(wm.at(n) == f);
      data += t.end - t.begin;
    }
  }
  CHECK(idx.at("metadata").at("total_size").get<std::uint64_t>() == data);
  CHECK(g.bytes == data);
  CHECK(std::size_t(g.tensors) == phimoe_tensor_specs(tiny()).size());

  const Checkpoint ck = Checkpoint::open(a.path.string());
  ck.validate_against_config();
  CHECK(ck.config().to_json()["num_local_experts"] == 6);
}

TEST_CASE("generator: presets") {
  const ModelConfig m = generator_preset("mini");
  CHECK(m.hidden_size == 256);
  CHECK(m.intermediate_size == 128);
  CHECK(m.num_hidden_layers == 4);
  CHECK(m.num_attention_heads == 8);
  CHECK(m.num_key_value_heads == 2);
  CHECK(m.head_dim == 32);
  CHECK(m.num_local_experts == 16);
  CHECK(m.num_experts_per_tok == 2);
  CHECK(m.vocab_size == 32064);
  CHECK(m.sliding_window == 2047);
  const ModelConfig p = generator_preset("phi-tiny");
  CHECK(p.hidden_size == 4096);
  CHECK(p.intermediate_size == 448);
  CHECK(p.num_hidden_layers == 32);
  CHECK(p.head_dim == 128);
  CHECK_THROWS_AS(generator_preset("huge"), Error);

  // mini at its default shard size is written as several shards, so the index path is always used
  std::uint64_t bytes = 0;
  for (const auto& s : phimoe_tensor_specs(m)) {
    std::uint64_t n = 2;
    for (auto d : s.shape) n *= std::uint64_t(d);
    bytes += n;
  }
  CHECK(bytes > (generator_default_shard_mb("mini") << 20));  // more than one shard's worth
  CHECK(bytes < 100ull << 20);  // small enough for 2 CPU cores
}

TEST_CASE("generator: init scales as documented; router logits std ~1 and routing spreads") {
  ModelConfig c = tiny();
  c.hidden_size = 512;
  c.intermediate_size = 256;
  c.num_attention_heads = 8;
  c.head_dim = 64;
  c.num_hidden_layers = 1;
  c.num_local_experts = 16;
  TmpDir a;
  gen(a.path, 3, 1 << 30, 2, c);
  const Checkpoint ck = Checkpoint::open(a.path.string());
  const double H = 512, I = 256;

  // The router = a direction shared by all experts (std 30/sqrt(H) per element) + per-expert noise
  // (std 1/sqrt(H)); see add_shared_router_direction in generator.cpp.
  const auto gate = ck.read_f32(names::router_gate(0), {16, 512});
  std::vector<float> shared(512, 0.f), own;
  for (int e = 0; e < 16; ++e)
    for (int h = 0; h < 512; ++h) shared[h] += gate[std::size_t(e) * 512 + h] / 16.f;
  for (int e = 0; e < 16; ++e)
    for (int h = 0; h < 512; ++h) own.push_back(gate[std::size_t(e) * 512 + h] - shared[h]);
  // The mean over 16 rows keeps 1/16 of the noise variance: std(own) = sqrt(15/16)/sqrt(H).
  CHECK(stats(own).std == doctest::Approx(std::sqrt(15.0 / 16.0) / std::sqrt(H)).epsilon(0.05));
  CHECK(stats(shared).std == doctest::Approx(30.0 / std::sqrt(H)).epsilon(0.1));
  CHECK(stats(ck.read_f32(names::expert_w(0, 1, 1), {256, 512})).std == doctest::Approx(1 / std::sqrt(H)).epsilon(0.03));
  CHECK(stats(ck.read_f32(names::expert_w(0, 1, 3), {256, 512})).std == doctest::Approx(1 / std::sqrt(H)).epsilon(0.03));
  CHECK(stats(ck.read_f32(names::expert_w(0, 1, 2), {512, 256})).std == doctest::Approx(1 / std::sqrt(I)).epsilon(0.03));
  CHECK(stats(ck.read_f32(names::embed_tokens(), {50, 512})).std == doctest::Approx(1.0).epsilon(0.05));
  const Stats ln = stats(ck.read_f32(names::layer_norm(0, "input", "weight"), {512}));
  CHECK(ln.mean == doctest::Approx(1.0).epsilon(0.01));
  CHECK(ln.std > 0.01);  // not all ones: a dropped norm weight must be visible
  CHECK(std::abs(stats(ck.read_f32(names::final_norm("bias"), {512})).mean) < 0.01);

  // Unit-variance tokens through the router: around each token's mean logit the experts spread with
  // std ~1, top-1 lands on most experts, and sparsemixer keeps more than one expert for many tokens
  // (multipliers below 1), which a router of pure noise would almost never do.
  Rng rng(11);
  const int T = 512;
  std::vector<float> spread, all_logits;
  std::set<int> top1;
  for (int t = 0; t < T; ++t) {
    std::vector<float> x(512);
    for (auto& v : x) v = rng.normal();
    int best = 0;
    float best_v = -1e30f, mean = 0;
    std::vector<float> l(16);
    for (int e = 0; e < 16; ++e) {
      float s = 0;
      for (int h = 0; h < 512; ++h) s += gate[std::size_t(e) * 512 + h] * x[h];
      l[e] = s;
      mean += s / 16;
      if (s > best_v) best_v = s, best = e;
    }
    for (float v : l) spread.push_back(v - mean);
    all_logits.insert(all_logits.end(), l.begin(), l.end());
    top1.insert(best);
  }
  CHECK(stats(spread).std == doctest::Approx(std::sqrt(15.0 / 16.0)).epsilon(0.15));
  CHECK(top1.size() >= 14);
  const Routing r = route_sparsemixer(all_logits, T, 16, 0.01f);
  int shared_weight = 0;
  for (int t = 0; t < T; ++t) shared_weight += r.weight(t, 0) < 0.99f;
  CHECK(shared_weight >= T / 4);
}

TEST_CASE("generator: the streamed shards are byte for byte what SafetensorsWriter writes") {
  TmpDir a, b;
  gen(a.path, 9, 24 << 10, 2);
  int shards = 0;
  for (const auto& e : fs::directory_iterator(a.path)) {
    const std::string f = e.path().filename().string();
    if (f.rfind("model-", 0) != 0) continue;
    ++shards;
    // Re-write the shard's tensors, in data order, through the reference writer.
    const SafetensorsFile sf = SafetensorsFile::open(e.path().string());
    std::vector<const TensorInfo*> order;
    for (const auto& [n, t] : sf.tensors()) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* x, auto* y) { return x->begin < y->begin; });
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (const TensorInfo* t : order) w.add(t->name, t->dtype, t->shape, sf.bytes(*t));
    w.write((b.path / f).string());
    CHECK(slurp(e.path()) == slurp(b.path / f));
  }
  CHECK(shards >= 2);
}

TEST_CASE("generator: tokenizer.json copied in when given, refused when its ids do not fit") {
  const std::string tok = std::string(EPLAB_SOURCE_DIR) + "/data/tokenizer/tokenizer.json";
  TmpDir a, b;
  ModelConfig c = tiny();
  c.vocab_size = 800;  // the course tokenizer has 767 ids
  GeneratorOptions o;
  o.shard_bytes = 1 << 30;
  o.tokenizer_json = tok;
  const GeneratedModel g = generate_model(a.path.string(), c, o);
  CHECK(g.tokenizer_ids == 767);
  CHECK(slurp(a.path / "tokenizer.json") == slurp(tok));
  CHECK(Tokenizer::load(a.path.string()).vocab_size() == 767);

  // Regenerating without a tokenizer removes the earlier one (it would not belong to the new model).
  o.tokenizer_json.clear();
  CHECK(generate_model(a.path.string(), c, o).tokenizer_ids == 0);
  CHECK_FALSE(fs::exists(a.path / "tokenizer.json"));

  c.vocab_size = 512;
  o.tokenizer_json = tok;
  std::string err;
  try {
    generate_model(b.path.string(), c, o);
  } catch (const Error& e) {
    err = e.what();
  }
  CHECK(err.find("has 767 ids but the model's vocab_size is 512") != std::string::npos);
  CHECK_FALSE(fs::exists(b.path / "config.json"));  // refused before anything was written
}

TEST_CASE("generator: metadata only writes the config and the index the full model would have, no shards") {
  TmpDir full, meta;
  gen(full.path, 3, 16 << 10, 1);
  GeneratorOptions o;
  o.seed = 3;
  o.shard_bytes = 16 << 10;
  o.metadata_only = true;
  const GeneratedModel g = generate_model(meta.path.string(), tiny(), o);
  const auto m = dir_contents(meta.path), f = dir_contents(full.path);
  CHECK(m.size() == 2);
  CHECK(m.at("config.json") == f.at("config.json"));
  CHECK(m.at("model.safetensors.index.json") == f.at("model.safetensors.index.json"));
  CHECK(g.shards > 1);
  CHECK(std::size_t(g.tensors) == phimoe_tensor_specs(tiny()).size());
  const Checkpoint ck = Checkpoint::open(meta.path.string(), Checkpoint::Shards::AllOrNone);
  CHECK_FALSE(ck.weights_present());
  CHECK(ck.index_total_size() == g.bytes);
  ck.validate_names_against_config();
}
