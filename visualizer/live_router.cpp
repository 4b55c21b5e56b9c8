#include "live_router.hpp"

#include <cmath>
#include <filesystem>

#include "stand_in_tokens.hpp"
#include "util/check.hpp"

namespace eplab::viz {

LiveRouter::LiveRouter(const std::string& model_dir, const DeviceChoice& dev) : ckpt_(Checkpoint::open(model_dir)) {
  const std::string tpath = ckpt_.dir() + "/tokenizer.json";
  if (std::filesystem::is_regular_file(tpath)) {
    tok_ = Tokenizer::load(tpath);
    require(tok_->vocab_size() <= config().vocab_size, "tokenizer ", tpath, " has ", tok_->vocab_size(),
            " ids but the model's vocab_size is ", config().vocab_size, ": its ids would not fit the embedding");
    tokenizer_label_ = "tokenizer.json (" + std::to_string(tok_->vocab_size()) + " ids)";
  } else {
    tokenizer_label_ = "stand-in tokenizer (no tokenizer.json)";
  }
  if (dev.backend == Backend::Gpu) {
    gpu_ = std::make_unique<GpuRouter>(dev.gpu);
    device_label_ = "GPU " + dev.description + ", kernels router_logits + route_topk";
  } else {
    // description is "CPU (--device cpu)" or "CPU (no GPU: <why>)"; empty for a default DeviceChoice.
    device_label_ = (dev.description.empty() ? std::string("CPU") : dev.description) + ", common/moe/routing";
  }
}

LiveRouter::~LiveRouter() = default;

const std::vector<bf16_bits>& LiveRouter::gate(int layer) {
  auto it = gates_.find(layer);
  if (it != gates_.end()) return it->second;
  const ModelConfig& c = config();
  // Only the router: load_moe_layer would also read every expert of the layer, which we do not need.
  auto g = ckpt_.read_bf16(names::router_gate(layer), {c.num_local_experts, c.hidden_size});
  return gates_.emplace(layer, std::move(g)).first->second;
}

RoutingFrame LiveRouter::route_prompt(const std::string& prompt, int layer) {
  const ModelConfig& c = config();
  require(layer >= 0 && layer < c.num_hidden_layers, "--layer ", layer, " is out of range: the model has ",
          c.num_hidden_layers, " layers (0..", c.num_hidden_layers - 1, ")");
  const int H = c.hidden_size, E = c.num_local_experts;
  if (embed_.empty()) embed_ = ckpt_.read_bf16(names::embed_tokens(), {c.vocab_size, H});

  PromptTokens tok;  // ids and pieces, from the model's tokenizer or the stand-in
  if (!tok_) {
    tok = stand_in_tokenize(prompt, c.vocab_size);
  } else if (prompt.find_first_not_of(" \t\r\n") != std::string::npos) {  // a blank prompt routes nothing
    tok.ids = tok_->encode(prompt, /*add_bos=*/true);                      // as chapter 05 encodes --prompt
    for (int id : tok.ids) tok.pieces.push_back(tok_->piece(id));
  }
  const int T = int(tok.ids.size());
  // The layer input in bf16, as the model hands it to the MoE block and as the GPU kernel takes it.
  std::vector<bf16_bits> x(std::size_t(T) * H);
  for (int t = 0; t < T; ++t) {
    const bf16_bits* row = embed_.data() + std::size_t(tok.ids[t]) * H;
    double ss = 0;
    for (int h = 0; h < H; ++h) ss += double(bf16_to_float(row[h])) * bf16_to_float(row[h]);
    const float scale = ss > 0 ? float(1.0 / std::sqrt(ss / H)) : 0.f;
    for (int h = 0; h < H; ++h) x[std::size_t(t) * H + h] = float_to_bf16(bf16_to_float(row[h]) * scale);
  }
  const std::vector<bf16_bits>& g = gate(layer);
  std::vector<float> logits(std::size_t(T) * E);
  Routing routing;
  if (gpu_) {
    gpu_->route(x, g, layer, T, H, E, c.num_experts_per_tok, c.router, c.router_jitter_noise, logits, routing);
  } else {
    std::vector<float> xf(x.size()), gf(g.size());
    for (std::size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_float(x[i]);
    for (std::size_t i = 0; i < g.size(); ++i) gf[i] = bf16_to_float(g[i]);
    router_logits_cpu(xf, gf, T, H, E, logits);
    routing = route(c.router, logits, T, E, c.num_experts_per_tok, c.router_jitter_noise);
  }

  RoutingFrame f;
  f.layer = layer;
  f.num_experts = E;
  f.hidden = H;
  f.tokens = tok.ids;
  f.pieces = tok.pieces;
  f.routing = std::move(routing);
  f.computed_on = gpu_ ? "GPU" : "CPU";
  f.probs.resize(logits.size());
  for (int t = 0; t < T; ++t) {  // softmax per token: the heat map's colour
    const float* l = logits.data() + std::size_t(t) * E;
    float m = l[0];
    for (int e = 1; e < E; ++e) m = std::max(m, l[e]);
    double s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(double(l[e] - m));
    for (int e = 0; e < E; ++e) f.probs[std::size_t(t) * E + e] = float(std::exp(double(l[e] - m)) / s);
  }
  f.logits = std::move(logits);
  return f;
}

}  // namespace eplab::viz
