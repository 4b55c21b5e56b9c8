#include "moe/layer_problem.hpp"

#include "moe/layer_check.hpp"
#include "util/check.hpp"

namespace eplab {

void add_layer_options(CLI::App& app, LayerOptions& opt) {
  app.add_option("--tokens", opt.tokens, "number of tokens T in the batch")->capture_default_str();
  app.add_option("--layer", opt.layer, "which MoE layer of the model")->capture_default_str();
  app.add_option("--router", opt.router, "auto (the model's), sparsemixer, softmax")
      ->check(CLI::IsMember({"auto", "sparsemixer", "softmax"}))
      ->capture_default_str();
  app.add_option("--top-k", opt.top_k, "experts per token (0 = the model's; sparsemixer needs 2)");
  app.add_option("--show", opt.show, "print the routing of this many tokens")->capture_default_str();
}

Routing route_on_cpu(const LayerProblem& p) {
  const int T = p.tokens, H = p.weights.hidden, E = p.weights.num_experts;
  std::vector<float> logits(size_t(T) * E);
  router_logits_cpu(p.x, bf16_to_float(std::span<const bf16_bits>(p.weights.gate)), T, H, E, logits);
  return route(p.router, logits, T, E, p.top_k, p.jitter_eps);
}

LayerProblem make_layer_problem(const Checkpoint& ckpt, const LayerOptions& opt, std::uint64_t seed,
                                const std::vector<int>& experts) {
  const ModelConfig& cfg = ckpt.config();
  require(opt.tokens >= 0, "--tokens must be >= 0, got ", opt.tokens);
  require(opt.layer >= 0 && opt.layer < cfg.num_hidden_layers, "--layer ", opt.layer, " is out of range (the model has ",
          cfg.num_hidden_layers, " layers)");
  LayerProblem p;
  p.router = opt.router == "auto" ? cfg.router : parse_router(opt.router);
  p.top_k = opt.top_k > 0 ? opt.top_k : cfg.num_experts_per_tok;
  require(opt.top_k >= 0, "--top-k must be >= 1, got ", opt.top_k);
  require(p.top_k <= cfg.num_local_experts, "--top-k ", p.top_k, " is larger than the number of experts (",
          cfg.num_local_experts, ")");
  require(p.router != RouterKind::SparseMixer || p.top_k == 2, "sparsemixer routing picks exactly 2 experts; --top-k ",
          p.top_k, " needs --router softmax");
  p.jitter_eps = cfg.router_jitter_noise;
  p.tokens = opt.tokens;
  p.weights = load_moe_layer(ckpt, opt.layer, experts);
  p.x_bf16 = random_activations(opt.tokens, cfg.hidden_size, seed);
  p.x = bf16_to_float(std::span<const bf16_bits>(p.x_bf16));
  return p;
}

}  // namespace eplab
