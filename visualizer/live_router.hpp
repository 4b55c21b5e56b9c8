// Live routing of a prompt with the project's own code: Checkpoint for the weights, then either the GPU
// kernels (router_logits + route_topk, gpu_router.hpp) or the CPU reference (router_logits_cpu + route,
// common/moe/routing.hpp), chosen once by --device (kernels/device.hpp choose_device).
//
// Both backends get the same bf16 layer input x [T, H] and the same bf16 gate [E, H] (the checkpoint's
// bits), so they differ only in fp32 summation order inside the logits GEMM: expert ids agree except on
// near-ties, multipliers to ~1e-6.
//
// Tokens: the model directory's tokenizer.json (common/model/tokenizer: the ids and pieces chapter 05 gives
// the same prompt, BOS first) when it has one; otherwise the stand-in of stand_in_tokens.hpp, labelled so.
// The layer input is a STAND-IN either way: each token's row of embed_tokens, rescaled to unit RMS (what
// the pre-norm LayerNorm would hand the block, without attention or the earlier layers). So the live
// routing shows the router at work on plausible inputs, not the real model's routing of this prompt;
// chapter 05's trace (--trace) shows that.
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "device.hpp"
#include "gpu_router.hpp"
#include "model/checkpoint.hpp"
#include "model/tokenizer.hpp"
#include "routing_frame.hpp"
#include "util/bf16.hpp"

namespace eplab::viz {

class LiveRouter {
 public:
  // Opens the checkpoint and its tokenizer.json if there is one (throws eplab::Error naming the file when
  // either is missing or broken, or when the tokenizer has more ids than the model's vocabulary).
  // dev.backend == Backend::Gpu routes on GPU dev.gpu (throws when it cannot be set up).
  explicit LiveRouter(const std::string& model_dir, const DeviceChoice& dev = DeviceChoice{});
  ~LiveRouter();
  bool on_gpu() const { return gpu_ != nullptr; }
  // "GPU: NVIDIA H100 ... (kernels/router.cuh + routing.cuh)" or "CPU: ... (common/moe/routing)".
  const std::string& device_label() const { return device_label_; }
  const ModelConfig& config() const { return ckpt_.config(); }
  const std::string& dir() const { return ckpt_.dir(); }
  // "tokenizer.json (N ids)" or "stand-in tokenizer (no tokenizer.json)".
  const std::string& tokenizer_label() const { return tokenizer_label_; }
  bool has_tokenizer() const { return tok_.has_value(); }
  // Throws when `layer` is out of range or a tensor is missing / has the wrong shape.
  RoutingFrame route_prompt(const std::string& prompt, int layer);

 private:
  const std::vector<bf16_bits>& gate(int layer);
  Checkpoint ckpt_;
  std::unique_ptr<GpuRouter> gpu_;            // null: CPU
  std::string device_label_;
  std::optional<Tokenizer> tok_;              // empty: the stand-in
  std::string tokenizer_label_;
  std::vector<bf16_bits> embed_;              // [V, H], read on first use (bf16 keeps it half the size)
  std::map<int, std::vector<bf16_bits>> gates_;  // layer -> [E, H], the checkpoint's bf16
};

}  // namespace eplab::viz
