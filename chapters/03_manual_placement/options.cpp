#include "options.hpp"

#include <string>

#include "util/check.hpp"

namespace eplab::ch03 {

std::optional<int> parse_options(int argc, char** argv, Options& opt) {
  CLI::App app{"Chapter 03: experts placed by hand on several GPUs in one process; GPU 0 routes and combines"};
  std::string placement = "linear";
  add_common_options(app, opt.common);
  add_layer_options(app, opt.layer);
  app.add_option("--gpus", opt.gpus, "devices to place the experts on (default: every GPU; on the CPU: 4 simulated)");
  app.add_option("--placement", placement, "expert -> device map: linear or round-robin")
      ->check(CLI::IsMember({"linear", "round-robin"}))
      ->capture_default_str();
  app.add_option("--iters", opt.iters, "timed runs (the time split is their median)")->capture_default_str();
  app.add_flag("--bench", opt.bench, "GPU: time the hub at Phi-tiny-MoE's layer shape for several token counts");
  app.add_option("--bench-tokens", opt.bench_tokens, "token counts for --bench");
  app.add_flag("--share-gpu", opt.share_gpu,
               "GPU: put all --gpus N devices on GPU 0 (runs the multi-GPU code path on one GPU; times meaningless)");
  if (auto rc = parse_cli(app, argc, argv)) return rc;
  // 0 stays "not given" below, so a given 0 must be refused here.
  require(!app.count("--gpus") || opt.gpus >= 1, "--gpus must be >= 1, got ", opt.gpus);
  require(opt.iters >= 1, "--iters must be >= 1, got ", opt.iters);
  opt.placement = parse_placement(placement);
  return std::nullopt;
}

void check_devices(const Options& opt, const DeviceChoice& dev) {
  const bool on_gpu = dev.backend == Backend::Gpu;
  require(!on_gpu || opt.share_gpu || opt.gpus <= dev.gpu_count, "--gpus ", opt.gpus, ": only ", dev.gpu_count,
          " GPU(s) present; use --gpus ", dev.gpu_count, " or fewer, or --device cpu to simulate ", opt.gpus,
          " devices");
  require(!opt.share_gpu || on_gpu, "--share-gpu needs a GPU (on the CPU every device is simulated anyway)");
}

}  // namespace eplab::ch03
