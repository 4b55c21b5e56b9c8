// Chapter 03's flags: the common and layer ones, how many devices and which placement map, --bench.
#pragma once
#include <optional>
#include <vector>

#include "device.hpp"
#include "moe/layer_problem.hpp"
#include "moe/placement.hpp"
#include "util/cli.hpp"

namespace eplab::ch03 {

struct Options {
  CommonOptions common;
  LayerOptions layer;
  int gpus = 0;  // devices to place the experts on; 0 = not given (every GPU; on the CPU 4 simulated)
  PlacementKind placement = PlacementKind::Linear;
  int iters = 5;  // timed runs; the split printed is their median
  bool bench = false;
  std::vector<int> bench_tokens{128, 1024, 4096, 16384};
  bool share_gpu = false;  // every device on GPU 0: the multi-GPU code path on a one-GPU machine
};

// Parses and range-checks argv. Returns an exit code when the program should stop now (0 after --help).
std::optional<int> parse_options(int argc, char** argv, Options& opt);

// The checks that need to know the machine: --gpus against the GPUs present, --share-gpu needs one.
void check_devices(const Options& opt, const DeviceChoice& dev);

}  // namespace eplab::ch03
