// The live-routing flags and `--print-routing`, shared by the app (`visualizer --print-routing`) and the
// headless `viz_routing` (no GL, no window: what the GPU machine runs). One implementation for both, so the
// GPU test that runs viz_routing checks the very code the app's --print-routing runs.
#pragma once
#include <CLI/CLI.hpp>

#include <string>

#include "device.hpp"

namespace eplab::viz {

struct RoutingFlags {
  std::string model;           // default: default_model_dir() (set by add_routing_flags)
  std::string prompt = "Expert parallelism sends every token to the GPU that holds its experts.";
  int layer = 0;
  std::string device = "auto";  // auto | gpu | cpu: where live routing runs (kernels/device.hpp)
};

// Adds --model, --prompt, --layer, --device (and sets the default model directory).
void add_routing_flags(CLI::App& app, RoutingFlags& f);

// Prints the live routing of f.prompt at f.layer on `dev` and returns 0:
//   routing on <device label>
//   model <dir>, <tokenizer label>, layer L, T tokens x E experts, top-k, smallest routing margin m
//   token i <piece> → experts [a, b] weights [x, y]      (one line per token, eplab::print_routing)
// The margin tells a CPU/GPU difference on a near-tie from a routing bug. Throws eplab::Error on a bad
// model or layer.
int print_routing(const RoutingFlags& f, const DeviceChoice& dev);

}  // namespace eplab::viz
