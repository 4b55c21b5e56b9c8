// What every panel draws: one layer's routing of one batch of tokens, from the live prompt or a trace line.
// A trace line's fields (common/moe/routing_trace.hpp: tokens, pieces, routing, probs, the run's expert map
// and EP size) plus what only live routing knows.
#pragma once
#include <string>
#include <vector>

#include "moe/routing_trace.hpp"

namespace eplab::viz {

struct RoutingFrame : TraceRecord {
  // probs (TraceRecord): [T, E] softmax of the router logits for live routing; in a trace only when it
  // carries them. pieces: always [T] here (the trace reader fills "#id" where a trace has none).
  std::vector<float> logits;         // [T, E] router logits (live routing only; empty for traces)
  std::string computed_on;           // live routing: "GPU" or "CPU"; empty for traces
};

}  // namespace eplab::viz
