#include "routing_cli.hpp"

#include <algorithm>
#include <cstdio>

#include "live_router.hpp"
#include "moe/layer_check.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

namespace eplab::viz {

void add_routing_flags(CLI::App& app, RoutingFlags& f) {
  f.model = default_model_dir();
  app.add_option("--model", f.model, "checkpoint directory (HF format)")->capture_default_str();
  app.add_option("--prompt", f.prompt, "prompt routed live (tokenized by the model's tokenizer.json, else a stand-in)");
  app.add_option("--layer", f.layer, "MoE layer to show")->capture_default_str();
  app.add_option("--device", f.device, "where live routing runs: auto (the GPU when one works), gpu, cpu")
      ->check(CLI::IsMember({"auto", "gpu", "cpu"}))
      ->capture_default_str();
}

int print_routing(const RoutingFlags& f, const DeviceChoice& dev) {
  require(f.layer >= 0, "--layer must be >= 0");
  LiveRouter router(f.model, dev);
  const RoutingFrame fr = router.route_prompt(f.prompt, f.layer);
  const ModelConfig& c = router.config();
  float margin = 1e30f;
  for (int t = 0; t < fr.T(); ++t)
    margin = std::min(margin, routing_margin(c.router, fr.logits, t, fr.num_experts, c.router_jitter_noise));
  std::printf("routing on %s\n", router.device_label().c_str());
  std::printf("model %s, %s, layer %d, %d tokens x %d experts, top-%d, smallest routing margin %.2e\n",
              router.dir().c_str(), router.tokenizer_label().c_str(), fr.layer, fr.T(), fr.num_experts, fr.routing.k,
              fr.T() ? double(margin) : 0.0);
  eplab::print_routing(fr.routing, fr.T());
  return 0;
}

}  // namespace eplab::viz
