// Routing that is not uniform, on purpose: the tokens of the load-balancing lesson. Random activations route
// about evenly over the experts; real traffic does not (a few experts take far more tokens than others). Here
// each token may be pushed towards one of a few "hot" experts by adding the direction that raises that expert's
// logit against the others.
#pragma once
#include <cstdint>
#include <vector>

#include "model/checkpoint.hpp"

namespace eplab {

struct Skew {
  std::vector<int> hot;  // the hot experts (empty: no skew)
  double strength = 0;   // 0: plain random activations; ~0.5: the hot experts take most first choices
  double share = 0.7;    // fraction of tokens that are pushed (each towards hot[i] with probability ∝ 1/(i+1))
};

// `count` distinct experts of `experts`, chosen by the seed (what --hot K picks).
std::vector<int> pick_hot_experts(int experts, int count, std::uint64_t seed);

// T tokens [T, H] (bf16) for one rank and step: random_activations(T, H, seed) plus, for a pushed token,
// strength * sqrt(H) * (the unit direction of gate row h minus the mean gate row). seed should differ per
// (step, rank).
std::vector<bf16_bits> skewed_tokens(const MoeLayerWeights& layer, int T, std::uint64_t seed, const Skew& skew);

}  // namespace eplab
