#include "balance_run.hpp"

#include <algorithm>

#include "ep_layer.hpp"
#include "ep_stats.hpp"

namespace eplab {

PhaseResult run_phase(dist::Communicator& comm, bool gpu, const Placement& placement, const MoeLayerWeights& mine,
                      const RouterCfg& router, const std::vector<std::vector<bf16_bits>>& x_steps, int T, int iters) {
  const int N = comm.size(), rank = comm.rank(), E = mine.num_experts, H = mine.hidden;
  PhaseResult out;
  out.expert_tokens.assign(E, 0.0);
  out.rank_rows.assign(N, 0.0);
  for (const std::vector<bf16_bits>& x : x_steps) {
    std::unique_ptr<EpLayer> layer;
    dist::all_or_none(comm, [&] {
      layer = gpu ? make_gpu_ep_layer(comm, placement, mine, x, T, router, EpLayout::InPlace)
                  : make_cpu_ep_layer(comm, placement, mine, x, T, router, EpLayout::Permute);
    });
    layer->forward();  // warm-up; the timed forwards below end with the one whose results are read
    const StageStats st = time_forwards(*layer, comm, iters);
    out.experts_ms += st.experts_ms;
    out.total_ms += st.total_ms;

    // rows each rank computed: what it received (its own rows included)
    const std::vector<int> recv = comm.allgather_int(std::vector<int>{layer->plan().recv_rows()});
    for (int r = 0; r < N; ++r) out.rank_rows[r] += recv[r];
    // tokens per logical expert: every rank counts its own routing, then one sum per expert
    const Routing mine_r = layer->routing();
    std::vector<int> counts(E, 0);
    for (int id : mine_r.ids)
      if (id >= 0 && id < E) ++counts[id];
    const std::vector<int> all = comm.allgather_int(counts);
    for (int r = 0; r < N; ++r)
      for (int e = 0; e < E; ++e) out.expert_tokens[e] += all[std::size_t(r) * E + e];

    const Routing r_all = gather_routing(comm, mine_r);
    const std::vector<float> y = layer->output();
    std::vector<float> y_all(rank == 0 ? std::size_t(N) * T * H : 0);
    comm.gather(y.data(), y.size() * sizeof(float), y_all.data(), 0);
    if (rank == 0) {
      out.y.push_back(std::move(y_all));
      out.routing.push_back(r_all);
    }
  }
  return out;
}

}  // namespace eplab
