// Memory per GPU for each EP size, as stacked parts. The weights come from the project's cost model
// (common/moe/cost_model.hpp, ep_memory: what chapter 00 prints). The cost model covers weights only, so
// the other two parts are estimated here, and labelled as estimates in the panel and the README:
//
//   KV cache     each GPU serves ceil(batch / N) of the sequences (attention is data-parallel under EP,
//                as in chapter 04 every rank holds its own tokens):
//                  seqs_per_gpu * seq_len * layers * 2 (K and V) * kv_heads * head_dim * 2 bytes (bf16)
//   buffers      activations and all-to-all buffers for one prefill step of those tokens (tok = seqs * len):
//                  activations  tok * (4 H + 2 k I) * 2 bytes   residual, normed input, attention out,
//                                                               MoE out; SwiGLU w1/w3 outputs for k experts
//                  dispatch     tok * k * H * 2 bytes * 2       send and receive buffers (combine reuses them)
#pragma once
#include <string>
#include <vector>

#include "model/config.hpp"

namespace eplab::viz {

struct MemoryBar {
  int ep_size = 1;
  int experts_per_gpu = 0;  // busiest GPU, per layer
  double replicated = 0, experts = 0, kv_cache = 0, buffers = 0;  // bytes on the busiest GPU
  double total() const { return replicated + experts + kv_cache + buffers; }
};

struct MemoryWorkload {
  int batch = 8;       // sequences in flight (whole deployment)
  int seq_len = 2048;  // tokens per sequence
};

// One bar per EP size in {1, 2, 4, 8, 16, ...} up to the number of experts.
std::vector<MemoryBar> memory_bars(const ModelConfig& c, const MemoryWorkload& w);

}  // namespace eplab::viz
