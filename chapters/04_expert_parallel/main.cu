// Chapter 04: expert parallelism. `mpirun -np N`, one rank per GPU (or per CPU "device"), each rank with
// its own tokens and only its own experts; the router is replicated.
//
//   rank r:  x_r[T,H] ─route─▶ ids, w ─plan by (rank, local expert)─▶ send buffer
//            counts ──allgather──▶ every rank knows who sends it what
//            send buffer ══all-to-all-v══▶ rows of my experts, from every rank ─permute─▶ grouped by expert
//            grouped SwiGLU experts (mine only)
//            outputs ══all-to-all-v back══▶ y_r[t] = Σ_j w[t,j] · expert_{ids[t,j]}(x_r[t])
//
// Backends: NCCL on GPUs (device buffers, grouped ncclSend/ncclRecv), MPI on the CPU (MPI_Alltoallv).
// Check: rank 0 gathers every rank's output and compares it with the single-device CPU reference over
// all N·T tokens. The tokens are ONE global batch of N·T rows cut into N slices (as data-parallel
// attention would hand them over), so for a fixed N·T the answer must not depend on N or the placement.
//
// Run: mpirun -np 4 04_expert_parallel --device cpu                 laptop: MPI ranks stand in for GPUs
//      mpirun -np 2 04_expert_parallel --device gpu                 NCCL, one GPU per rank
//      mpirun -np 2 04_expert_parallel --bench                      Phi-tiny layer shape, T = 128 .. 16384
//      mpirun -np 2 04_expert_parallel --bench --chunks 1 2 4 8     ... and the inplace layout's chunked pipeline
//
// This file is the lesson: set up one layer per rank, run it, check it. The layer itself is ep_layer.hpp
// (CPU: ep_cpu.cpp, GPU: ep_gpu.cu over kernels/ep), the options options.cpp, the tables report.cpp.
#include <cstdio>
#include <optional>

#include "dist/communicator.hpp"
#include "ep_layer.hpp"
#include "ep_stats.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "options.hpp"
#include "report.hpp"
#include "util/check.hpp"
#include "util/host_memory.hpp"
#include "util/report.hpp"

namespace eplab {

// bench.cu
nlohmann::json run_ep_bench(dist::Communicator& comm, PlacementKind placement, const std::vector<int>& tokens,
                            int iters, std::uint64_t seed, const std::vector<int>& chunks, bool* pass);

namespace {

int run(int argc, char** argv) {
  auto mpi = dist::make_mpi_communicator();
  const int rank = mpi->rank(), N = mpi->size();
  auto say = [&](const std::string& s) {
    if (rank == 0) std::fputs(s.c_str(), stdout);
  };

  Ep04Options o;
  if (auto early = parse_ep04_options(*mpi, argc, argv, o)) return *early;
  const PlacementKind pkind = parse_placement(o.placement);
  const EpLayout layout = parse_layout(o.layout);

  // --- where to run: the same decision on every rank; NCCL needs one GPU per rank
  const bool gpu = choose_gpu(*mpi, o);
  std::unique_ptr<dist::Communicator> nccl;
  if (gpu) nccl = dist::make_nccl_communicator();  // one GPU per rank, or an error on every rank
  dist::Communicator& comm = gpu ? *nccl : *mpi;
  say(strf("%d rank(s), backend %s: %s\n", N, comm.backend(), comm.describe().c_str()));

  if (o.bench) {
    bool pass = false;
    nlohmann::json j = run_ep_bench(comm, pkind, o.bench_tokens, o.bench_iters, o.common.seed, o.chunks, &pass);
    if (rank == 0 && !o.common.json.empty()) write_json(o.common.json, j);
    say(pass ? strf("CHECK PASS 04_expert_parallel --bench: %zu sizes on %d ranks\n", o.bench_tokens.size(), N)
             : "CHECK FAIL 04_expert_parallel --bench: the output check failed (see above)\n");
    return pass ? 0 : 1;
  }

  // --- set-up, all or none: model, placement, this rank's experts, the global batch
  std::optional<Checkpoint> ckpt;
  std::optional<Placement> placement;
  LayerProblem p;
  const int T = o.layer.tokens;
  const int chunks = o.chunks[0];
  if (!gpu && chunks > 1)
    say(strf("--chunks %d: ignored on the CPU (MPI) path, which runs inplace as permute (same answer)\n", chunks));
  dist::all_or_none(comm, [&] {
    ckpt.emplace(Checkpoint::open(o.common.model));
    placement.emplace(pkind, ckpt->config().num_local_experts, N);
    LayerOptions global = o.layer;
    global.tokens = N * T;  // every rank makes the same global batch and keeps its slice
    // Say so before allocating what cannot fit (the batch as fp32 + bf16 on every rank).
    const double need = double(N) * T * ckpt->config().hidden_size * 6, have = host_memory_bytes();
    require(have <= 0 || need <= have, "out of host memory: the global batch of ", std::int64_t(N) * T, " tokens needs ",
            human_bytes(need), " on every rank, more than this machine's ", human_bytes(have), " (try fewer tokens)");
    p = make_layer_problem(*ckpt, global, o.common.seed, placement->experts_of(rank));
  });
  const int H = p.weights.hidden, I = p.weights.inter, E = p.weights.num_experts, k = p.top_k;

  // Every rank must run the same problem: compare a fingerprint with rank 0's.
  require_same_on_all_ranks(comm, {{"hidden", H}, {"inter", I}, {"experts", E}, {"top-k", k},
                                   {"layer", o.layer.layer}, {"tokens", T}, {"router", int(p.router)},
                                   {"placement", int(pkind)}, {"seed", std::int64_t(o.common.seed)},
                                   {"layout", int(layout)}, {"--chunks", chunks}});

  say(strf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d\n", o.common.model.c_str(), o.layer.layer, H, I, E,
           router_name(p.router), k));
  say(strf("tokens: %d per rank, %d in all; layout %s%s\n", T, N * T, layout_name(layout),
           gpu && chunks > 1 ? strf(", %d chunks per peer message", chunks).c_str() : ""));
  say(placement->str());
  const double expert_bytes = 3.0 * I * H * 2;  // w1, w3, w2 in bf16
  say(strf("memory: %s of experts per rank (at most %d experts) instead of %s for all %d on one device\n",
           human_bytes(expert_bytes * placement->max_local()).c_str(), placement->max_local(),
           human_bytes(expert_bytes * E).c_str(), E));

  // --- the new idea: one layer per rank, its experts only, all-to-all-v in and out
  const std::span<const bf16_bits> x_mine(p.x_bf16.data() + std::size_t(rank) * T * H, std::size_t(T) * H);
  const RouterCfg rc{p.router, k, p.jitter_eps};
  std::unique_ptr<EpLayer> layer;
  dist::all_or_none(comm, [&] {
    layer = gpu ? make_gpu_ep_layer(comm, *placement, p.weights, x_mine, T, rc, layout, chunks)
                : make_cpu_ep_layer(comm, *placement, p.weights, x_mine, T, rc, layout);
  });

  // --- run: one warm-up, then the timed forwards (the last one's output is checked)
  layer->forward();
  const StageStats st = time_forwards(*layer, comm, o.iters);
  const auto [raw_d, raw_c] = time_raw_exchange(*layer, comm, o.iters);
  layer->forward();  // the raw exchange reused the buffers: one more forward so the output we check is fresh
  const EpPlan& plan = layer->plan();

  // --- gather routing and output on rank 0; compare with the single-device reference
  const Routing r_all = gather_routing(comm, layer->routing());
  std::vector<float> y_all(rank == 0 ? std::size_t(N) * T * H : 0);
  const std::vector<float> y_mine = layer->output();
  comm.gather(y_mine.data(), y_mine.size() * sizeof(float), y_all.data(), 0);

  int pass = 1;
  if (rank == 0) {
    if (o.layer.show > 0) {
      std::printf("routing of rank 0's first tokens:\n");
      print_routing(layer->routing(), o.layer.show);
    }
    std::printf("\ntraffic of the dispatch (the combine sends the same rows back: the transpose, %s per row)\n",
                human_bytes(double(layer->combine_row_bytes())).c_str());
    std::fputs(traffic_table(plan, layer->dispatch_row_bytes()).c_str(), stdout);
    nlohmann::json j = print_times_and_bandwidth(st, raw_d, raw_c, plan, layer->dispatch_row_bytes(),
                                                 layer->combine_row_bytes(), o.iters, gpu);

    // The reference: the whole layer on one device, fp32, h rounded to bf16 like every path here.
    const MoeLayerWeights full = load_moe_layer(*ckpt, o.layer.layer);
    const MoeRefResult ref = moe_layer_reference(full, p.x, N * T, {p.router, k, p.jitter_eps, true});
    // CPU: the same fp32 arithmetic in the same order (bit-identical on x86-64; the margin covers
    // compilers that fuse multiply-adds differently in the two code paths).
    // GPU: bf16 output (unit roundoff 2^-9 = 2e-3 per element) after fp32 sums in another order, as in
    // chapters 01-02: 1e-2 relative L2 leaves room for that and still catches any wrong row or weight.
    const double tol = gpu ? 1e-2 : 1e-5;
    const LayerCheck check = check_layer(ref, r_all, y_all, H, p.router, p.jitter_eps, tol);
    const double maxdiff = max_abs_diff(y_all, ref.y);
    const std::uint64_t sum = checksum(y_all);
    std::printf("\noutput checksum: fnv1a64=%016llx over %d x %d values (equal for every N and placement at the "
                "same N*T on the CPU)\n",
                (unsigned long long)sum, N * T, H);
    std::printf("max |y - y_ref| = %.3g\n", maxdiff);
    pass = check.pass;
    std::printf("%s 04_expert_parallel: N=%d %s %s%s, T=%d per rank, %s: %s\n", pass ? "CHECK PASS" : "CHECK FAIL", N,
                placement_name(pkind), layout_name(layout), gpu && chunks > 1 ? strf(" (%d chunks)", chunks).c_str() : "",
                T, gpu ? "GPU/NCCL" : "CPU/MPI", check.summary().c_str());

    j.update({{"chapter", "04_expert_parallel"}, {"ranks", N}, {"backend", comm.backend()},
              {"device", comm.describe()}, {"placement", placement_name(pkind)}, {"layout", layout_name(layout)},
              {"chunks", gpu ? chunks : 1}, {"tokens_per_rank", T}, {"hidden", H}, {"experts", E}, {"top_k", k},
              {"expert_map", expert_map_json(*placement)}, {"traffic_rows", traffic_json(plan)}, {"rel_l2", check.rel_l2},
              {"max_abs_diff", maxdiff}, {"checksum", strf("%016llx", (unsigned long long)sum)},
              {"pass", pass != 0}});
    if (!o.common.json.empty()) write_json(o.common.json, j);
  }
  // Every rank leaves with rank 0's verdict. Rank 0's CPU reference over N*T tokens may outlast the
  // host-collective timeout of the NCCL watchdog; this wait is long on purpose.
  comm.set_long_wait(true);
  comm.bcast(&pass, sizeof pass, 0);
  comm.set_long_wait(false);
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
