// One MoE layer as a self-contained problem: the layer's weights from a checkpoint, the router to use,
// and seeded input activations. Chapters 01-04 start from this so each shows only its own idea.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "moe/routing.hpp"

namespace eplab {

struct LayerOptions {
  int tokens = 64;
  int layer = 0;
  std::string router = "auto";  // auto (the model's own: sparsemixer for PhiMoE) | sparsemixer | softmax
  int top_k = 0;                // 0 = the model's num_experts_per_tok
  int show = 4;                 // tokens whose routing is printed
};
void add_layer_options(CLI::App& app, LayerOptions& opt);

struct LayerProblem {
  MoeLayerWeights weights;
  RouterKind router = RouterKind::SparseMixer;
  int top_k = 2;
  float jitter_eps = 0.01f;
  int tokens = 0;
  std::vector<bf16_bits> x_bf16;  // [T, H] the input as the GPU gets it
  std::vector<float> x;           // the same values widened (exactly representable)
};

// The router on the CPU for this problem's input: logits = x gate^T (fp32), then the problem's router.
Routing route_on_cpu(const LayerProblem& p);

// Validates the options against the checkpoint (layer in range, T >= 0, 1 <= top-k <= experts,
// sparsemixer needs k = 2) and loads the listed experts of the layer (empty = all).
LayerProblem make_layer_problem(const Checkpoint& ckpt, const LayerOptions& opt, std::uint64_t seed,
                                const std::vector<int>& experts = {});

}  // namespace eplab
