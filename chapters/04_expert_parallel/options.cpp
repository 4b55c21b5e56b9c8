#include "options.hpp"

#include <cstdint>
#include <iostream>
#include <limits>

#include "ep_device.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

std::optional<int> parse_ep04_options(dist::Communicator& mpi, int argc, char** argv, Ep04Options& o) {
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
  app.add_option("--bench-tokens", o.bench_tokens, "tokens per rank for --bench")->capture_default_str();
  app.add_option("--bench-iters", o.bench_iters, "timed forwards per size for --bench")->capture_default_str();
  app.add_option("--chunks", o.chunks,
                 "GPU, inplace layout: cut each peer's dispatch message into N pieces, each sent as soon as it is "
                 "permuted, and combine the tokens that stayed home during the return exchange (1 = off; --bench "
                 "takes a list, e.g. --chunks 1 2 4 8; the CPU path ignores it)")
      ->capture_default_str();

  const int rank = mpi.rank();
  std::optional<int> early;
  dist::all_or_none(mpi, [&] {
    if (rank != 0) std::cout.setstate(std::ios::failbit);  // --help: printed once, by rank 0
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    if (early) return;
    require(o.iters >= 1, "--iters must be >= 1, got ", o.iters);
    require(o.bench_iters >= 1, "--bench-iters must be >= 1, got ", o.bench_iters);
    require(o.layer.tokens >= 0, "--tokens must be >= 0, got ", o.layer.tokens);
    require(std::int64_t(o.layer.tokens) * mpi.size() <= std::numeric_limits<int>::max(), "--tokens ", o.layer.tokens,
            " x ", mpi.size(), " ranks is more tokens than one batch can index (try fewer tokens)");
    for (int c : o.chunks)
      require(c >= 1 && c <= EpMoeGpu::kMaxChunks, "--chunks must be between 1 and ", EpMoeGpu::kMaxChunks, ", got ",
              c, " (1 = one message per peer)");
    require(o.bench || o.chunks.size() == 1, "--chunks takes one value (a list only with --bench)");
    require(o.bench || o.chunks[0] == 1 || o.layout == "inplace",
            "--chunks ", o.chunks[0], " pipelines the inplace layout only: add --layout inplace");
    require(!o.bench || o.common.device != "cpu", "--bench measures the NCCL path on GPUs; it has no CPU mode");
  });
  return early;
}

bool choose_gpu(dist::Communicator& mpi, const Ep04Options& o) {
  return o.bench || choose_ep_gpu(mpi, o.common.device);
}

}  // namespace eplab
