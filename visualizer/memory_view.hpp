// Memory per GPU for each EP size, as stacked parts, all from the project's cost model
// (common/moe/cost_model.hpp): the weights from ep_memory (exact: what chapter 00 prints), the KV cache,
// activations and all-to-all buffers from ep_workload_memory (estimates, labelled "est." in the panel;
// the formulas are documented there). bf16 throughout.
#pragma once
#include <string>
#include <vector>

#include "model/config.hpp"

namespace eplab::viz {

struct MemoryBar {
  int ep_size = 1;
  int experts_per_gpu = 0;  // busiest GPU, per layer
  double replicated = 0, experts = 0, kv_cache = 0, buffers = 0;  // bytes on the busiest GPU
  double total() const { return replicated + experts + kv_cache + buffers; }
};

struct MemoryWorkload {
  int batch = 8;       // sequences in flight (whole deployment)
  int seq_len = 2048;  // tokens per sequence
};

// One bar per EP size in {1, 2, 4, 8, 16, ...} up to the number of experts.
std::vector<MemoryBar> memory_bars(const ModelConfig& c, const MemoryWorkload& w);

}  // namespace eplab::viz
