#include "memory_view.hpp"

#include "moe/cost_model.hpp"

namespace eplab::viz {

std::vector<MemoryBar> memory_bars(const ModelConfig& c, const MemoryWorkload& w) {
  std::vector<MemoryBar> out;
  for (int n = 1; n <= c.num_local_experts; n *= 2) {
    const EpMemory m = ep_memory(c, n);
    MemoryBar b;
    b.ep_size = n;
    b.experts_per_gpu = m.experts_per_gpu_max;
    b.replicated = m.replicated_bytes;
    b.experts = m.expert_bytes_per_gpu;
    const double seqs = double((w.batch + n - 1) / n);
    const double tok = seqs * w.seq_len;
    b.kv_cache = tok * c.num_hidden_layers * 2.0 * c.num_key_value_heads * c.head_dim * 2.0;
    const double H = c.hidden_size, I = c.intermediate_size, k = c.num_experts_per_tok;
    b.buffers = tok * (4 * H + 2 * k * I) * 2.0 + tok * k * H * 2.0 * 2.0;
    out.push_back(b);
  }
  return out;
}

}  // namespace eplab::viz
