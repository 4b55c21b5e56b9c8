// The load of a real run: chapter 05's --trace (one JSON line per step and layer) summed into tokens per
// (layer, expert), and what EPLB would make of it on G GPUs. Host only: no model, no EP run.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace eplab {

struct TraceLoad {
  int layers = 0, experts = 0, steps = 0, ep_size = 0;  // ep_size: the traced run's ranks (0: not given)
  std::vector<std::vector<double>> tokens;              // [L][E] rows routed to each expert, over every step
};

// Throws eplab::Error (one line, naming the file and line) for a missing file or a bad line.
TraceLoad read_trace_load(const std::string& path);

// Per layer: max/mean tokens per GPU with the experts in linear blocks, and after EPLB with `slots` slots
// (groups/nodes as rebalance_experts). Prints the table; returns the JSON of it.
nlohmann::json report_trace_balance(const TraceLoad& load, int gpus, int slots, int groups, int nodes);

}  // namespace eplab
