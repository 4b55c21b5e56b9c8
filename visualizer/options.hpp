// The visualizer's command line.
#pragma once
#include <optional>
#include <string>

namespace eplab::viz {

struct Options {
  std::string model;          // default: default_model_dir() (common/util/cli.hpp)
  std::string trace;          // JSON-lines routing trace to follow (README: "Trace format")
  std::string prompt = "Expert parallelism sends every token to the GPU that holds its experts.";
  int layer = 0;
  int ep_size = 4;
  std::string placement = "linear";  // linear | round-robin | trace
  int gpus_per_node = 0;             // 0: all GPUs in one node
  int batch = 8, seq_len = 2048;     // memory panel workload
  std::string screenshot;            // write a PNG after --frames frames, then exit
  int frames = 3;
  int width = 1600, height = 1000;
  std::string device = "auto";       // auto | gpu | cpu: where live routing runs (kernels/device.hpp)
  bool print_routing = false;        // no window: print the live routing of --prompt at --layer, exit
};

// Returns an exit code when the program should stop now (after --help); throws eplab::Error on bad flags.
std::optional<int> parse_options(int argc, char** argv, Options& o);

}  // namespace eplab::viz
