// Live routing of a prompt on the CPU, with the project's own code: Checkpoint for the weights,
// router_logits_cpu + route (common/moe/routing.hpp) for the choices.
//
// The layer input is a STAND-IN until chapter 05's trace is loaded: each token's row of embed_tokens,
// rescaled to unit RMS (what the pre-norm LayerNorm would hand the block, without attention or the
// earlier layers). So the live routing shows the router at work on plausible inputs, not the real
// model's routing of this prompt; the trace (--trace) shows that.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "routing_frame.hpp"
#include "util/bf16.hpp"

namespace eplab::viz {

class LiveRouter {
 public:
  // Opens the checkpoint (throws eplab::Error naming the directory when it is missing or broken).
  explicit LiveRouter(const std::string& model_dir);
  const ModelConfig& config() const { return ckpt_.config(); }
  const std::string& dir() const { return ckpt_.dir(); }
  // Throws when `layer` is out of range or a tensor is missing / has the wrong shape.
  RoutingFrame route_prompt(const std::string& prompt, int layer);

 private:
  const std::vector<float>& gate(int layer);
  Checkpoint ckpt_;
  std::vector<bf16_bits> embed_;              // [V, H], read on first use (bf16 keeps it half the size)
  std::map<int, std::vector<float>> gates_;   // layer -> [E, H]
};

}  // namespace eplab::viz
