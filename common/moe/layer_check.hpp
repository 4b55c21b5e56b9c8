// What chapters 01-04 share around one MoE layer: test inputs, the routing printout, and the check of an
// implementation's output against the CPU reference.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moe/reference.hpp"

namespace eplab {

// T x H activations ~ N(0, 1), stored as bf16 (the layer's input after LayerNorm is O(1) per element).
std::vector<bf16_bits> random_activations(int T, int H, std::uint64_t seed);

// "token 0 → experts [3, 7] weights [0.61, 0.27]" for the first `max_tokens` tokens.
void print_routing(const Routing& r, int max_tokens);

struct LayerCheck {
  int tokens = 0;
  int id_mismatches = 0;  // tokens whose expert ids differ from the reference beyond a near-tie
  int near_ties = 0;      // tokens whose ids differ but whose reference logits are within a near-tie
  double weight_max_err = 0;  // max |w - w_ref| over tokens with matching ids
  double rel_l2 = 0;      // ||y - y_ref|| / ||y_ref|| over tokens with matching ids
  double tolerance = 0;
  bool pass = false;
  std::string summary() const;  // one line, e.g. "ids match on 64/64 tokens, rel-L2 2.1e-03 <= 1.0e-02"
};

// Compares routing and output with the reference. Tokens whose ids differ only because two logits are
// closer than fp32 summation order can resolve (routing_margin < 1e-5) are counted as near-ties and left
// out of the output comparison; more than 1% of them (or any real mismatch) fails.
LayerCheck check_layer(const MoeRefResult& ref, const Routing& routing, std::span<const float> y, int H,
                       RouterKind router, float jitter_eps, double tolerance);

}  // namespace eplab
