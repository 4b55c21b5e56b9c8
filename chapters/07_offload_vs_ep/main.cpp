// Chapter 07: offload the experts over PCIe, or spread them with expert parallelism? A model too big for one
// GPU can keep its experts in host memory and fetch the ones a forward uses (T_P), or keep them on other GPUs
// and send the activations there and back (T_EP). The course's llm-d note compares the two with one ratio,
// γ = (T_P − T_B) / (T_EP − T_B) = ½ · (S_E f_E)/(d f_a) · B_net/B_pcie · N_ue/N_t: offload wins when γ < 1.
// common/moe/offload_model.hpp holds the model; this chapter evaluates it for real model cards and finishes
// the note's DeepSeek-R1 example.
//
// Run: 07_offload_vs_ep                                              every card, the stated systems
//      07_offload_vs_ep --card deepseek-r1 --tokens 1,64,4096,262144 --b-pcie 64e9 --b-net 50e9
//      07_offload_vs_ep --model data/mini --trace run.jsonl          N_ue measured from chapter 05's routing
//      07_offload_vs_ep --card mixtral-8x7b --pcie-latency-us 10 --net-latency-us 20 --json out.json
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "gamma_report.hpp"
#include "moe/offload_model.hpp"
#include "moe/routing_trace.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"

namespace eplab {
namespace {

struct Options {
  std::string card, model, trace, data = "data", json;
  std::vector<double> tokens{1, 8, 64, 512, 4096, 32768, 262144};
  double b_pcie = kPcieGen5x16, b_net = kInfiniBand400, act_bytes = 2;
  double pcie_latency_us = 0, net_latency_us = 0, peak_tflops = 0, hbm_gbps = 0;
};

// Each layer's expert ids, in row order over the whole trace (prefill rows, then every decode step's).
std::vector<std::vector<int>> trace_ids(const std::string& path, const MoeCard& card, int& k) {
  std::vector<std::vector<int>> ids;
  read_trace_file(path, "--trace", [&](const TraceRecord& r, int n) {
    if (r.T() == 0) return;  // a step with no tokens routes nothing
    // a trace of another model would give another model's N_ue
    require(r.num_experts == card.experts && (r.hidden == 0 || r.hidden == card.hidden) && r.layer < card.moe_layers,
            "--trace ", path, " line ", n, ": layer ", r.layer, " of a model with ", r.num_experts, " experts and hidden ",
            r.hidden, ", not ", card.name, " (", card.experts, " experts, hidden ", card.hidden, ", ", card.moe_layers,
            " MoE layers)");
    if (r.layer >= int(ids.size())) ids.resize(std::size_t(r.layer) + 1);
    k = r.routing.k;
    ids[std::size_t(r.layer)].insert(ids[std::size_t(r.layer)].end(), r.routing.ids.begin(), r.routing.ids.end());
  });
  require(!ids.empty() && k > 0, "--trace ", path, ": no routing in the file");
  return ids;
}

int run(int argc, char** argv) {
  Options o;
  CLI::App app{"Chapter 07: offload the experts over PCIe, or spread them with EP - the gamma model for a model card"};
  app.add_option("--card", o.card, "a model card: deepseek-r1, deepseek-v3, mixtral-8x7b, qwen3-30b-a3b, phi-tiny-moe");
  app.add_option("--model", o.model, "a model directory (its config.json) instead of a card");
  app.add_option("--trace", o.trace, "with --model: chapter 05's --trace of it, for the measured N_ue");
  app.add_option("--data", o.data, "the repository's data/ folder (the cards live there)")->capture_default_str();
  app.add_option("--tokens", o.tokens, "N_t values (tokens per forward)")->delimiter(',')->capture_default_str();
  app.add_option("--b-pcie", o.b_pcie, "host -> GPU bandwidth, bytes/s (default: PCIe Gen5 x16, stated)")
      ->capture_default_str();
  app.add_option("--b-net", o.b_net, "GPU -> GPU bandwidth of the EP network, bytes/s (default: 400 Gb/s "
                 "InfiniBand, stated)")->capture_default_str();
  app.add_option("--act-bytes", o.act_bytes, "f_a: bytes per dispatched activation (2: bf16, 1: FP8)")
      ->capture_default_str();
  app.add_option("--pcie-latency-us", o.pcie_latency_us, "latency per expert transfer (the note leaves it out)");
  app.add_option("--net-latency-us", o.net_latency_us, "latency per all-to-all, two per layer (left out too)");
  app.add_option("--peak-tflops", o.peak_tflops, "GPU bf16 ceiling for T_B (chapter 02's --bench measures it)");
  app.add_option("--hbm-gbps", o.hbm_gbps, "GPU memory bandwidth for T_B, GB/s (chapter 02 measures it)");
  app.add_option("--json", o.json, "write the inputs and every row here");
  if (auto early = parse_cli(app, argc, argv)) return *early;
  if (o.card.empty() && o.model.empty())  // the overview uses the stated systems and N_t = 1 and 4096
    for (const char* f : {"--tokens", "--b-pcie", "--b-net", "--pcie-latency-us", "--net-latency-us", "--peak-tflops",
                          "--hbm-gbps", "--trace"})
      require(app.count(f) == 0, f, " goes with --card or --model (without them: the overview at the stated "
              "bandwidths)");

  require(o.card.empty() || o.model.empty(), "--card and --model: give one of them");
  require(o.trace.empty() || !o.model.empty(), "--trace goes with --model (the model the trace was made with)");
  require(o.b_pcie > 0 && o.b_net > 0, "--b-pcie and --b-net must be > 0 bytes/s, got ", o.b_pcie, " and ", o.b_net);
  require(o.act_bytes > 0, "--act-bytes must be > 0, got ", o.act_bytes);
  require(o.pcie_latency_us >= 0 && o.net_latency_us >= 0, "latencies must be >= 0");
  require(o.peak_tflops >= 0 && o.hbm_gbps >= 0, "--peak-tflops and --hbm-gbps must be >= 0");
  require(!o.tokens.empty(), "--tokens needs at least one value");
  for (double t : o.tokens) require(t >= 1 && t == std::floor(t), "--tokens must be whole numbers >= 1, got ", t);

  // --- no card: the lesson's overview, every card against the stated systems
  if (o.card.empty() && o.model.empty()) {
    std::vector<MoeCard> cards;
    for (const std::string& n : card_names()) cards.push_back(load_card(n, o.data));
    const nlohmann::json j = overview(cards, o.act_bytes);
    if (!o.json.empty()) write_json(o.json, {{"chapter", "07_offload_vs_ep"}, {"overview", j}});
    std::printf("CHECK PASS 07_offload_vs_ep: %zu cards\n", cards.size());
    return 0;
  }

  // --- one card (or model) against one system, per N_t
  MoeCard card;
  if (!o.card.empty()) {
    card = load_card(o.card, o.data);
  } else {
    const std::string path = o.model + "/config.json";
    require(std::ifstream(path).good(), "--model ", o.model, ": no config.json there");
    card = card_from_config(read_json(path, "--model"), o.model);
  }
  SystemSpec s;
  s.b_pcie = o.b_pcie;
  s.b_net = o.b_net;
  s.act_bytes = o.act_bytes;
  s.pcie_latency_s = o.pcie_latency_us * 1e-6;
  s.net_latency_s = o.net_latency_us * 1e-6;
  s.peak_flops = o.peak_tflops * 1e12;
  s.hbm_bytes_s = o.hbm_gbps * 1e9;

  // The measured N_ue: distinct experts per layer among the trace's first N_t routed tokens.
  std::vector<double> measured(o.tokens.size(), -1);
  if (!o.trace.empty()) {
    int k = 0;
    const std::vector<std::vector<int>> ids = trace_ids(o.trace, card, k);
    require(k == card.top_k, "--trace ", o.trace, ": routes top-", k, " but the model's top-k is ", card.top_k);
    std::size_t rows = ids[0].size() / std::size_t(k);
    for (const auto& l : ids) rows = std::min(rows, l.size() / std::size_t(k));
    for (std::size_t i = 0; i < o.tokens.size(); ++i)
      if (o.tokens[i] <= double(rows)) measured[i] = measured_used_experts(ids, k, int(o.tokens[i]));
    std::printf("trace %s: %zu routed tokens per layer (N_t above that has no measured N_ue)\n", o.trace.c_str(), rows);
  }
  const nlohmann::json j = gamma_table(card, s, o.tokens, measured);
  if (!o.json.empty()) write_json(o.json, {{"chapter", "07_offload_vs_ep"}, {"result", j}});
  std::printf("CHECK PASS 07_offload_vs_ep: %s, %zu token counts\n", card.name.c_str(), o.tokens.size());
  return 0;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::run_main([&] { return eplab::run(argc, argv); });
}
