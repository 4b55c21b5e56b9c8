// Chapter 06: load balancing. Expert parallelism is only as fast as its busiest GPU, and real routing is
// skewed: a few experts take far more tokens than the rest, so the GPUs that hold them set the pace. The
// fix vLLM and DeepSeek use is EPLB: measure the load of every expert over a window of steps, then choose
// R > E physical expert slots (replicas of the hot experts) and pack them onto the GPUs so that every GPU
// gets about the same number of tokens. A replica is a copy, so the answer does not change; only where the
// rows go does.
//
//   1. measure   chapter 04's EP layer on skewed tokens (skewed_tokens.hpp), W steps: tokens per expert
//   2. balance   rebalance_experts (common/moe/eplb.hpp): phy2log, R slots, R / N per rank
//   3. move      the expert weights to the new placement (Placement::from_slots): local copies where a rank
//                already holds an expert, peer sends for the rest (weight_move.hpp)
//   4. re-run    the same steps on the new map: each (token, choice) goes to one replica of its expert, by the
//                token's index; the replicas' weights are copies
//   5. compare   rows per rank, max / mean (the busiest rank's slowdown), time of the slowest rank, memory
//
// Check: rank 0 compares every step's output, before and after, with the single-device CPU reference; on the
// CPU the two outputs must also be bit-identical (the replicas do the same arithmetic).
//
// Run: mpirun -np 4 06_load_balancing --device cpu                        laptop: MPI ranks stand in for GPUs
//      mpirun -np 4 06_load_balancing --device cpu --skew 0               uniform routing: little to fix
//      mpirun -np 2 06_load_balancing --device gpu --model data/phi-tiny-moe-instruct --tokens 4096
//      06_load_balancing --trace run.jsonl --gpus 4                      a real run's load (chapter 05 --trace)
#include <algorithm>
#include <cstdio>
#include <optional>

#include "balance_run.hpp"
#include "ep_device.hpp"
#include "moe/eplb.hpp"
#include "moe/layer_check.hpp"
#include "options.hpp"
#include "report.hpp"
#include "skewed_tokens.hpp"
#include "trace_load.hpp"
#include "weight_move.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {
namespace {

// --trace: a real run's load (chapter 05 --trace), planned for every layer on rank 0; no layer is run.
int plan_from_trace(dist::Communicator& mpi, Ep06Options& o) {
  nlohmann::json j;
  dist::all_or_none(mpi, [&] {
    if (mpi.rank() != 0) return;
    const TraceLoad load = read_trace_load(o.trace);
    const int gpus = o.gpus > 0 ? o.gpus : load.ep_size > 1 ? load.ep_size : 4;
    require(load.experts % gpus == 0, "--gpus ", gpus, " must divide the trace's ", load.experts,
            " experts (the 'before' map gives every GPU the same number)");
    const int redundant = o.redundant >= 0 ? o.redundant : gpus, slots = load.experts + redundant;
    require(slots % gpus == 0, load.experts, " experts + --redundant ", redundant, " = ", slots,
            " slots do not split evenly over ", gpus, " GPUs");
    j = report_trace_balance(load, gpus, slots, o.groups, o.nodes);
    j["chapter"] = "06_load_balancing";
    j["trace"] = o.trace;
    if (!o.common.json.empty()) write_json(o.common.json, j);
    std::printf("CHECK PASS 06_load_balancing --trace: %d layers planned\n", int(j["layers"].size()));
  });
  return 0;
}

int run(int argc, char** argv) {
  auto mpi = dist::make_mpi_communicator();
  const int rank = mpi->rank(), N = mpi->size();
  auto say = [&](const std::string& s) {
    if (rank == 0) std::fputs(s.c_str(), stdout);
  };
  Ep06Options o;
  if (auto early = parse_ep06_options(*mpi, argc, argv, o)) return *early;
  if (!o.trace.empty()) return plan_from_trace(*mpi, o);
  if (o.redundant < 0) o.redundant = N;  // default: one replica per rank
  const bool gpu = choose_ep_gpu(*mpi, o.common.device);
  std::unique_ptr<dist::Communicator> nccl;
  if (gpu) nccl = dist::make_nccl_communicator();
  dist::Communicator& comm = gpu ? *nccl : *mpi;
  say(strf("%d rank(s), backend %s: %s\n", N, comm.backend(), comm.describe().c_str()));

  // --- set-up, all or none: the layer (every expert: any rank may hold a replica of any), the skewed tokens
  std::optional<Checkpoint> ckpt;
  LayerProblem p;
  Skew skew;
  std::vector<std::vector<bf16_bits>> x_steps;
  const int T = o.layer.tokens;
  dist::all_or_none(comm, [&] {
    ckpt.emplace(Checkpoint::open(o.common.model));
    LayerOptions lo = o.layer;
    lo.tokens = 0;  // the tokens are made per step below
    p = make_layer_problem(*ckpt, lo, o.common.seed);
    const int E = p.weights.num_experts, S = E + o.redundant;
    require(S % N == 0, E, " experts + --redundant ", o.redundant, " = ", S, " slots do not split evenly over ", N,
            " ranks (try --redundant ", o.redundant + (N - S % N) % N, ")");
    require(E % o.groups == 0, E, " experts do not split into --groups ", o.groups);
    skew.hot = pick_hot_experts(E, o.hot, o.common.seed);
    skew.strength = o.skew;
    for (int s = 0; s < o.steps; ++s)  // a different batch per (step, rank)
      x_steps.push_back(skewed_tokens(p.weights, T, o.common.seed * 1000003ull + std::uint64_t(s) * N + rank, skew));
  });
  const int E = p.weights.num_experts, H = p.weights.hidden, I = p.weights.inter, S = E + o.redundant;
  require_same_on_all_ranks(comm, {{"experts", E}, {"tokens", T}, {"steps", o.steps}, {"redundant", o.redundant},
                                   {"layer", o.layer.layer}, {"seed", std::int64_t(o.common.seed)}});
  const RouterCfg rc{p.router, p.top_k, p.jitter_eps};
  say(strf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d\n", o.common.model.c_str(), o.layer.layer, H, I, E,
           router_name(p.router), p.top_k));
  say(strf("window: %d steps x %d tokens per rank; hot experts %s, skew %.2f\n", o.steps, T,
           join_ints(skew.hot).c_str(), o.skew));

  // --- measure a window, balance on its load, move the weights, run the next window on the new map
  Placement map(parse_placement(o.placement), E, N);
  const Placement before = map;
  MoeLayerWeights mine = weights_for_slots(p.weights, map.experts_of(rank));  // as chapter 04 loads its experts
  std::vector<PhaseResult> win;
  EplbPlan plan;
  for (int w = 0; w < o.windows; ++w) {
    win.push_back(run_phase(comm, gpu, map, mine, rc, x_steps, T, o.iters));
    if (w + 1 == o.windows) break;
    plan = rebalance_experts({win.back().expert_tokens}, S, o.groups, o.nodes, N);  // EPLB, one layer
    const Placement next = Placement::from_slots(plan.phy2log[0], E, N);
    MoveStats mv;
    mine = move_expert_weights(comm, mine, map, next, mv);
    const double move_ms = comm.max(mv.ms), moved = comm.sum(double(mv.received));
    say(strf("window %d: max/mean tokens per rank %.2f; EPLB -> %d slots; weights moved in %.2f ms (slowest rank): "
             "%.0f experts sent between ranks, %s received by this rank\n",
             w, imbalance(win.back().rank_rows), S, move_ms, moved, human_bytes(mv.bytes_received).c_str()));
    map = next;
  }
  const PhaseResult& a = win.front();
  const PhaseResult& b = win.back();
  const Placement& after = map;

  // --- compare the first window with the last, and check every output against the reference
  int pass = 1;
  if (rank == 0) {
    std::fputs(before.str().c_str(), stdout);
    std::fputs(expert_load_table(a.expert_tokens, plan.logcnt[0]).c_str(), stdout);
    std::fputs(after.str().c_str(), stdout);
    const BalanceReport rep = balance_report(a, b, before, after, gpu, 3.0 * I * H * 2);
    std::fputs(rep.text.c_str(), stdout);
    std::vector<float> x_all;
    bool same_bits = true, all_pass = true;
    LayerCheck worst;  // the first failing check, else the one with the largest error
    bool have_worst = false;
    for (int s = 0; s < o.steps; ++s) {
      // rank r's tokens of step s, rebuilt here: the reference runs on all N*T rows at once
      x_all.clear();
      for (int r = 0; r < N; ++r) {
        const auto xr = skewed_tokens(p.weights, T, o.common.seed * 1000003ull + std::uint64_t(s) * N + r, skew);
        const auto xf = bf16_to_float(std::span<const bf16_bits>(xr));
        x_all.insert(x_all.end(), xf.begin(), xf.end());
      }
      const MoeRefResult ref = moe_layer_reference(p.weights, x_all, N * T, {rc, true});
      // CPU: fp32 in the reference's order (the margin covers compilers that fuse multiply-adds differently);
      // GPU: bf16 output after fp32 sums, as chapter 04 (1e-2 relative L2).
      const double tol = gpu ? 1e-2 : 1e-5;
      for (const PhaseResult& w : win) {
        const PhaseResult* ph = &w;
        const LayerCheck c = check_layer(ref, ph->routing[s], ph->y[s], H, p.router, p.jitter_eps, tol);
        if (!have_worst || (all_pass && (!c.pass || c.rel_l2 > worst.rel_l2))) worst = c;
        have_worst = true;
        all_pass &= c.pass;
      }
      for (const PhaseResult& w : win) same_bits &= w.y[s] == a.y[s];
    }
    // Replicas are copies: on the CPU every row is computed by the same code in the same order either way.
    pass = all_pass && (gpu || same_bits);
    std::printf("\noutputs %s in every window%s\n", same_bits ? "bit-identical" : "differ",
                gpu ? " (GPU: the GEMMs' kernels depend on the rows per expert, so bits may differ; both are checked "
                      "against the reference)"
                    : "");
    std::printf("%s 06_load_balancing: N=%d %s, %d -> %d slots, %d steps x %d tokens per rank, %s: %s\n",
                pass ? "CHECK PASS" : "CHECK FAIL", N, gpu ? "GPU/NCCL" : "CPU/MPI", E, S, o.steps, T,
                rep.summary.c_str(), worst.summary().c_str());
    if (!o.common.json.empty())
      write_json(o.common.json, balance_json(rep, a, b, plan, skew, N, T, o.steps, gpu, pass != 0));
  }
  comm.set_long_wait(true);  // rank 0's reference may outlast the NCCL watchdog's host-collective timeout
  comm.bcast(&pass, sizeof pass, 0);
  comm.set_long_wait(false);
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
