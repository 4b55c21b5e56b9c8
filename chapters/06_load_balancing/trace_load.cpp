#include "trace_load.hpp"

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "moe/eplb.hpp"
#include "moe/routing_trace.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

TraceLoad read_trace_load(const std::string& path) {
  TraceLoad load;
  int last_step = -1;
  read_trace_file(path, "--trace", [&](const TraceRecord& r, int lineno) {
    if (r.T() == 0) return;  // a step with no tokens: no load, and maybe no expert count to check
    if (load.experts == 0) load.experts = r.num_experts;
    require(r.num_experts == load.experts, "--trace ", path, " line ", lineno, ": ", r.num_experts,
            " experts, earlier lines ", load.experts);
    load.ep_size = std::max(load.ep_size, r.ep_size);
    if (r.layer >= load.layers) {
      load.layers = r.layer + 1;
      load.tokens.resize(std::size_t(load.layers), std::vector<double>(std::size_t(load.experts), 0.0));
    }
    for (int id : r.routing.ids)
      if (id >= 0 && id < load.experts) load.tokens[std::size_t(r.layer)][std::size_t(id)] += 1;
    if (r.step != last_step) ++load.steps, last_step = r.step;
  });
  require(load.layers > 0 && load.experts > 0, "--trace ", path, ": no routing in the file");
  return load;
}

nlohmann::json report_trace_balance(const TraceLoad& load, int gpus, int slots, int groups, int nodes) {
  const int E = load.experts;
  const EplbPlan plan = rebalance_experts(load.tokens, slots, groups, nodes, gpus);
  std::vector<int> linear(E);  // the plain map needs E % gpus == 0 here: every GPU E / gpus experts
  std::iota(linear.begin(), linear.end(), 0);
  Table t({"layer", "tokens", "hottest expert", "share", "max/mean before", "after EPLB", "replicas of hottest"});
  nlohmann::json rows = nlohmann::json::array();
  double sum_before = 0, sum_after = 0;
  for (int l = 0; l < load.layers; ++l) {
    const std::vector<double>& w = load.tokens[std::size_t(l)];
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    const int hot = int(std::max_element(w.begin(), w.end()) - w.begin());
    const double before = imbalance(gpu_load(w, linear, gpus)), after = imbalance(gpu_load(w, plan.phy2log[l], gpus));
    sum_before += before;
    sum_after += after;
    t.add_row({std::to_string(l), strf("%.0f", total), std::to_string(hot),
               strf("%.1f%%", total > 0 ? 100.0 * w[std::size_t(hot)] / total : 0.0), strf("%.2f", before),
               strf("%.2f", after), std::to_string(plan.logcnt[l][std::size_t(hot)])});
    rows.push_back({{"layer", l}, {"tokens", w}, {"imbalance_before", before}, {"imbalance_after", after},
                    {"phy2log", plan.phy2log[l]}});
  }
  std::printf("\nload from the trace: %d steps, %d layers, %d experts; %d GPUs, %d slots (%d redundant)\n%s",
              load.steps, load.layers, E, gpus, slots, slots - E, t.str().c_str());
  std::printf("mean over layers of max/mean tokens per GPU: %.2f before, %.2f after EPLB\n", sum_before / load.layers,
              sum_after / load.layers);
  return {{"steps", load.steps}, {"layers", rows}, {"gpus", gpus}, {"slots", slots},
          {"imbalance_before_mean", sum_before / load.layers}, {"imbalance_after_mean", sum_after / load.layers}};
}

}  // namespace eplab
