#include "moe/offload_model.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>

#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {
namespace {

int field_int(const nlohmann::json& c, const char* key, const std::string& name) {
  require(c.contains(key) && c[key].is_number_integer() && c[key].get<long long>() > 0, "model card ", name,
          ": field '", key, "' is missing or not a positive integer");
  return c[key].get<int>();
}

}  // namespace

MoeCard card_from_config(const nlohmann::json& c, const std::string& name) {
  require(c.is_object(), "model card ", name, ": not a JSON object");
  MoeCard m;
  m.name = name;
  m.hidden = field_int(c, "hidden_size", name);
  m.layers = field_int(c, "num_hidden_layers", name);
  m.top_k = field_int(c, "num_experts_per_tok", name);
  // routed experts: DeepSeek n_routed_experts, Qwen3 num_experts, Mixtral / PhiMoE num_local_experts
  const char* ekey = c.contains("n_routed_experts") ? "n_routed_experts"
                     : c.contains("num_experts")    ? "num_experts"
                                                    : "num_local_experts";
  m.experts = field_int(c, ekey, name);
  // a routed expert's width: moe_intermediate_size where the dense layers have another (DeepSeek, Qwen3)
  m.expert_inter = field_int(c, c.contains("moe_intermediate_size") ? "moe_intermediate_size" : "intermediate_size",
                             name);
  m.shared_experts = c.contains("n_shared_experts") ? field_int(c, "n_shared_experts", name) : 0;
  // MoE layers: DeepSeek's first_k_dense_replace layers are dense; Qwen3 lists dense layers in mlp_only_layers
  // and puts an MoE block every decoder_sparse_step layers
  m.moe_layers = m.layers;
  if (c.contains("first_k_dense_replace")) {
    const nlohmann::json& f = c["first_k_dense_replace"];
    require(f.is_number_integer() && f.get<long long>() >= 0 && f.get<long long>() < m.layers, "model card ", name,
            ": first_k_dense_replace must be an integer in [0, ", m.layers, ")");
    m.moe_layers -= f.get<int>();
  }
  if (c.contains("decoder_sparse_step") || c.contains("mlp_only_layers")) {
    const int step = c.contains("decoder_sparse_step") ? field_int(c, "decoder_sparse_step", name) : 1;
    std::set<int> dense;
    if (c.contains("mlp_only_layers")) {
      require(c["mlp_only_layers"].is_array(), "model card ", name, ": mlp_only_layers must be a list of layers");
      for (const auto& l : c["mlp_only_layers"]) {
        require(l.is_number_integer(), "model card ", name, ": mlp_only_layers holds a non-integer");
        dense.insert(l.get<int>());
      }
    }
    m.moe_layers = 0;
    for (int l = 0; l < m.layers; ++l) m.moe_layers += !dense.count(l) && (l + 1) % step == 0;
  }
  require(m.moe_layers >= 1, "model card ", name, ": no MoE layers");
  require(m.top_k <= m.experts, "model card ", name, ": num_experts_per_tok ", m.top_k, " > ", m.experts, " experts");
  // FP8 checkpoints (quantization_config.quant_method == fp8) store a weight in one byte
  m.weight_bytes = c.contains("quantization_config") && c["quantization_config"].value("quant_method", "") == "fp8" ? 1 : 2;
  return m;
}

std::vector<std::string> card_names() {
  return {"deepseek-r1", "deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b", "phi-tiny-moe"};
}

MoeCard load_card(const std::string& name, const std::string& data_dir) {
  const std::vector<std::string> names = card_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    fail("unknown --card '", name, "': use one of ", list);
  }
  const std::filesystem::path path = name == "phi-tiny-moe" ? std::filesystem::path(data_dir) / "phi-tiny-moe" / "config.json"
                                                            : std::filesystem::path(data_dir) / "model-cards" / (name + ".json");
  return card_from_config(read_json(path.string(), "model card " + name), name);
}

double worst_case_used_experts(const MoeCard& c, double tokens) {
  return std::min(double(c.top_k) * tokens, double(c.experts));
}

GammaPoint gamma_point(const MoeCard& c, const SystemSpec& s, double tokens, double used) {
  require(s.b_pcie > 0 && s.b_net > 0, "bandwidths must be > 0 (got B_pcie ", s.b_pcie, ", B_net ", s.b_net, ")");
  require(tokens > 0, "the token count must be > 0, got ", tokens);
  require(s.act_bytes > 0, "activation bytes must be > 0");
  GammaPoint g;
  g.tokens = tokens;
  g.used_experts = used < 0 ? worst_case_used_experts(c, tokens) : used;
  const double L = c.moe_layers, SE = c.expert_params();
  g.t_offload = L * SE * c.weight_bytes * g.used_experts / s.b_pcie + L * g.used_experts * s.pcie_latency_s;
  g.t_ep = 2.0 * L * tokens * c.hidden * s.act_bytes / s.b_net + 2.0 * L * s.net_latency_s;
  g.gamma = g.t_offload / g.t_ep;
  if (s.peak_flops > 0 && s.hbm_bytes_s > 0)  // the routed experts' own work: FLOPs, or their weights read once
    g.t_base = L * std::max(2.0 * tokens * c.top_k * SE / s.peak_flops, g.used_experts * SE * c.weight_bytes / s.hbm_bytes_s);
  return g;
}

double crossover_tokens(const MoeCard& c, const SystemSpec& s) {
  require(s.b_pcie > 0 && s.b_net > 0 && s.act_bytes > 0, "bandwidths and activation bytes must be > 0");
  const double a = 0.5 * c.expert_params() * c.weight_bytes / (c.hidden * s.act_bytes) * s.b_net / s.b_pcie;
  if (a * c.top_k <= 1) return 1;  // γ <= 1 from the first token on
  return std::max(a * c.experts, double(c.experts) / c.top_k);  // γ = a · E / N_t = 1
}

double measured_used_experts(const std::vector<std::vector<int>>& ids_per_layer, int k, int tokens) {
  require(k >= 1 && tokens >= 1, "measured_used_experts: k and tokens must be >= 1");
  require(!ids_per_layer.empty(), "measured_used_experts: no layers");
  double sum = 0;
  for (const std::vector<int>& ids : ids_per_layer) {
    require(ids.size() >= std::size_t(tokens) * k, "measured_used_experts: a layer has ", ids.size() / k,
            " routed tokens, fewer than ", tokens);
    std::set<int> used(ids.begin(), ids.begin() + std::ptrdiff_t(tokens) * k);
    used.erase(-1);
    sum += double(used.size());
  }
  return sum / double(ids_per_layer.size());
}

}  // namespace eplab
