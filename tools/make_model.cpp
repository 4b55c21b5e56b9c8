// make_model: writes a synthetic PhiMoE checkpoint (random weights, real on-disk format).
//
//   make_model --preset mini --out data/mini                 # the default model (~46 MB, 3 shards)
//   make_model --preset phi-tiny --out /data/phi-tiny-random   # the full 3.76 B shape (~7.5 GB)
//   make_model --preset mini --experts 8 --layers 2 --out /tmp/small
//   make_model --preset phi-tiny --shard-mb 4768 --metadata-only --out /tmp/phi-meta  # config + index only
//
// The model gets the course's small tokenizer (data/tokenizer/tokenizer.json) as tokenizer.json when its ids
// fit the model's vocabulary, so `--prompt TEXT` works on it; --tokenizer FILE picks another, --tokenizer none
// writes none. Same flags and seed -> the same bytes. See common/model/generator.hpp for the layout and init.
#include <cstdio>
#include <filesystem>

#include "model/generator.hpp"
#include "model/tokenizer.hpp"
#include "moe/cost_model.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"
#include "util/timer.hpp"

int main(int argc, char** argv) {
  return eplab::run_main([&] {
    using namespace eplab;
    CLI::App app{"make_model: write a synthetic PhiMoE checkpoint (config.json, sharded safetensors, index)"};
    std::string preset = "mini", out, tokenizer;
    bool metadata_only = false;
    std::uint64_t seed = 1, shard_mb = 0;
    int threads = 0;
    int layers = 0, experts = 0, top_k = 0, hidden = 0, inter = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
    app.add_option("--preset", preset, "mini (default model) or phi-tiny (the real Phi-tiny-MoE shape)")
        ->check(CLI::IsMember({"mini", "phi-tiny"}))
        ->capture_default_str();
    app.add_option("--out", out, "output directory (default: models/<preset>)");
    app.add_option("--seed", seed, "random seed; the same seed gives the same bytes")->capture_default_str();
    app.add_option("--shard-mb", shard_mb, "maximum shard size in MB (default: 16 for mini, 1024 for phi-tiny)");
    app.add_option("--threads", threads, "generator threads (default: all cores; does not change the bytes)");
    app.add_option("--layers", layers, "override num_hidden_layers")->check(CLI::PositiveNumber);
    app.add_option("--experts", experts, "override num_local_experts")->check(CLI::PositiveNumber);
    app.add_option("--top-k", top_k, "override num_experts_per_tok")->check(CLI::PositiveNumber);
    app.add_option("--hidden", hidden, "override hidden_size")->check(CLI::PositiveNumber);
    app.add_option("--intermediate", inter, "override intermediate_size (per expert)")->check(CLI::PositiveNumber);
    app.add_option("--heads", heads, "override num_attention_heads")->check(CLI::PositiveNumber);
    app.add_option("--kv-heads", kv_heads, "override num_key_value_heads")->check(CLI::PositiveNumber);
    app.add_option("--head-dim", head_dim, "override head_dim")->check(CLI::PositiveNumber);
    app.add_option("--vocab", vocab, "override vocab_size")->check(CLI::PositiveNumber);
    app.add_option("--tokenizer", tokenizer,
                   "tokenizer.json to copy into the model, or 'none' (default: the course's small tokenizer, "
                   "data/tokenizer/tokenizer.json, when its ids fit the vocabulary)");
    app.add_flag("--metadata-only", metadata_only, "write config.json and the index only (no shards, no tokenizer)");
    if (auto rc = parse_cli(app, argc, argv)) return *rc;

    ModelConfig c = generator_preset(preset);
    if (layers) c.num_hidden_layers = layers;
    if (experts) c.num_local_experts = experts;
    if (top_k) c.num_experts_per_tok = top_k;
    if (hidden) c.hidden_size = hidden;
    if (inter) c.intermediate_size = inter;
    if (heads) c.num_attention_heads = heads;
    if (kv_heads) c.num_key_value_heads = kv_heads;
    if (head_dim) c.head_dim = head_dim;
    if (vocab) c.vocab_size = vocab;
    c.validate("make_model flags");
    if (out.empty()) out = "models/" + preset;

    GeneratorOptions opt;
    opt.seed = seed;
    opt.shard_bytes = (shard_mb ? shard_mb : generator_default_shard_mb(preset)) << 20;
    opt.threads = threads;
    opt.name_or_path = strf("eplab-synthetic-%s-seed%llu", preset.c_str(), (unsigned long long)seed);
    opt.log = [](const std::string& line) { std::printf("%s\n", line.c_str()); std::fflush(stdout); };
    opt.metadata_only = metadata_only;
    std::string tok_note;
    if (metadata_only) {
      require(tokenizer.empty() || tokenizer == "none",
              "--tokenizer and --metadata-only do not go together (metadata only writes no tokenizer)");
    } else if (tokenizer.empty()) {  // the default: the course tokenizer, if its ids fit
      const std::string course = EPLAB_DATA_DIR "/tokenizer/tokenizer.json";
      if (!std::filesystem::is_regular_file(course)) {
        tok_note = "no tokenizer.json written: data/tokenizer/tokenizer.json is missing (--prompt-ids still work)";
      } else if (const int n = Tokenizer::load(course).vocab_size(); n > c.vocab_size) {
        tok_note = strf("no tokenizer.json written: the course tokenizer's %d ids do not fit vocab %d "
                        "(--prompt-ids still work)", n, c.vocab_size);
      } else {
        opt.tokenizer_json = course;
      }
    } else if (tokenizer != "none") {
      opt.tokenizer_json = tokenizer;
    }

    const ParamCounts p = count_params(c);
    std::printf("make_model: preset %s, seed %llu: %d layers, hidden %d, %d experts (top-%d), %s parameters -> %s\n",
                preset.c_str(), (unsigned long long)seed, c.num_hidden_layers, c.hidden_size, c.num_local_experts,
                c.num_experts_per_tok, human_count(double(p.total)).c_str(), out.c_str());
    WallTimer t;
    const GeneratedModel g = generate_model(out, c, opt);
    if (metadata_only)
      std::printf("make_model: wrote config.json and the index (%lld tensors, %s in %d shards named, none written) "
                  "to %s\n", (long long)g.tensors, human_bytes(double(g.bytes)).c_str(), g.shards, out.c_str());
    else
      std::printf("make_model: wrote %lld tensors, %s in %d shards to %s in %.1f s\n", (long long)g.tensors,
                  human_bytes(double(g.bytes)).c_str(), g.shards, out.c_str(), t.ms() / 1e3);
    if (g.tokenizer_ids)
      std::printf("make_model: tokenizer.json from %s (%d ids of the model's %d)\n",
                  tokenizer.empty() ? "the course tokenizer, data/tokenizer/tokenizer.json" : tokenizer.c_str(),
                  g.tokenizer_ids, c.vocab_size);
    else if (!tok_note.empty())
      std::printf("make_model: %s\n", tok_note.c_str());
    return 0;
  });
}
