// Chapter 02's benchmark: the grouped layer against the naive one, the measured ceilings and a peer.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace eplab {

struct BenchOptions {
  std::vector<int> tokens{1, 8, 64, 512, 4096, 16384};
  int hidden = 4096, inter = 448, experts = 16, top_k = 2;  // Phi-tiny-MoE's layer shape
  std::string peer_json;  // output of scripts/hf_moe_bench.py --json, shown side by side
  unsigned long long seed = 1;
  std::string flush = "write";  // L2 flush before each timed forward: write (memset) or read (see bench.cpp)
  std::string split = "both";   // per-stage split: eager, queued or both (see bench.cpp)
  double spin_us = 300;         // queued split: GPU busy-wait in front of each queued stretch
  // Expert strategies to compare on the whole layer at every T with more than small_rows_max rows
  // (interleaved forwards, same inputs; e.g. cublas-streams, cublas-padded). Empty: no comparison table.
  std::vector<std::string> experts_variants;
};

// GPU benchmark (random weights of the given shape, generated on the GPU). Returns the table as JSON.
nlohmann::json run_gpu_bench(const BenchOptions& opt);

}  // namespace eplab
