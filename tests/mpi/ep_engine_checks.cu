// Checks of chapter 04's EP layer that a student never runs, so they live here and not in the chapter's
// command line (tests/cli/ep_tests.cmake runs them under mpirun):
//   --vary          GPU: T changes every call and differs per rank (0 included), two layers share one
//                   workspace; every token checked against the CPU reference (ep_vary.cu)
//   --fail-rank R   rank R exits after the set-up, while the others wait for it in the first exchange:
//                   every rank must end, non-zero, without a hang
//   --stall-rank R  rank R hangs outside MPI (and NCCL) while the others wait for it in the first exchange:
//                   the watchdog (of the MPI backend, or of the NCCL one) must end every rank within
//                   EPLAB_COMM_TIMEOUT_S with a line naming rank R; with --stall-at exit, rank R hangs
//                   after its last collective instead, while the others wait for it before MPI_Finalize
//   --busy-rank R   rank R works (sleeps) --busy-s seconds while the others wait for it in a bcast bracketed
//                   by set_long_wait, as they wait for rank 0's CPU reference: the watchdog must not fire
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <thread>

#include "dist/communicator.hpp"
#include "ep_layer.hpp"
#include "moe/layer_problem.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

namespace eplab {

// ep_vary.cu
bool run_ep_vary(dist::Communicator& comm, const Checkpoint& ckpt, const LayerOptions& lo, PlacementKind pkind,
                 EpLayout layout, int chunks, std::uint64_t seed);

namespace {

int run(int argc, char** argv) {
  auto mpi = dist::make_mpi_communicator();
  const int rank = mpi->rank(), N = mpi->size();
  CommonOptions common;
  LayerOptions lo;
  std::string placement_name = "linear", layout_name_ = "permute", stall_at = "exchange";
  int chunks = 1, fail_rank = -1, stall_rank = -1, busy_rank = -1;
  double busy_s = 0;
  bool vary = false;
  CLI::App app{"Checks of chapter 04's EP layer: --vary, --fail-rank R, --stall-rank R, --busy-rank R (mpirun -np N)"};
  add_common_options(app, common);
  add_layer_options(app, lo);
  app.add_option("--placement", placement_name, "linear or round-robin");
  app.add_option("--layout", layout_name_, "permute, direct or inplace");
  app.add_option("--chunks", chunks, "the inplace layout's pieces per peer message");
  app.add_flag("--vary", vary, "GPU: changing T per call and per rank, two layers on one workspace");
  app.add_option("--fail-rank", fail_rank, "this rank exits before the first exchange");
  app.add_option("--stall-rank", stall_rank, "this rank hangs before the first exchange (or see --stall-at)");
  app.add_option("--stall-at", stall_at, "where --stall-rank hangs: exchange (the first one) or exit")
      ->check(CLI::IsMember({"exchange", "exit"}));
  app.add_option("--busy-rank", busy_rank, "this rank works --busy-s seconds while the others wait (long wait)");
  app.add_option("--busy-s", busy_s, "seconds of --busy-rank's work");
  std::optional<int> early;
  dist::all_or_none(*mpi, [&] {
    if (rank != 0) std::cout.setstate(std::ios::failbit);
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    if (early) return;
    require(fail_rank < N && stall_rank < N && busy_rank < N,
            "--fail-rank/--stall-rank/--busy-rank must name a rank below N = ", N);
    require(vary + (fail_rank >= 0) + (stall_rank >= 0) + (busy_rank >= 0) == 1,
            "give exactly one of --vary, --fail-rank, --stall-rank, --busy-rank");
    require(common.device != "auto", "give --device cpu or --device gpu");
    require(common.device == "gpu" || !vary, "--vary tests the GPU engine: use --device gpu");
  });
  if (early) return *early;
  const bool gpu = common.device == "gpu";
  const PlacementKind pkind = parse_placement(placement_name);
  const EpLayout layout = parse_layout(layout_name_);
  std::unique_ptr<dist::Communicator> nccl;
  if (gpu) nccl = dist::make_nccl_communicator();
  dist::Communicator& comm = gpu ? *nccl : *mpi;

  std::optional<Checkpoint> ckpt;
  dist::all_or_none(comm, [&] { ckpt.emplace(Checkpoint::open(common.model)); });
  if (vary) return run_ep_vary(comm, *ckpt, lo, pkind, layout, chunks, common.seed) ? 0 : 1;

  // --fail-rank / --stall-rank: a real layer set up on every rank, then one rank leaves the protocol.
  std::optional<Placement> placement;
  LayerProblem p;
  std::unique_ptr<EpLayer> layer;
  const int T = lo.tokens;
  dist::all_or_none(comm, [&] {
    placement.emplace(pkind, ckpt->config().num_local_experts, N);
    LayerOptions global = lo;
    global.tokens = N * T;
    p = make_layer_problem(*ckpt, global, common.seed, placement->experts_of(rank));
    const std::span<const bf16_bits> x(p.x_bf16.data() + std::size_t(rank) * T * p.weights.hidden,
                                       std::size_t(T) * p.weights.hidden);
    const RouterCfg rc{p.router, p.top_k, p.jitter_eps};
    layer = gpu ? make_gpu_ep_layer(comm, *placement, p.weights, x, T, rc, layout, chunks)
                : make_cpu_ep_layer(comm, *placement, p.weights, x, T, rc, layout);
  });
  if (rank == fail_rank) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s: exiting early on purpose (--fail-rank %d)\n", comm.who().c_str(), rank);
    std::fflush(stderr);
    std::_Exit(3);
  }
  auto stall = [&] {
    std::fprintf(stderr, "%s: hanging on purpose (--stall-rank %d --stall-at %s)\n", comm.who().c_str(), rank,
                 stall_at.c_str());
    std::fflush(stderr);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  };
  if (rank == stall_rank && stall_at == "exchange") stall();
  if (rank == busy_rank) {
    std::fprintf(stderr, "%s: working %.1f s on purpose (--busy-rank %d)\n", comm.who().c_str(), busy_s, rank);
    std::fflush(stderr);
    std::this_thread::sleep_for(std::chrono::duration<double>(busy_s));
  }
  if (busy_rank >= 0) {
    int ok = 1;
    comm.set_long_wait(true);  // as around rank 0's CPU reference: this wait is long on purpose
    comm.bcast(&ok, sizeof ok, busy_rank);
    comm.set_long_wait(false);
  }
  layer->forward();
  comm.barrier();  // a host collective: the watchdog bounds it
  if (rank == stall_rank) stall();  // --stall-at exit: the others go on to mpi_main's final barrier
  if (stall_rank >= 0) return 0;
  if (busy_rank >= 0) {
    if (rank == 0)
      std::printf("CHECK PASS ep_engine_checks --busy-rank %d: N=%d, the others waited %.1f s for it (long wait)\n",
                  busy_rank, N, busy_s);
    return 0;
  }
  std::printf("%s: the forward ended although a rank left (this check expects every rank to fail)\n",
              comm.who().c_str());
  return 0;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
