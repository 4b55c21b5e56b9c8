// Chapter 04's command line: the options, their checks (the same verdict on every rank), and where to run.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "dist/communicator.hpp"
#include "moe/layer_problem.hpp"
#include "util/cli.hpp"

namespace eplab {

struct Ep04Options {
  CommonOptions common;
  LayerOptions layer;
  std::string placement = "linear";
  std::string layout = "permute";
  int iters = 3;
  bool bench = false;
  std::vector<int> bench_tokens{128, 1024, 4096, 16384};
  int bench_iters = 20;
  std::vector<int> chunks{1};  // the inplace layout's chunked pipeline; --bench takes a list
};

// Parses and checks the options on every rank (all or none). A value: exit now with it (--help, or an
// error already printed).
std::optional<int> parse_ep04_options(dist::Communicator& mpi, int argc, char** argv, Ep04Options& o);

// --device auto|gpu|cpu (and --bench, GPU only) -> whether this run takes the NCCL path; the same answer on
// every rank. With auto, every rank must have a GPU of its own.
bool choose_gpu(dist::Communicator& mpi, const Ep04Options& o);

}  // namespace eplab
