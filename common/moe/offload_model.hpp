// Offload the experts over PCIe, or spread them with expert parallelism? The back-of-the-envelope model of
// the course's llm-d note (seeds/004), for any MoE model card, per forward over N_t tokens:
//
//   T_P  = T_B + L · S_E · f_E · N_ue / B_pcie        experts fetched from host memory (+ latency per transfer)
//   T_EP = T_B + 2 · L · N_t · d · f_a / B_net         activations to remote experts and back (+ all-to-all latency)
//   γ    = (T_P − T_B) / (T_EP − T_B) = ½ · (S_E f_E)/(d f_a) · B_net/B_pcie · N_ue/N_t     offload wins when γ < 1
//
// L: MoE layers; S_E: parameters of one routed expert (3 · d · I for a gated MLP); f_E, f_a: bytes per weight /
// activation; d: hidden size; N_ue: distinct experts used in a layer over the N_t tokens, at worst
// min(k · N_t, E) (the note's assumption), or measured from real routing. T_B, the compute of the forward, is
// max(FLOPs / peak, bytes read / HBM bandwidth) at the ceilings the caller passes (chapter 02 measures them).
//
// What the note leaves out and this model adds as separate terms (zero by default): a fixed latency per
// expert transfer over PCIe, and per all-to-all (dispatch, combine) per layer. Decode: each step is a forward
// over the batch's new tokens (N_t = batch), repeated per generated token.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace eplab {

// The fields of a model card (config.json) the model needs.
struct MoeCard {
  std::string name;
  int hidden = 0;          // d
  int expert_inter = 0;    // a routed expert's intermediate size
  int experts = 0;         // E, routed experts per MoE layer
  int shared_experts = 0;  // always-active experts (kept on the GPU here: they are used by every token)
  int top_k = 0;           // k
  int layers = 0;          // all decoder layers
  int moe_layers = 0;      // L: the layers with routed experts
  double weight_bytes = 2; // f_E: 2 for bf16, 1 for FP8 checkpoints
  double expert_params() const { return 3.0 * hidden * double(expert_inter); }  // S_E: gate, up, down
};

// From a config.json (DeepSeek-V3/R1, Mixtral, Qwen3-MoE, PhiMoE field names). Throws eplab::Error (one line)
// naming the first missing or invalid field.
MoeCard card_from_config(const nlohmann::json& config, const std::string& name);
// A card by name from data/model-cards (deepseek-r1, deepseek-v3, mixtral-8x7b, qwen3-30b-a3b) or
// data/phi-tiny-moe (phi-tiny-moe); data_dir is the repository's data/. Throws for an unknown name.
MoeCard load_card(const std::string& name, const std::string& data_dir);
std::vector<std::string> card_names();

struct SystemSpec {
  double b_pcie = 0, b_net = 0;        // bytes/s, host -> GPU, and GPU -> GPU over the EP network
  double act_bytes = 2;                // f_a: 2 for bf16 activations, 1 for FP8 dispatch
  double pcie_latency_s = 0;           // per expert transfer
  double net_latency_s = 0;            // per all-to-all (2 per layer)
  double peak_flops = 0, hbm_bytes_s = 0;  // the GPU's ceilings for T_B; 0 = T_B not computed
};

struct GammaPoint {
  double tokens = 0;          // N_t
  double used_experts = 0;    // N_ue per layer (worst case, or measured)
  double t_offload = 0;       // T_P − T_B, s
  double t_ep = 0;            // T_EP − T_B, s
  double gamma = 0;           // T_P−T_B over T_EP−T_B (with the latency terms; without them: the note's γ)
  double t_base = 0;          // T_B, s: the routed experts' share of the forward (0 without ceilings)
};

double worst_case_used_experts(const MoeCard& c, double tokens);  // min(k · N_t, E)
// used_experts < 0: the worst case.
GammaPoint gamma_point(const MoeCard& c, const SystemSpec& s, double tokens, double used_experts = -1);
// The smallest N_t with γ <= 1 under the worst case, without latency terms (1 when γ <= 1 already at one
// token). γ is ½ · (S_E f_E)/(d f_a) · B_net/B_pcie · k while k · N_t < E, then falls as E / N_t, so past
// N_t = E / k the crossover is ½ · (S_E f_E)/(d f_a) · B_net/B_pcie · E.
double crossover_tokens(const MoeCard& c, const SystemSpec& s);

// Distinct experts per layer used by the first n rows of each layer's routing (rows: [tokens][k] ids),
// averaged over layers. The measured N_ue.
double measured_used_experts(const std::vector<std::vector<int>>& ids_per_layer, int k, int tokens);

}  // namespace eplab
