// Chapter 06's command line: the options, their checks (the same verdict on every rank).
#pragma once
#include <optional>
#include <string>

#include "dist/communicator.hpp"
#include "moe/layer_problem.hpp"
#include "util/cli.hpp"

namespace eplab {

struct Ep06Options {
  CommonOptions common;
  LayerOptions layer;
  std::string placement = "linear";  // the map before balancing
  int steps = 4;                     // the window: forwards whose load the balancer sees
  int windows = 2;                   // windows to run; EPLB and a weight move after each but the last
  int redundant = -1;                // extra physical slots (replicas); -1: one per rank
  int groups = 1, nodes = 1;         // EPLB's expert groups and nodes (hierarchical when groups % nodes == 0)
  int hot = 2;                       // experts the tokens are pushed towards (skewed_tokens.hpp)
  double skew = 0.5;                 // how hard (0: plain random activations)
  int iters = 3;                     // timed forwards per step (medians)
  std::string trace;                 // chapter 05's --trace: plan from a real run's load instead (host only)
  int gpus = 0;                      // with --trace: GPUs to plan for (0: the traced run's ranks, else 4)
};

// Parses and checks the options on every rank (all or none); num_experts is checked later (it needs the model).
// A value: exit now with it (--help, or an error already printed).
std::optional<int> parse_ep06_options(dist::Communicator& mpi, int argc, char** argv, Ep06Options& o);

}  // namespace eplab
