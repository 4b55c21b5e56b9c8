// Routing: router logits [T, E] -> for each token, k expert ids and k multipliers.
//
// Two routers:
//  * softmax-top-k (Mixtral): p = softmax(logits); keep the k largest; renormalise them to sum to 1.
//  * sparsemixer (PhiMoE, inference path, k = 2), as transformers' `phimoe` computes it:
//      e1 = argmax(s).  Mask every j with (s[e1] - s[j]) / max(|s[j]|, s[e1]) > 2*eps  (eps = jitter_eps).
//      w1 = softmax over the unmasked logits, taken at e1.
//      s' = s with s'[e1] = -inf.  e2 = argmax(s').
//      Mask every j with (s'[e2] - s[j]) / max(|s[j]|, s'[e2]) > 2*eps (note: factor uses the original s).
//      w2 = softmax over the unmasked entries of s', taken at e2.
//    w1 + w2 is NOT 1 in general: each multiplier is its own masked softmax.
// Ties pick the lowest expert id (torch.max does the same on CPU and CUDA).
#pragma once
#include <span>
#include <vector>

#include "model/config.hpp"

namespace eplab {

struct Routing {
  int tokens = 0, k = 0;
  std::vector<int> ids;        // [T, k] expert id of each token's j-th choice
  std::vector<float> weights;  // [T, k] multiplier applied to that expert's output
  int id(int t, int j) const { return ids[size_t(t) * k + j]; }
  float weight(int t, int j) const { return weights[size_t(t) * k + j]; }
};

// logits = x @ gate^T, fp32. x: [T, H], gate: [E, H] (row-major, as stored on disk).
void router_logits_cpu(std::span<const float> x, std::span<const float> gate, int T, int H, int E,
                       std::span<float> logits);

Routing route_softmax_topk(std::span<const float> logits, int T, int E, int k);
Routing route_sparsemixer(std::span<const float> logits, int T, int E, float jitter_eps);
// A layer's router: the rule, experts per token, and sparsemixer's jitter epsilon (the model config's fields).
struct RouterCfg {
  RouterKind kind = RouterKind::SparseMixer;
  int top_k = 2;
  float jitter_eps = 0.01f;
};

Routing route(RouterKind kind, std::span<const float> logits, int T, int E, int k, float jitter_eps);

// The smallest gap, over all tokens, between a logit that decided a choice and its nearest competitor,
// relative to the logits' scale. Tests use it to tell a real routing bug from a near-tie that fp32
// summation order can flip between two correct implementations.
float routing_margin(RouterKind kind, std::span<const float> logits, int t, int E, float jitter_eps);

}  // namespace eplab
