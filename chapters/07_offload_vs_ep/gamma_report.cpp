#include "gamma_report.hpp"

#include <cmath>
#include <cstdio>

#include "util/report.hpp"

namespace eplab {
namespace {

std::string seconds(double s) {
  if (s >= 1) return strf("%.2f s", s);
  if (s >= 1e-3) return strf("%.2f ms", s * 1e3);
  return strf("%.1f us", s * 1e6);
}

std::string tokens_str(double n) { return n >= 1e6 ? strf("%.2f M", n / 1e6) : strf("%.0f", n); }

}  // namespace

nlohmann::json gamma_table(const MoeCard& c, const SystemSpec& s, const std::vector<double>& tokens,
                           const std::vector<double>& measured) {
  const double SE = c.expert_params();
  std::printf("\n%s: d = %d, routed experts E = %d (+%d shared), top-k = %d, MoE layers L = %d of %d, S_E = %s "
              "params (3 x %d x %d), f_E = %.0f B, f_a = %.0f B\n",
              c.name.c_str(), c.hidden, c.experts, c.shared_experts, c.top_k, c.moe_layers, c.layers,
              human_count(SE).c_str(), c.hidden, c.expert_inter, c.weight_bytes, s.act_bytes);
  std::printf("system: B_pcie = %.1f GB/s, B_net = %.1f GB/s%s\n", s.b_pcie / 1e9, s.b_net / 1e9,
              s.pcie_latency_s > 0 || s.net_latency_s > 0
                  ? strf(", latency %.1f us per expert transfer, %.1f us per all-to-all", s.pcie_latency_s * 1e6,
                         s.net_latency_s * 1e6).c_str()
                  : "");
  Table t({"N_t", "N_ue (worst)", "N_ue (measured)", "T_P - T_B", "T_EP - T_B", "gamma", "T_B (routed experts)",
           "better"});
  nlohmann::json rows = nlohmann::json::array();
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const bool has_measured = i < measured.size() && measured[i] >= 0;
    const GammaPoint g = gamma_point(c, s, tokens[i], has_measured ? measured[i] : -1);
    t.add_row({tokens_str(tokens[i]), strf("%.0f", worst_case_used_experts(c, tokens[i])),
               has_measured ? strf("%.1f", measured[i]) : "-", seconds(g.t_offload), seconds(g.t_ep),
               strf(g.gamma >= 100 ? "%.0f" : "%.3g", g.gamma), g.t_base > 0 ? seconds(g.t_base) : "-",
               g.gamma < 1 ? "offload" : "EP"});
    rows.push_back({{"tokens", tokens[i]}, {"used_experts", g.used_experts}, {"measured", has_measured},
                    {"t_offload_minus_base_s", g.t_offload}, {"t_ep_minus_base_s", g.t_ep}, {"gamma", g.gamma},
                    {"t_base_s", g.t_base}});
  }
  t.print();
  const double x = crossover_tokens(c, s);
  std::printf("gamma = 1 at N_t = %s (worst-case N_ue, no latency terms): offload wins only above it\n",
              tokens_str(x).c_str());
  return {{"card", c.name},
          {"inputs",
           {{"S_E", SE}, {"f_E", c.weight_bytes}, {"d", c.hidden}, {"f_a", s.act_bytes}, {"L", c.moe_layers},
            {"k", c.top_k}, {"E", c.experts}, {"B_pcie", s.b_pcie}, {"B_net", s.b_net}}},
          {"rows", rows},
          {"crossover_tokens", x}};
}

nlohmann::json overview(const std::vector<MoeCard>& cards, double act_bytes) {
  struct Sys {
    const char* name;
    double net;
  };
  const Sys systems[] = {{"400 Gb/s InfiniBand", kInfiniBand400}, {"NVLink 4", kNvlink4}};
  std::printf("gamma = (T_P - T_B) / (T_EP - T_B), worst-case N_ue = min(k N_t, E); B_pcie = PCIe Gen5 x16 (%.0f "
              "GB/s, stated); f_a = %.0f B\n",
              kPcieGen5x16 / 1e9, act_bytes);
  Table t({"model", "EP network", "gamma at N_t = 1", "gamma at N_t = 4096", "gamma = 1 at N_t"});
  nlohmann::json out = nlohmann::json::array();
  for (const MoeCard& c : cards)
    for (const Sys& sy : systems) {
      SystemSpec s;
      s.b_pcie = kPcieGen5x16;
      s.b_net = sy.net;
      s.act_bytes = act_bytes;
      const GammaPoint g1 = gamma_point(c, s, 1), g4k = gamma_point(c, s, 4096);
      const double x = crossover_tokens(c, s);
      t.add_row({c.name, sy.name, strf("%.0f", g1.gamma), strf(g4k.gamma >= 100 ? "%.0f" : "%.3g", g4k.gamma),
                 tokens_str(x)});
      out.push_back({{"card", c.name}, {"network", sy.name}, {"b_net", sy.net}, {"gamma_1", g1.gamma},
                     {"gamma_4096", g4k.gamma}, {"crossover_tokens", x}});
    }
  t.print();
  return out;
}

}  // namespace eplab
