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
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <thread>

#include "device.hpp"
#include "dist/communicator.hpp"
#include "ep_layer.hpp"
#include "ep_stats.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"

namespace eplab {

// bench.cu
nlohmann::json run_ep_bench(dist::Communicator& comm, PlacementKind placement, const std::vector<int>& tokens,
                            int iters, std::uint64_t seed, const std::vector<int>& chunks, bool* pass);
// vary.cu
bool run_ep_vary(dist::Communicator& comm, const Checkpoint& ckpt, const LayerOptions& lo, PlacementKind pkind,
                 EpLayout layout, int chunks, std::uint64_t seed);

namespace {

struct Options {
  CommonOptions common;
  LayerOptions layer;
  std::string placement = "linear";
  std::string layout = "permute";
  int iters = 3;
  bool bench = false;
  bool vary = false;
  std::vector<int> bench_tokens{128, 1024, 4096, 16384};
  int bench_iters = 20;
  std::vector<int> chunks{1};  // the inplace layout's chunked pipeline; --bench takes a list
  int fail_rank = -1;
  int stall_rank = -1;
};

// FNV-1a over the bytes of the output: equal outputs, equal checksums (for the N- and placement-
// independence tests, which compare this line across runs).
std::uint64_t checksum(std::span<const float> v) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

std::string traffic_table(const EpPlan& plan, std::size_t row_bytes) {
  const int N = plan.ranks;
  std::vector<std::string> head{"rows (bytes)"};
  for (int d = 0; d < N; ++d) head.push_back(strf("to rank %d", d));
  head.push_back("sent");
  head.push_back("off-rank");
  Table t(head);
  for (int s = 0; s < N; ++s) {
    std::vector<std::string> row{strf("from rank %d", s)};
    long sent = 0, off = 0;
    for (int d = 0; d < N; ++d) {
      const long v = plan.traffic[std::size_t(s) * N + d];
      sent += v;
      if (d != s) off += v;
      row.push_back(strf("%ld (%s)", v, human_bytes(double(v) * row_bytes).c_str()));
    }
    row.push_back(strf("%ld (%s)", sent, human_bytes(double(sent) * row_bytes).c_str()));
    row.push_back(sent ? strf("%.0f%%", 100.0 * off / sent) : "-");
    t.add_row(row);
  }
  return t.str();
}

nlohmann::json traffic_json(const EpPlan& plan) {
  nlohmann::json m = nlohmann::json::array();
  for (int s = 0; s < plan.ranks; ++s) {
    std::vector<int> r(plan.traffic.begin() + std::size_t(s) * plan.ranks,
                       plan.traffic.begin() + std::size_t(s + 1) * plan.ranks);
    m.push_back(r);
  }
  return m;
}

// Whether every rank can take the NCCL path (for --device auto). Same answer on every rank.
bool all_ranks_have_a_gpu(dist::Communicator& comm, std::string* why) {
  std::string reason;
  const int n = gpu_count(&reason);
  int ok = dist::nccl_compiled() && n >= comm.local_size();
  if (!dist::nccl_compiled()) reason = "this build has no NCCL";
  else if (n > 0 && n < comm.local_size()) reason = strf("%d ranks on this node but %d GPU(s)", comm.local_size(), n);
  const auto all = comm.allgather_int(std::span<const int>(&ok, 1));
  for (int r = 0; r < comm.size(); ++r)
    if (!all[r]) {
      if (why) *why = r == comm.rank() ? reason : strf("rank %d has no GPU of its own", r);
      return false;
    }
  return true;
}

int run(int argc, char** argv) {
  auto mpi = dist::make_mpi_communicator();
  const int rank = mpi->rank(), N = mpi->size();
  auto say = [&](const std::string& s) {
    if (rank == 0) std::fputs(s.c_str(), stdout);
  };

  Options o;
  CLI::App app{"Chapter 04: expert parallelism with all-to-all-v (mpirun -np N; NCCL on GPUs, MPI on the CPU)"};
  add_common_options(app, o.common);
  add_layer_options(app, o.layer);
  app.get_option("--tokens")->description("tokens T per rank (the global batch is N*T tokens)");
  app.add_option("--placement", o.placement, "expert map: linear (contiguous blocks) or round-robin (e mod N)")
      ->check(CLI::IsMember({"linear", "round-robin"}))
      ->capture_default_str();
  app.add_option("--layout", o.layout,
                 "exchange layout: permute (all-to-all-v + local permute), direct (one message per expert "
                 "segment, no permute) or inplace (GPU: experts straight on the arrival buffer, own rows "
                 "outside NCCL; the CPU runs it as permute)")
      ->check(CLI::IsMember({"permute", "direct", "inplace"}))
      ->capture_default_str();
  app.add_option("--iters", o.iters, "timed forwards (after one warm-up); times are medians")->capture_default_str();
  app.add_flag("--bench", o.bench, "GPU benchmark at the Phi-tiny layer shape (random weights, no checkpoint)");
  app.add_flag("--vary", o.vary,
               "GPU test of the engine: T changes every call and differs per rank (0 included), two layers share "
               "one workspace; every token checked against the CPU reference");
  app.add_option("--bench-tokens", o.bench_tokens, "tokens per rank for --bench")->capture_default_str();
  app.add_option("--bench-iters", o.bench_iters, "timed forwards per size for --bench")->capture_default_str();
  app.add_option("--chunks", o.chunks,
                 "GPU, inplace layout: cut each peer's dispatch message into N pieces, each sent as soon as it is "
                 "permuted, and combine the tokens that stayed home during the return exchange (1 = off; --bench "
                 "takes a list, e.g. --chunks 1 2 4 8; the CPU path ignores it)")
      ->capture_default_str();
  app.add_option("--fail-rank", o.fail_rank, "test only: this rank exits before the dispatch")->group("");
  app.add_option("--stall-rank", o.stall_rank, "test only: this rank hangs before the dispatch")->group("");

  std::optional<int> early;
  dist::all_or_none(*mpi, [&] {
    if (rank != 0) std::cout.setstate(std::ios::failbit);  // --help: printed once, by rank 0
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    require(o.iters >= 1, "--iters must be >= 1, got ", o.iters);
    require(o.bench_iters >= 1, "--bench-iters must be >= 1, got ", o.bench_iters);
    require(o.layer.tokens >= 0, "--tokens must be >= 0, got ", o.layer.tokens);
    require(o.fail_rank < N, "--fail-rank ", o.fail_rank, " is not a rank (N = ", N, ")");
    require(o.stall_rank < N, "--stall-rank ", o.stall_rank, " is not a rank (N = ", N, ")");
    for (int c : o.chunks)
      require(c >= 1 && c <= EpMoeGpu::kMaxChunks, "--chunks must be between 1 and ", EpMoeGpu::kMaxChunks, ", got ",
              c, " (1 = one message per peer)");
    require(o.bench || o.chunks.size() == 1, "--chunks takes one value (a list only with --bench)");
    require(o.bench || o.chunks[0] == 1 || o.layout == "inplace",
            "--chunks ", o.chunks[0], " pipelines the inplace layout only: add --layout inplace");
  });
  if (early) return *early;
  const PlacementKind pkind = parse_placement(o.placement);
  const EpLayout layout = parse_layout(o.layout);

  // --- where to run: the same decision on every rank
  bool gpu = o.common.device == "gpu" || o.bench;
  if (o.common.device == "auto" && !o.bench) {
    std::string why;
    gpu = all_ranks_have_a_gpu(*mpi, &why);
    if (!gpu) say(strf("device: CPU, MPI backend (--device auto: %s)\n", why.c_str()));
  }
  if (o.bench)
    dist::all_or_none(*mpi, [&] {
      require(o.common.device != "cpu", "--bench measures the NCCL path on GPUs; it has no CPU mode");
    });
  if (o.stall_rank >= 0)
    dist::all_or_none(*mpi, [&] {
      require(gpu, "--stall-rank tests the NCCL watchdog; the MPI backend has none (use --device gpu)");
    });
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

  if (o.vary) {
    dist::all_or_none(comm, [&] { require(gpu, "--vary tests the GPU engine; use --device gpu"); });
    std::optional<Checkpoint> ck;
    dist::all_or_none(comm, [&] { ck.emplace(Checkpoint::open(o.common.model)); });
    return run_ep_vary(comm, *ck, o.layer, pkind, layout, o.chunks[0], o.common.seed) ? 0 : 1;
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
    p = make_layer_problem(*ckpt, global, o.common.seed, placement->experts_of(rank));
  });
  const int H = p.weights.hidden, I = p.weights.inter, E = p.weights.num_experts, k = p.top_k;

  // Every rank must run the same problem: compare a fingerprint with rank 0's.
  dist::all_or_none(comm, [&] {
    const char* names[] = {"hidden", "inter", "experts", "top-k", "layer", "tokens", "router", "placement", "seed",
                           "layout", "--chunks"};
    const std::vector<std::int64_t> fp{H, I, E, k, o.layer.layer, T, int(p.router), int(pkind),
                                       std::int64_t(o.common.seed), int(layout), chunks};
    std::vector<std::int64_t> all = comm.allgather(fp);
    for (std::size_t f = 0; f < fp.size(); ++f)
      require(fp[f] == all[f], "this rank's ", names[f], " is ", fp[f], " but rank 0's is ", all[f],
              ": every rank must run the same model and flags");
  });

  say(strf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d\n", o.common.model.c_str(), o.layer.layer, H, I, E,
           router_name(p.router), k));
  say(strf("tokens: %d per rank, %d in all; layout %s%s\n", T, N * T, layout_name(layout),
           gpu && chunks > 1 ? strf(", %d chunks per peer message", chunks).c_str() : ""));
  say(placement->str());
  const double expert_bytes = 3.0 * I * H * 2;  // w1, w3, w2 in bf16
  say(strf("memory: %s of experts per rank (at most %d experts) instead of %s for all %d on one device\n",
           human_bytes(expert_bytes * placement->max_local()).c_str(), placement->max_local(),
           human_bytes(expert_bytes * E).c_str(), E));

  const std::span<const bf16_bits> x_mine(p.x_bf16.data() + std::size_t(rank) * T * H, std::size_t(T) * H);
  const RouterCfg rc{p.router, k, p.jitter_eps};
  std::unique_ptr<EpLayer> layer;
  dist::all_or_none(comm, [&] {
    layer = gpu ? make_gpu_ep_layer(comm, *placement, p.weights, x_mine, T, rc, layout, chunks)
                : make_cpu_ep_layer(comm, *placement, p.weights, x_mine, T, rc, layout);
  });

  if (rank == o.fail_rank) {  // test hook: a rank that dies while the others wait for it in the exchange
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s: exiting early on purpose (--fail-rank %d)\n", comm.who().c_str(), rank);
    std::fflush(stderr);
    std::_Exit(3);
  }

  if (rank == o.stall_rank) {  // test hook: a rank that hangs (not in MPI or NCCL) while the others wait for
                               // it in a host collective: their watchdogs must end the job
    std::fprintf(stderr, "%s: hanging on purpose (--stall-rank %d)\n", comm.who().c_str(), rank);
    std::fflush(stderr);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }

  // --- run: one warm-up, then the timed forwards (the last one's output is checked)
  layer->forward();
  const StageStats st = time_forwards(*layer, comm, o.iters);
  const auto [raw_d, raw_c] = time_raw_exchange(*layer, comm, o.iters);
  // the raw exchange reused the buffers: one more forward so the output we check is fresh
  layer->forward();
  const EpPlan& plan = layer->plan();

  // --- gather routing and output on rank 0; compare with the single-device reference
  const Routing r_mine = layer->routing();
  const std::vector<float> y_mine = layer->output();
  Routing r_all;
  r_all.tokens = N * T;
  r_all.k = k;
  std::vector<float> y_all(rank == 0 ? std::size_t(N) * T * H : 0);
  if (rank == 0) {
    r_all.ids.resize(std::size_t(N) * T * k);
    r_all.weights.resize(r_all.ids.size());
  }
  comm.gather(r_mine.ids.data(), r_mine.ids.size() * sizeof(int), r_all.ids.data(), 0);
  comm.gather(r_mine.weights.data(), r_mine.weights.size() * sizeof(float), r_all.weights.data(), 0);
  comm.gather(y_mine.data(), y_mine.size() * sizeof(float), y_all.data(), 0);

  int pass = 1;
  nlohmann::json j;
  if (rank == 0) {
    if (o.layer.show > 0) {
      std::printf("routing of rank 0's first tokens:\n");
      print_routing(r_mine, o.layer.show);
    }
    std::printf("\ntraffic of the dispatch (the combine sends the same rows back: the transpose, %s per row)\n",
                human_bytes(double(layer->combine_row_bytes())).c_str());
    std::fputs(traffic_table(plan, layer->dispatch_row_bytes()).c_str(), stdout);

    const double sum_max = std::max(st.route_ms + st.dispatch_ms + st.experts_ms + st.combine_ms, 1e-9);
    Table tt({"stage", "max over ranks ms", "mean over ranks ms", "share of max"});
    auto add = [&](const char* name, double mx, double mean) {
      tt.add_row({name, strf("%.3f", mx), strf("%.3f", mean), strf("%.0f%%", 100 * mx / sum_max)});
    };
    add("route", st.route_ms, st.mean.route_ms);
    add("dispatch", st.dispatch_ms, st.mean.dispatch_ms);
    add("experts", st.experts_ms, st.mean.experts_ms);
    add("combine", st.combine_ms, st.mean.combine_ms);
    tt.add_row({"whole forward", strf("%.3f", st.total_ms), strf("%.3f", st.mean.total_ms()), ""});
    std::printf("\ntime split, median of %d forwards (%s); waiting for a slower rank counts in dispatch and "
                "combine\n", o.iters, gpu ? "GPU, NCCL" : "CPU, MPI");
    std::fputs(tt.str().c_str(), stdout);

    const double Sd = mean_bytes_per_rank(plan, layer->dispatch_row_bytes());
    const double Sc = mean_bytes_per_rank(plan, layer->combine_row_bytes());
    const Bandwidth bd = bandwidth(Sd, st.dispatch_ms, N), bc = bandwidth(Sc, st.combine_ms, N);
    const Bandwidth both = bandwidth(Sd + Sc, st.dispatch_ms + st.combine_ms, N);
    const Bandwidth raw = bandwidth(Sd + Sc, raw_d + raw_c, N);
    Table bt({"exchange", "bytes/rank", "ms", "algbw GB/s", "busbw GB/s"});
    auto addb = [&](const char* name, const Bandwidth& b) {
      bt.add_row({name, human_bytes(b.bytes), strf("%.3f", b.ms), strf("%.3g", b.algbw_gbps), strf("%.3g", b.busbw_gbps)});
    };
    addb("dispatch", bd);
    addb("combine", bc);
    addb("dispatch+combine", both);
    addb("raw all-to-all-v, same bytes", raw);
    std::printf("\nbandwidth as nccl-tests reports all-to-all: algbw = bytes sent per rank / time, "
                "busbw = algbw * (N-1)/N\n");
    std::fputs(bt.str().c_str(), stdout);
    if (both.ms > 0)
      std::printf("dispatch+combine reach %.0f%% of the raw all-to-all-v's bandwidth (the rest is planning, "
                  "count exchange, permutes and waiting for the slowest rank)\n",
                  100.0 * (raw_d + raw_c) / (st.dispatch_ms + st.combine_ms));

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

    j = {{"chapter", "04_expert_parallel"},
         {"ranks", N},
         {"backend", comm.backend()},
         {"device", comm.describe()},
         {"placement", placement_name(pkind)},
         {"layout", layout_name(layout)},
         {"chunks", gpu ? chunks : 1},
         {"tokens_per_rank", T},
         {"hidden", H},
         {"experts", E},
         {"top_k", k},
         {"expert_map", [&] {
            nlohmann::json m = nlohmann::json::array();
            for (int r = 0; r < N; ++r) m.push_back(placement->experts_of(r));
            return m;
          }()},
         {"traffic_rows", traffic_json(plan)},
         {"times_ms",
          {{"route", st.route_ms}, {"dispatch", st.dispatch_ms}, {"experts", st.experts_ms}, {"combine", st.combine_ms},
           {"total", st.total_ms}, {"raw_dispatch", raw_d}, {"raw_combine", raw_c}}},
         {"mean_times_ms",
          {{"route", st.mean.route_ms}, {"dispatch", st.mean.dispatch_ms}, {"experts", st.mean.experts_ms},
           {"combine", st.mean.combine_ms}}},
         {"busbw_gbps", {{"dispatch_combine", both.busbw_gbps}, {"raw", raw.busbw_gbps}}},
         {"rel_l2", check.rel_l2},
         {"max_abs_diff", maxdiff},
         {"checksum", strf("%016llx", (unsigned long long)sum)},
         {"pass", pass != 0}};
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
