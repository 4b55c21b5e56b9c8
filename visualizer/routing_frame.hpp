// What every panel draws: one layer's routing of one batch of tokens, from the live prompt or a trace line.
#pragma once
#include <string>
#include <vector>

#include "moe/routing.hpp"

namespace eplab::viz {

struct RoutingFrame {
  int step = 0;          // trace step (0 for the live prompt)
  int layer = 0;
  int num_experts = 0;
  int hidden = 0;        // bytes on the wire per dispatched row = hidden * 2 (bf16)
  std::vector<int> tokens;           // token ids
  std::vector<std::string> pieces;   // their text pieces
  Routing routing;                   // [T, k] expert ids and multipliers (common/moe/routing.hpp)
  std::vector<float> probs;          // [T, E] softmax of the router logits; empty when unknown (traces)
  std::vector<float> logits;         // [T, E] router logits (live routing only; empty for traces)
  std::string computed_on;           // live routing: "GPU" or "CPU"; empty for traces
  // From a trace: the run's own expert map and EP size (empty / 0 when the line does not say).
  std::vector<int> rank_of_expert;
  int ep_size = 0;
  std::vector<int> rank_of_token;    // source rank of each token; empty = contiguous blocks (see README)
  int T() const { return routing.tokens; }
};

}  // namespace eplab::viz
