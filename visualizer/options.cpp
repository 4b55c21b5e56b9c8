#include "options.hpp"

#include <cctype>
#include <string>

#include "util/check.hpp"
#include "util/cli.hpp"

namespace eplab::viz {

std::optional<int> parse_options(int argc, char** argv, Options& o) {
  CLI::App app{"EP Lab visualizer: token-to-expert routing, per-GPU load, all-to-all traffic and memory per EP size"};
  add_routing_flags(app, o);  // --model, --prompt, --layer, --device
  app.add_option("--trace", o.trace, "routing trace (JSON lines) to follow as it grows, e.g. chapter 05's");
  app.add_option("--ep-size", o.ep_size, "number of GPUs the experts are split over")->capture_default_str();
  app.add_option("--placement", o.placement, "expert map: linear, round-robin, or trace (the trace's own)")
      ->check(CLI::IsMember({"linear", "round-robin", "trace"}))
      ->capture_default_str();
  app.add_option("--gpus-per-node", o.gpus_per_node, "GPUs per node for the intra/inter-node split (0: one node)")
      ->capture_default_str();
  app.add_option("--batch", o.batch, "memory panel: sequences in flight")->capture_default_str();
  app.add_option("--seq-len", o.seq_len, "memory panel: tokens per sequence")->capture_default_str();
  app.add_option("--screenshot", o.screenshot, "render --frames frames, write this PNG, exit (non-zero on any error)");
  app.add_option("--frames", o.frames, "frames to render before the screenshot")->capture_default_str();
  app.add_option("--width", o.width, "window width in pixels")->capture_default_str();
  app.add_option("--height", o.height, "window height in pixels")->capture_default_str();
  app.add_flag("--print-routing", o.print_routing,
               "no window: print the live routing of --prompt at --layer (token i -> experts, weights), exit 0");
  if (auto rc = parse_cli(app, argc, argv)) return rc;
  require(o.layer >= 0, "--layer must be >= 0");
  require(o.ep_size >= 1, "--ep-size must be >= 1");
  require(o.gpus_per_node >= 0, "--gpus-per-node must be >= 0");
  require(o.batch >= 1 && o.seq_len >= 1, "--batch and --seq-len must be >= 1");
  require(o.frames >= 1, "--frames must be >= 1");
  require(o.width >= 320 && o.height >= 240 && o.width <= 8192 && o.height <= 8192,
          "--width/--height must be 320x240 .. 8192x8192");
  require(o.placement != "trace" || !o.trace.empty(), "--placement trace needs --trace FILE");
  // the screenshot is always PNG bytes: a .jpg name would give a file no viewer reads as its name says
  std::string ext = o.screenshot.size() >= 4 ? o.screenshot.substr(o.screenshot.size() - 4) : "";
  for (char& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
  require(o.screenshot.empty() || ext == ".png", "--screenshot ", o.screenshot,
          ": the file is written as PNG, so give it a .png name");
  return std::nullopt;
}

}  // namespace eplab::viz
