// Chapter 08: tensor parallelism (TP) vs expert parallelism (EP) for the MoE layer. Both split the expert
// weights over N ranks, 1/N each, so they cost the same memory; they differ in what travels.
//
//   TP  every rank holds a 1/N slice of EVERY expert (tp_layer.hpp) and sees every token: route, a partial
//       output from its slices, one all-reduce of [tokens, H] (reduce-scatter + all-gather)
//   EP  every rank holds E/N whole experts and its own tokens: route, all-to-all-v of the rows to the
//       experts' ranks, the experts, all-to-all-v back (chapter 04's layer)
//
// The same global batch (N x T tokens) goes through both; rank 0 checks both against the single-device
// reference, and prints per rank what each moved (bytes, messages), its weight memory, and its time next to
// the formula. CPU ranks (MPI) so far; the NCCL path, data-parallel attention and simulated ranks are next.
//
// Run: mpirun -np 4 08_tp_vs_ep --device cpu --tokens 64
//      mpirun -np 2 08_tp_vs_ep --device cpu --tokens 512 --json tp_ep.json
#include <algorithm>
#include <cstdio>
#include <optional>

#include "ep_layer.hpp"
#include "ep_stats.hpp"
#include "moe/layer_check.hpp"
#include "moe/ep_moe_cpu.hpp"  // rows_of
#include "moe/layer_problem.hpp"
#include "tp_layer.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"

namespace eplab {
namespace {

double median_max(dist::Communicator& comm, std::vector<double> v) {  // per run the slowest rank, then the median
  for (double& x : v) x = comm.max(x);
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int run(int argc, char** argv) {
  auto comm = dist::make_mpi_communicator();
  const int rank = comm->rank(), N = comm->size();
  CommonOptions common;
  LayerOptions lo;
  int iters = 3;
  CLI::App app{"Chapter 08: tensor parallelism vs expert parallelism for the MoE layer (mpirun -np N, CPU ranks)"};
  add_common_options(app, common);
  add_layer_options(app, lo);
  app.get_option("--tokens")->description("tokens T per rank (the global batch is N*T tokens)");
  app.add_option("--iters", iters, "timed forwards of each scheme (medians)")->capture_default_str();
  std::optional<int> early;
  dist::all_or_none(*comm, [&] {
    early = parse_cli(app, argc, argv);
    if (early) return;
    require(common.device != "gpu", "chapter 08 runs on CPU ranks so far (--device cpu); its NCCL path is not "
            "built yet");
    require(lo.tokens >= 1, "--tokens must be >= 1, got ", lo.tokens);
    require(iters >= 1, "--iters must be >= 1, got ", iters);
  });
  if (early) return *early;

  // --- set-up, all or none: the layer, the global batch, this rank's TP slices and EP experts
  std::optional<Checkpoint> ckpt;
  LayerProblem p;
  MoeLayerWeights slice, mine;
  std::optional<Placement> placement;
  const int T = lo.tokens;
  dist::all_or_none(*comm, [&] {
    ckpt.emplace(Checkpoint::open(common.model));
    LayerOptions global = lo;
    global.tokens = N * T;
    p = make_layer_problem(*ckpt, global, common.seed);
    slice = tp_slice(p.weights, rank, N);
    placement.emplace(PlacementKind::Linear, p.weights.num_experts, N);
    mine = weights_for_slots(p.weights, placement->experts_of(rank));
  });
  const int H = p.weights.hidden, I = p.weights.inter, E = p.weights.num_experts, k = p.top_k, NT = N * T;
  // h rounded to bf16 before w2 in every path, as chapter 04's layer (and the GPU) stores it: the rounding is
  // per element of h, so a TP slice rounds exactly the elements the whole expert would
  const MoeRefOptions opt{{p.router, k, p.jitter_eps}, true};
  if (rank == 0)
    std::printf("%d rank(s), CPU (MPI); model %s layer %d: H=%d I=%d E=%d top-%d; %d tokens per rank, %d in all\n", N,
                common.model.c_str(), lo.layer, H, I, E, k, T, NT);

  // --- TP: every rank runs every token through its slices, then one all-reduce
  std::vector<double> tp_ms, tp_ar_ms;
  MoeRefResult tp;
  for (int i = 0; i < iters; ++i) {
    comm->barrier();
    TpTimes t;
    tp = tp_forward(*comm, slice, p.x, NT, opt, t);
    tp_ms.push_back(t.experts_ms + t.allreduce_ms);
    tp_ar_ms.push_back(t.allreduce_ms);
  }
  // --- EP: chapter 04's layer on this rank's T tokens
  const std::span<const bf16_bits> x_mine(p.x_bf16.data() + std::size_t(rank) * T * H, std::size_t(T) * H);
  std::unique_ptr<EpLayer> ep;
  dist::all_or_none(*comm, [&] {
    ep = make_cpu_ep_layer(*comm, *placement, mine, x_mine, T, RouterCfg{p.router, k, p.jitter_eps}, EpLayout::Permute);
  });
  std::vector<double> ep_ms, ep_x_ms;
  for (int i = 0; i < iters; ++i) {
    comm->barrier();
    const EpTimes t = ep->forward();
    ep_ms.push_back(t.total_ms());
    ep_x_ms.push_back(t.dispatch_ms + t.combine_ms);
  }
  const double tp_total = median_max(*comm, tp_ms), tp_ar = median_max(*comm, tp_ar_ms);
  const double ep_total = median_max(*comm, ep_ms), ep_x = median_max(*comm, ep_x_ms);

  // --- what moved, per rank, as it goes on the wire: TP's all-reduce sends (N-1)/N of [NT, H] fp32 partials
  // twice; EP the rows that left the rank, bf16 out (dispatch) and fp32 back (combine) on this CPU path
  const EpPlan& plan = ep->plan();
  const double row = double(H) * sizeof(float);
  const double ep_row = double(ep->dispatch_row_bytes() + ep->combine_row_bytes());  // one row out and back
  int ep_rows_out = 0, ep_msgs = 0;
  for (int q = 0; q < N; ++q)
    if (q != rank && plan.send_counts[q]) ep_rows_out += plan.send_counts[q], ++ep_msgs;
  const double ep_bytes = ep_rows_out * ep_row, tp_bytes = 2.0 * (NT - rows_of(rank, N, NT).count) * row;
  const double ep_bytes_mean = comm->sum(ep_bytes) / N, tp_bytes_mean = comm->sum(tp_bytes) / N;
  const double ep_msgs_mean = comm->sum(2.0 * ep_msgs) / N;

  // --- check both against the reference (rank 0: it has TP's full y; EP's is gathered)
  const Routing r_ep = gather_routing(*comm, ep->routing());
  const std::vector<float> y_ep_mine = ep->output();
  std::vector<float> y_ep(rank == 0 ? std::size_t(NT) * H : 0);
  comm->gather(y_ep_mine.data(), y_ep_mine.size() * sizeof(float), y_ep.data(), 0);
  int pass = 1;
  if (rank == 0) {
    const MoeRefResult ref = moe_layer_reference(p.weights, p.x, NT, opt);
    // fp32 sums; TP adds N partial sums over I/N where the reference sums over I at once (another order:
    // 1e-5 relative L2 is far above that rounding and far below any wrong row); EP is the reference's order.
    const LayerCheck ctp = check_layer(ref, tp.routing, tp.y, H, p.router, p.jitter_eps, 1e-5);
    const LayerCheck cep = check_layer(ref, r_ep, y_ep, H, p.router, p.jitter_eps, 1e-5);
    const double w_bytes = 3.0 * I * H * 2 * E / N;  // bf16 weights: both keep 1/N of the experts
    Table t({"scheme", "weights per rank", "bytes sent per rank (mean)", "formula", "messages per rank",
             "exchange ms", "layer ms"});
    t.add_row({"TP (all-reduce)", human_bytes(w_bytes), human_bytes(tp_bytes_mean),
               human_bytes(2.0 * (N - 1) / N * NT * row) + " = 2 (N-1)/N NT H 4", std::to_string(2 * (N - 1)),
               strf("%.3f", tp_ar), strf("%.3f", tp_total)});
    t.add_row({"EP (all-to-all-v)", human_bytes(w_bytes), human_bytes(ep_bytes_mean),
               human_bytes(double(T) * k * (N - 1) / N * ep_row) +
                   strf(" = T k (N-1)/N H (%d + %d) (uniform)", int(ep->dispatch_row_bytes() / H),
                        int(ep->combine_row_bytes() / H)),
               strf("%.1f", ep_msgs_mean), strf("%.3f", ep_x), strf("%.3f", ep_total)});
    std::printf("\nper rank and layer (CPU ranks: times are the CPU's, the bytes and messages are the lesson):\n");
    t.print();
    std::printf("TP sends %.2fx EP's bytes here: TP moves every token's partial output to every rank, EP only the k "
                "copies of the rows whose experts live elsewhere (and sends them out in bf16)\n",
                ep_bytes_mean > 0 ? tp_bytes_mean / ep_bytes_mean : 0.0);
    std::printf("TP check: %s\nEP check: %s\n", ctp.summary().c_str(), cep.summary().c_str());
    pass = ctp.pass && cep.pass;
    std::printf("%s 08_tp_vs_ep: N=%d CPU/MPI, T=%d per rank, TP and EP equal the reference\n",
                pass ? "CHECK PASS" : "CHECK FAIL", N, T);
    if (!common.json.empty())
      write_json(common.json, {{"chapter", "08_tp_vs_ep"}, {"ranks", N}, {"tokens_per_rank", T}, {"hidden", H},
                               {"inter", I}, {"experts", E}, {"top_k", k},
                               {"tp", {{"bytes_per_rank", tp_bytes_mean}, {"messages", 2 * (N - 1)},
                                       {"allreduce_ms", tp_ar}, {"layer_ms", tp_total}, {"rel_l2", ctp.rel_l2}}},
                               {"ep", {{"bytes_per_rank", ep_bytes_mean}, {"messages", ep_msgs_mean},
                                       {"exchange_ms", ep_x}, {"layer_ms", ep_total}, {"rel_l2", cep.rel_l2}}},
                               {"weight_bytes_per_rank", w_bytes}, {"pass", pass != 0}});
  }
  comm->bcast(&pass, sizeof pass, 0);
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
