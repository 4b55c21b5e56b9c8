// Chapter 00: meet the model.
//
// Reads a PhiMoE checkpoint directory the way every later chapter does (config.json, the safetensors
// index, every shard's header: no weights are read), checks that each tensor has the shape the config
// implies, and prints the architecture, the parameter table and the weights' memory per GPU for each
// expert-parallel (EP) size, for the loaded model and for the real Phi-tiny-MoE shape.
//
// Two kinds of directory:
//  - a full checkpoint (config.json, index, shards): the parameter count summed over the tensors on disk
//    equals the count the cost model (common/moe/cost_model.hpp) derives from config.json; so do the
//    tensor count and the experts' part.
//  - metadata only (config.json and model.safetensors.index.json, none of the shards: what a download of
//    the real model starts with, e.g. data/phi-tiny-moe): the index carries no shapes, so the sizes come
//    from the config; the check is that the index names exactly the tensors PhiMoE needs for this config
//    and that its metadata.total_size equals the config-derived parameter count x bytes per parameter.
//
// Run: 00_model_tour [--model DIR] [--ep-sizes 1,2,4,8,16] [--json FILE]
//      00_model_tour --model data/phi-tiny-moe
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "moe/cost_model.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"

using namespace eplab;

namespace {

std::string exact(std::int64_t n) {  // 5505024 -> "5,505,024"
  std::string s = std::to_string(n), out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return out;
}

std::string short_count(double n) {  // three significant digits: 5.51 M, 3.76 B, 23.1 M, 98.3 K
  const char* unit = "";
  if (n >= 1e9) { n /= 1e9; unit = " B"; }
  else if (n >= 1e6) { n /= 1e6; unit = " M"; }
  else if (n >= 1e3) { n /= 1e3; unit = " K"; }
  else return strf("%.0f", n);
  return strf(n >= 100 ? "%.0f%s" : n >= 10 ? "%.1f%s" : "%.2f%s", n, unit);
}

// The EP sizes of the memory tables. Default: 1, 2, 4, ... up to the model's experts (and E itself). A size
// larger than the experts per layer is refused, as every chapter refuses it: a GPU would hold no expert.
std::vector<int> ep_sizes_for(const ModelConfig& c, const std::vector<int>& asked, bool given) {
  const int E = c.num_local_experts;
  if (!given) {
    std::vector<int> out;
    for (int n = 1; n <= E; n *= 2) out.push_back(n);
    if (out.back() != E) out.push_back(E);
    return out;
  }
  for (int n : asked)
    require(n <= E, "--ep-sizes: EP size ", n, " is larger than the model's ", E,
            " experts per layer (a GPU would hold no expert; use sizes up to ", E, ")");
  return asked;
}

void print_architecture(const ModelConfig& c) {
  const int q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  std::printf("  %d decoder layers, hidden %d, pre-norm: x += attn(LN(x)); x += moe(LN(x))\n", c.num_hidden_layers,
              c.hidden_size);
  std::printf("  LayerNorm with weight and bias, eps %g (config calls it rms_norm_eps)\n", double(c.rms_norm_eps));
  std::printf("  attention: %d query heads, %d KV heads (GQA, %d queries per KV head), head_dim %d\n",
              c.num_attention_heads, c.num_key_value_heads, c.num_attention_heads / c.num_key_value_heads, c.head_dim);
  std::printf("             q [%d, %d], k/v [%d, %d], o [%d, %d]%s; RoPE theta %g; sliding window %d\n", q,
              c.hidden_size, kv, c.hidden_size, c.hidden_size, q, c.attention_bias ? ", all with bias" : "",
              double(c.rope_theta), c.sliding_window);
  std::printf("  MoE: %d experts, top-%d, router gate [%d, %d], routing %s (jitter_eps %g)\n", c.num_local_experts,
              c.num_experts_per_tok, c.num_local_experts, c.hidden_size, router_name(c.router),
              double(c.router_jitter_noise));
  std::printf("  expert (SwiGLU): y = w2( silu(w1 x) * (w3 x) ), SiLU on the w1 branch only;\n");
  std::printf("                   w1, w3 [%d, %d], w2 [%d, %d]\n", c.intermediate_size, c.hidden_size,
              c.hidden_size, c.intermediate_size);
  std::printf("  vocab %d: embed_tokens [%d, %d], lm_head [%d, %d]%s%s\n", c.vocab_size, c.vocab_size, c.hidden_size,
              c.vocab_size, c.hidden_size, c.lm_head_bias ? " + bias" : "",
              c.tie_word_embeddings ? " (tied to the embedding)" : " (untied)");
}

nlohmann::json params_json(const ParamCounts& p) {
  return {{"per_expert", p.per_expert},         {"experts_per_layer", p.experts_per_layer},
          {"experts_total", p.experts_total},   {"router_total", p.router_total},
          {"attention_per_layer", p.attention_per_layer}, {"attention_total", p.attention_total},
          {"norms_total", p.norms_total},       {"embeddings", p.embeddings},
          {"lm_head", p.lm_head},               {"non_expert", p.non_expert},
          {"total", p.total},                   {"active_per_token", p.active_per_token},
          {"active_per_token_no_embed", p.active_per_token_no_embed}};
}

void print_params(const ParamCounts& a, const ParamCounts& b) {
  Table t({"parameters", "loaded model", "(exact)", "Phi-tiny-MoE", "(exact)", "formula"});
  auto row = [&](const char* what, std::int64_t x, std::int64_t y, const char* formula) {
    t.add_row({what, human_count(double(x)), exact(x), human_count(double(y)), exact(y), formula});
  };
  row("per expert", a.per_expert, b.per_expert, "3 H I");
  row("experts per layer", a.experts_per_layer, b.experts_per_layer, "E x 3 H I");
  row("experts, all layers", a.experts_total, b.experts_total, "L E 3 H I");
  row("router, all layers", a.router_total, b.router_total, "L E H");
  row("attention per layer", a.attention_per_layer, b.attention_per_layer, "q,k,v,o + biases");
  row("attention, all layers", a.attention_total, b.attention_total, "L x above");
  row("norms", a.norms_total, b.norms_total, "(2L + 1) x 2H");
  row("embeddings", a.embeddings, b.embeddings, "V H");
  row("lm_head", a.lm_head, b.lm_head, "V H + V");
  row("total", a.total, b.total, "");
  row("active per token", a.active_per_token, b.active_per_token, "total - experts + L k 3 H I");
  row("  without embedding", a.active_per_token_no_embed, b.active_per_token_no_embed, "(a lookup, not a GEMM)");
  t.print();
}

nlohmann::json print_memory(const ModelConfig& c, const std::vector<int>& ep_sizes, bool print = true) {
  // The last column: chapter 06's load balancing adds redundant expert slots (replicas of hot experts); one
  // more slot per GPU costs one expert in every layer.
  Table t({"EP size", "experts/layer per GPU", "expert weights per GPU", "replicated per GPU", "total per GPU",
           "+1 redundant slot/GPU"});
  nlohmann::json rows = nlohmann::json::array();
  const EpMemory one = ep_memory(c, 1);
  const double expert_all_layers = one.expert_bytes_per_gpu / std::max(1, one.experts_per_gpu_max);
  for (int n : ep_sizes) {
    const EpMemory m = ep_memory(c, n);
    const std::string per = m.even ? std::to_string(m.experts_per_gpu_max)
                                   : strf("%d (busiest; others %d)", m.experts_per_gpu_max, m.experts_per_gpu_min);
    t.add_row({std::to_string(n), per, human_bytes(m.expert_bytes_per_gpu), human_bytes(m.replicated_bytes),
               human_bytes(m.total_bytes_per_gpu), human_bytes(m.total_bytes_per_gpu + expert_all_layers)});
    rows.push_back({{"ep_size", n}, {"experts_per_gpu_max", m.experts_per_gpu_max}, {"even", m.even},
                    {"expert_bytes_per_gpu", m.expert_bytes_per_gpu}, {"replicated_bytes", m.replicated_bytes},
                    {"total_bytes_per_gpu", m.total_bytes_per_gpu},
                    {"total_bytes_per_gpu_one_redundant", m.total_bytes_per_gpu + expert_all_layers}});
  }
  if (print) t.print();
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    CLI::App app{"Chapter 00: meet the model (architecture, parameter and memory-per-EP-size tables; no GPU needed)"};
    CommonOptions opt;
    std::vector<int> asked_ep_sizes;
    add_common_options(app, opt);
    CLI::Option* ep_opt =
        app.add_option("--ep-sizes", asked_ep_sizes,
                       "EP sizes (GPUs sharing the experts) for the memory table, each at most the number of "
                       "experts [default: 1,2,4,... up to the experts]")
            ->delimiter(',')
            ->check(CLI::Range(1, 4096));
    if (auto rc = parse_cli(app, argc, argv)) return *rc;

    // 1. Open: config.json and the index; with the shards there, every shard's header and each tensor's
    //    shape against the config; without them (metadata only), the names against the config.
    const Checkpoint ckpt = Checkpoint::open(opt.model, Checkpoint::Shards::AllOrNone);
    const ModelConfig& c = ckpt.config();
    const std::vector<int> ep_sizes = ep_sizes_for(c, asked_ep_sizes, ep_opt->count() > 0);
    const bool weights = ckpt.weights_present();
    if (weights) ckpt.validate_against_config();
    else ckpt.validate_names_against_config();
    const std::size_t expected_tensors = phimoe_tensor_specs(c).size();
    const int shard_count = int(ckpt.shard_files().size());
    const ParamCounts pc = count_params(c);

    std::printf("== Chapter 00: model tour ==\n");
    DiskCounts disk;
    if (weights) {
      disk = ckpt.disk_counts();
      std::printf("model %s: %d shard(s), %lld tensors, %s of weights (%s); this chapter reads headers only\n",
                  opt.model.c_str(), disk.shards, (long long)disk.tensors, human_bytes(double(disk.bytes)).c_str(),
                  disk.bytes == std::uint64_t(disk.params) * 2 ? "bf16" : "mixed dtypes");
    } else {
      std::printf("model %s: config.json + model.safetensors.index.json (%zu tensor names in %d shard file(s));\n"
                  "  the weights are not present (metadata only): sizes below come from config.json\n",
                  opt.model.c_str(), ckpt.tensor_names().size(), shard_count);
    }
    std::printf("\narchitecture (PhimoeForCausalLM):\n");
    print_architecture(c);

    // 2. Parameters, from the config (cost model), next to the real Phi-tiny-MoE shape.
    const ModelConfig phi = phi_tiny_moe_config();
    const ParamCounts pp = count_params(phi);
    std::printf("\nparameters (H hidden, I intermediate, E experts, L layers, V vocab, k top-k):\n");
    print_params(pc, pp);
    std::printf("loaded model: %s parameters per expert, %s in all (%s in experts, %s active per token)\n",
                short_count(double(pc.per_expert)).c_str(), short_count(double(pc.total)).c_str(),
                short_count(double(pc.experts_total)).c_str(), short_count(double(pc.active_per_token)).c_str());
    std::printf("note: the course's source documents say ~55 M parameters per expert; it is 3 x 4096 x 448 = %s\n"
                "      (their own 3.76 B total contradicts 55 M x 16 x 32 = 28 B). They also put SiLU on both\n"
                "      expert branches; PhiMoE applies it to the w1 branch only.\n",
                human_count(double(pp.per_expert)).c_str());
    std::printf("      'Active per token' depends on what you count: %s with the embedding table, %s without it\n"
                "      (it is a row lookup, not a GEMM); Phi-tiny-MoE's model card quotes 1.1 B.\n",
                human_count(double(pp.active_per_token)).c_str(), human_count(double(pp.active_per_token_no_embed)).c_str());

    // 3. Memory per GPU under expert parallelism: experts are split, everything else is replicated.
    std::printf("\nweights per GPU under EP, loaded model (bf16; activations, KV cache and workspaces not included):\n");
    const nlohmann::json mem_loaded = print_memory(c, ep_sizes);
    std::vector<int> phi_sizes;
    for (int n : ep_sizes)
      if (n <= phi.num_local_experts) phi_sizes.push_back(n);
    const bool same_shape = pc.total == pp.total && pc.experts_total == pp.experts_total &&
                            c.num_local_experts == phi.num_local_experts && phi_sizes == ep_sizes;
    if (same_shape)
      std::printf("\nweights per GPU under EP, Phi-tiny-MoE: the table above (the loaded model has its shape)\n");
    else
      std::printf("\nweights per GPU under EP, Phi-tiny-MoE%s:\n",
                  phi_sizes.size() < ep_sizes.size() ? " (EP sizes up to its 16 experts)" : "");
    const nlohmann::json mem_phi = print_memory(phi, phi_sizes, !same_shape);
    std::printf("when N does not divide E, the busiest GPU holds ceil(E/N) experts per layer and sets the memory.\n");

    // 4. The check: what is on disk (or what the index names) is what the config says.
    std::vector<std::string> bad;
    const std::int64_t names = std::int64_t(ckpt.tensor_names().size());
    const std::int64_t tensors = weights ? disk.tensors : names;
    if (tensors != std::int64_t(expected_tensors))
      bad.push_back(strf("%lld tensors %s, the config implies %zu", (long long)tensors,
                         weights ? "on disk" : "named by the index", expected_tensors));
    if (weights) {
      if (disk.params != pc.total)
        bad.push_back(strf("%lld parameters on disk, the config implies %lld", (long long)disk.params,
                           (long long)pc.total));
      if (disk.expert_params != pc.experts_total)
        bad.push_back(strf("%lld expert parameters on disk, the config implies %lld", (long long)disk.expert_params,
                           (long long)pc.experts_total));
    }
    const std::uint64_t config_bytes = std::uint64_t(pc.total) * std::uint64_t(bytes_per_param(c));
    const std::optional<std::uint64_t> total_size = ckpt.index_total_size();
    if (weights && total_size && *total_size != disk.bytes)
      bad.push_back(strf("the index's metadata.total_size is %s bytes, the shards hold %s bytes of tensors",
                         exact(std::int64_t(*total_size)).c_str(), exact(std::int64_t(disk.bytes)).c_str()));
    if (!weights) {
      if (!total_size)
        bad.push_back("the index has no metadata.total_size, so the weights' size cannot be checked");
      else if (*total_size != config_bytes)
        bad.push_back(strf("the index's metadata.total_size is %s bytes, the config implies %s (%s parameters x %d "
                           "bytes, %s)", exact(std::int64_t(*total_size)).c_str(),
                           exact(std::int64_t(config_bytes)).c_str(), exact(pc.total).c_str(), bytes_per_param(c),
                           c.torch_dtype.c_str()));
    }

    if (!opt.json.empty()) {
      nlohmann::json disk_json = nullptr;
      if (weights)
        disk_json = {{"shards", disk.shards}, {"tensors", disk.tensors}, {"params", disk.params},
                     {"expert_params", disk.expert_params}, {"bytes", disk.bytes}};
      write_json(opt.json, {{"chapter", "00_model_tour"},
                            {"model", opt.model},
                            {"weights_present", weights},
                            {"config", c.to_json()},
                            {"disk", disk_json},
                            {"index", {{"shards", shard_count}, {"tensor_names", names},
                                       {"total_size", total_size ? nlohmann::json(*total_size) : nullptr}}},
                            {"params", params_json(pc)},
                            {"memory", mem_loaded},
                            {"phi_tiny_moe", {{"config", phi.to_json()}, {"params", params_json(pp)}, {"memory", mem_phi}}},
                            {"pass", bad.empty()}});
    }
    if (!bad.empty()) {
      for (const auto& b : bad) std::printf("mismatch: %s\n", b.c_str());
      std::printf("CHECK FAIL 00_model_tour: %s\n", bad.front().c_str());
      return 1;
    }
    if (weights) {
      std::printf("\nCHECK PASS 00_model_tour: %lld tensors with the shapes config.json implies; %s parameters on disk "
                  "(%s in experts) = the config-derived count\n",
                  (long long)disk.tensors, exact(disk.params).c_str(), exact(disk.expert_params).c_str());
    } else {
      std::printf("\nweights not present: the tables need only config.json. Chapter 05 runs on the real weights once the\n"
                  "shards are downloaded (see data/README.md: one command, about %s).\n",
                  human_bytes(double(config_bytes)).c_str());
      std::printf("CHECK PASS 00_model_tour: metadata only: the index names the %lld tensors config.json implies and its "
                  "total_size %s bytes = %s parameters x %d bytes (%s)\n",
                  (long long)names, exact(std::int64_t(*total_size)).c_str(), exact(pc.total).c_str(),
                  bytes_per_param(c), c.torch_dtype.c_str());
    }
    return 0;
  });
}
