#include "options.hpp"

#include <iostream>

#include "util/check.hpp"

namespace eplab {

std::optional<int> parse_ep06_options(dist::Communicator& mpi, int argc, char** argv, Ep06Options& o) {
  CLI::App app{"Chapter 06: load balancing - measured expert load, EPLB with redundant experts, before and after "
               "(mpirun -np N; NCCL on GPUs, MPI on the CPU)"};
  add_common_options(app, o.common);
  add_layer_options(app, o.layer);
  app.get_option("--tokens")->description("tokens per rank and step");
  app.add_option("--steps", o.steps, "forwards in the load window (the balancer sees their summed load)")
      ->capture_default_str();
  app.add_option("--windows", o.windows,
                 "windows of --steps forwards; after each but the last, EPLB on its load and the expert weights "
                 "move to the new map (2: before and after)")
      ->capture_default_str();
  app.add_option("--placement", o.placement, "the expert map before balancing: linear or round-robin")
      ->check(CLI::IsMember({"linear", "round-robin"}))
      ->capture_default_str();
  app.add_option("--redundant", o.redundant,
                 "extra physical expert slots for replicas of hot experts (default: one per rank); experts + "
                 "redundant must split evenly over the ranks");
  app.add_option("--groups", o.groups, "expert groups (EPLB's hierarchical policy packs groups onto nodes)")
      ->capture_default_str();
  app.add_option("--nodes", o.nodes, "nodes the ranks are spread over (hierarchical when groups % nodes == 0)")
      ->capture_default_str();
  app.add_option("--hot", o.hot, "experts the tokens are pushed towards (0: no skew)")->capture_default_str();
  app.add_option("--skew", o.skew, "how hard tokens are pushed towards the hot experts (0: uniform routing)")
      ->capture_default_str();
  app.add_option("--iters", o.iters, "timed forwards per step (medians)")->capture_default_str();
  app.add_option("--trace", o.trace,
                 "instead of running the layer: the load of a real run, from chapter 05's --trace file, and what "
                 "EPLB makes of it for every layer (any -np; rank 0 does the work)");
  app.add_option("--gpus", o.gpus, "with --trace: GPUs to plan for (default: the traced run's ranks, or 4)");

  std::optional<int> early;
  dist::all_or_none(mpi, [&] {
    if (mpi.rank() != 0) std::cout.setstate(std::ios::failbit);  // --help: printed once, by rank 0
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    if (early) return;
    const int N = mpi.size();
    require(N >= 2 || !o.trace.empty(), "load balancing spreads experts over ranks: run with mpirun -np 2 or more "
            "(CPU ranks work on any machine: --device cpu)");
    require(o.gpus >= 0, "--gpus must be >= 1 (0: the traced run's ranks), got ", o.gpus);
    require(o.gpus == 0 || !o.trace.empty(), "--gpus goes with --trace (otherwise the ranks are the GPUs)");
    require(o.layer.tokens >= 1, "--tokens must be >= 1, got ", o.layer.tokens);
    require(o.steps >= 1, "--steps must be >= 1, got ", o.steps);
    require(o.windows >= 2, "--windows must be >= 2 (a window to measure, one to run the balanced map), got ",
            o.windows);
    require(o.iters >= 1, "--iters must be >= 1, got ", o.iters);
    require(app.count("--redundant") == 0 || o.redundant >= 0, "--redundant must be >= 0, got ", o.redundant);
    require(o.groups >= 1 && o.nodes >= 1, "--groups and --nodes must be >= 1");
    require(!o.trace.empty() || N % o.nodes == 0, N, " ranks do not split evenly over --nodes ", o.nodes);
    require(o.hot >= 0, "--hot must be >= 0, got ", o.hot);
    require(o.skew >= 0, "--skew must be >= 0, got ", o.skew);

  });
  return early;
}

}  // namespace eplab
