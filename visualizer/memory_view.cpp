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
    const EpWorkloadMemory wm = ep_workload_memory(c, n, w.batch, w.seq_len);
    b.kv_cache = wm.kv_cache_bytes;
    b.buffers = wm.buffers_bytes();
    out.push_back(b);
  }
  return out;
}

}  // namespace eplab::viz
