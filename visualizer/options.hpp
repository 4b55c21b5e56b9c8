// The visualizer's command line.
#pragma once
#include <optional>
#include <string>

#include "routing_cli.hpp"

namespace eplab::viz {

// --model, --prompt, --layer, --device come from RoutingFlags (shared with the headless viz_routing).
struct Options : RoutingFlags {
  std::string trace;          // JSON-lines routing trace to follow (README: "Trace format")
  int ep_size = 4;
  std::string placement = "linear";  // linear | round-robin | trace
  int gpus_per_node = 0;             // 0: all GPUs in one node
  int batch = 8, seq_len = 2048;     // memory panel workload
  std::string screenshot;            // write a PNG after --frames frames, then exit
  int frames = 3;
  int width = 1600, height = 1000;
  bool print_routing = false;        // no window: print the live routing of --prompt at --layer, exit
};

// Returns an exit code when the program should stop now (after --help); throws eplab::Error on bad flags.
std::optional<int> parse_options(int argc, char** argv, Options& o);

}  // namespace eplab::viz
