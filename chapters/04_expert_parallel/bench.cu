// Chapter 04's benchmark: the EP layer at Phi-tiny-MoE's shape (H 4096, I 448, 16 experts, top-2
// sparsemixer, bf16) with random weights made on each GPU, for several tokens-per-rank sizes:
//   * route / dispatch / experts / combine / total (max over ranks, median over forwards)
//   * dispatch+combine busbw, and a raw NCCL all-to-all-v of exactly the same byte counts measured in
//     the same run: their ratio is what the EP bookkeeping (plan, count exchange, permutes) costs
//   * the three exchange layouts (permute: all-to-all-v + local permutes; direct: per-expert segments;
//     inplace: experts straight on the arrival buffer, own rows outside NCCL). The raw all-to-all-v
//     always moves every row, own rows included (as nccl-tests counts the self-send), so for inplace
//     "d+c vs raw" compares our exchange of the remote rows plus all bookkeeping with NCCL moving all rows.
//   * chapter 02's single-GPU grouped layer on rank 0's GPU for the same N*T tokens
//   * the inplace layout once per --chunks value (1 = unchunked; C > 1: the chunked pipeline, see
//     kernels/ep/ep_moe_gpu.hpp), and for each a sub-stage timeline: `iters` more forwards run as a
//     model runs them (no drain between stages) with CUDA-event marks (ms since the forward's start;
//     rank 0 and the max over ranks, medians over forwards)
// Before a size is timed, sampled tokens of every rank are checked against the CPU reference.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <string>
#include <utility>

#include "cuda_check.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "ep_layer.hpp"
#include "ep_stats.hpp"
#include "moe/layer_check.hpp"
#include "moe_gpu.hpp"
#include "random_init.cuh"
#include "util/report.hpp"
#include "util/timer.hpp"

namespace eplab {

namespace {

constexpr int kSample = 8;  // tokens per rank checked against the CPU reference at each size

std::vector<int> sample_tokens(int T) {
  std::vector<int> s;
  for (int i = 0; i < std::min(T, kSample); ++i) s.push_back(int((long long)i * T / std::min(T, kSample)));
  return s;
}

// Chapter 02's layer on one GPU for `tokens` tokens: median ms of `iters` forwards (CUDA events).
double one_gpu_ms(const RandomLayerSpec& spec, const RouterCfg& rc, int tokens, int iters) {
  GpuMoeLayer layer(spec.hidden, spec.inter, spec.experts, rc.kind, rc.top_k, rc.jitter_eps, spec.seed);
  __nv_bfloat16 *x = nullptr, *y = nullptr;
  const std::size_t n = std::size_t(tokens) * spec.hidden;
  CUDA_CHECK(cudaMalloc(&x, n * 2));
  CUDA_CHECK(cudaMalloc(&y, n * 2));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  gpu::fill_random_bf16(x, n, 1.f, spec.seed + 99, s);
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < iters + 2; ++i) {  // two warm-ups (allocation, graph capture)
    CUDA_CHECK(cudaEventRecord(a, s));
    layer.forward_device(x, tokens, y, MoePath::Grouped, s);
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    if (i >= 2) ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(s);
  cudaFree(x);
  cudaFree(y);
  return median(ms);
}

// The marks of several timelines in one order. Each list is in the engine's fixed order and a variant may
// have marks another lacks (chunked: "local tokens combined"), so a new mark goes right after the mark
// that precedes it in its own list.
std::vector<std::string> merged_marks(const std::vector<std::pair<std::string, TimelineStats>>& tls) {
  std::vector<std::string> all;
  for (const auto& v : tls) {
    std::size_t at = 0;
    for (const std::string& m : v.second.marks) {
      auto f = std::find(all.begin(), all.end(), m);
      if (f == all.end()) f = all.insert(all.begin() + std::ptrdiff_t(std::min(at, all.size())), m);
      at = std::size_t(f - all.begin()) + 1;
    }
  }
  return all;
}

}  // namespace

nlohmann::json run_ep_bench(dist::Communicator& comm, PlacementKind pkind, const std::vector<int>& tokens, int iters,
                            std::uint64_t seed, const std::vector<int>& chunks, bool* pass) {
  const int rank = comm.rank(), N = comm.size();
  const RandomLayerSpec spec{4096, 448, 16, seed};
  const RouterCfg rc{RouterKind::SparseMixer, 2, 0.01f};
  std::optional<Placement> placement;
  dist::all_or_none(comm, [&] {
    for (int t : tokens) require(t >= 1, "--bench-tokens must be >= 1, got ", t);
    placement.emplace(pkind, spec.experts, N);
  });
  if (rank == 0) {
    std::printf("bench: Phi-tiny-MoE layer shape H=%d I=%d E=%d, top-2 sparsemixer, bf16, random weights; "
                "%d timed forwards per size\n",
                spec.hidden, spec.inter, spec.experts, iters);
    std::fputs(placement->str().c_str(), stdout);
  }
  // The full layer on rank 0's host, for the checks (made on the GPU, the same values every rank uses).
  MoeLayerWeights full;
  if (rank == 0) full = random_layer_weights(spec);

  *pass = true;
  nlohmann::json rows = nlohmann::json::array();
  Table table({"T/rank", "layout", "route", "dispatch", "experts", "combine", "total ms", "d+c busbw",
               "raw a2a ms", "raw busbw", "d+c vs raw", "1 GPU (ch02), N*T"});
  // What runs at each size: permute, direct, then inplace once per --chunks value.
  struct Variant {
    EpLayout layout;
    int chunks;
    std::string name;
  };
  std::vector<Variant> variants{{EpLayout::Permute, 1, "permute"}, {EpLayout::Direct, 1, "direct"}};
  for (int c : chunks) variants.push_back({EpLayout::InPlace, c, c == 1 ? "inplace" : strf("inplace c=%d", c)});
  std::vector<std::string> timelines;  // one table per size (rank 0)
  for (int T : tokens) {
    double single_ms = -1;
    std::vector<std::pair<std::string, TimelineStats>> tls;  // the inplace variants' timelines at this size
    for (const Variant& var : variants) {
      const EpLayout layout = var.layout;
      std::unique_ptr<EpLayer> layer;
      dist::all_or_none(comm, [&] {
        layer = make_gpu_ep_layer_random(comm, *placement, spec, T, rc, layout, var.chunks);
      });
      layer->forward();  // warm-up: buffers grow, cuBLAS picks its kernels, NCCL connects
      layer->forward();

      // --- check sampled tokens of every rank against the CPU reference
      const std::vector<int> pick = sample_tokens(T);
      const int n = int(pick.size()), H = spec.hidden;
      const std::vector<float> y = layer->output();
      const Routing r = layer->routing();
      const std::vector<bf16_bits> x = random_tokens(spec, rank, T);
      std::vector<float> ys(std::size_t(n) * H);
      std::vector<bf16_bits> xs(std::size_t(n) * H);
      std::vector<int> ids(std::size_t(n) * 2);
      std::vector<float> ws(ids.size());
      for (int i = 0; i < n; ++i) {
        std::copy_n(&y[std::size_t(pick[i]) * H], H, &ys[std::size_t(i) * H]);
        std::copy_n(&x[std::size_t(pick[i]) * H], H, &xs[std::size_t(i) * H]);
        for (int j = 0; j < 2; ++j) {
          ids[i * 2 + j] = r.id(pick[i], j);
          ws[i * 2 + j] = r.weight(pick[i], j);
        }
      }
      std::vector<float> ya(rank == 0 ? ys.size() * N : 0), wa(rank == 0 ? ws.size() * N : 0);
      std::vector<bf16_bits> xa(rank == 0 ? xs.size() * N : 0);
      std::vector<int> ia(rank == 0 ? ids.size() * N : 0);
      comm.gather(ys.data(), ys.size() * 4, ya.data(), 0);
      comm.gather(xs.data(), xs.size() * 2, xa.data(), 0);
      comm.gather(ids.data(), ids.size() * 4, ia.data(), 0);
      comm.gather(ws.data(), ws.size() * 4, wa.data(), 0);
      int ok = 1;
      if (rank == 0) {
        const std::vector<float> xf = bf16_to_float(std::span<const bf16_bits>(xa));
        const MoeRefResult ref = moe_layer_reference(full, xf, n * N, {rc.kind, 2, rc.jitter_eps, true});
        Routing rr;
        rr.tokens = n * N;
        rr.k = 2;
        rr.ids = ia;
        rr.weights = wa;
        const LayerCheck c = check_layer(ref, rr, ya, H, rc.kind, rc.jitter_eps, 1e-2);
        ok = c.pass;
        std::printf("check T=%d %s (%d sampled tokens per rank): %s %s\n", T, var.name.c_str(), n,
                    c.pass ? "PASS" : "FAIL", c.summary().c_str());
      }
      comm.bcast(&ok, sizeof ok, 0);
      *pass = *pass && ok;

      // --- time
      const StageStats st = time_forwards(*layer, comm, iters);
      const auto [raw_d, raw_c] = time_raw_exchange(*layer, comm, iters);
      TimelineStats tl;
      if (layout == EpLayout::InPlace) {
        tl = time_timeline(*layer, comm, iters);
        tls.emplace_back(var.name, tl);
      }
      const EpPlan& plan = layer->plan();
      const double S = mean_bytes_per_rank(plan, layer->dispatch_row_bytes());  // each direction
      const Bandwidth both = bandwidth(2 * S, st.dispatch_ms + st.combine_ms, N);
      const Bandwidth raw = bandwidth(2 * S, raw_d + raw_c, N);
      layer.reset();  // free this size's buffers before chapter 02's layer needs memory

      // Chapter 02's layer, once per size. Which ranks enter this block must not depend on anything
      // only some ranks know: single_ms is measured on rank 0 alone, so testing `single_ms < 0` here
      // sent rank 1 into two barriers at the second layout that rank 0 never called, and the ranks
      // deadlocked in mismatched MPI collectives (barrier vs the next size's allgather). The bcast
      // both ends the wait for rank 0 and gives every rank the same value.
      if (layout == EpLayout::Permute) {
        comm.barrier();
        if (rank == 0) single_ms = one_gpu_ms(spec, rc, N * T, iters);
        comm.bcast(&single_ms, sizeof single_ms, 0);
      }
      if (rank == 0) {
        const double ratio = (raw_d + raw_c) / std::max(st.dispatch_ms + st.combine_ms, 1e-9);
        table.add_row({std::to_string(T), var.name, strf("%.3f", st.route_ms), strf("%.3f", st.dispatch_ms),
                       strf("%.3f", st.experts_ms), strf("%.3f", st.combine_ms), strf("%.3f", st.total_ms),
                       strf("%.1f", both.busbw_gbps), strf("%.3f", raw_d + raw_c), strf("%.1f", raw.busbw_gbps),
                       strf("%.0f%%", 100 * ratio), strf("%.3f", single_ms)});
        nlohmann::json marks = nlohmann::json::array();
        for (std::size_t m = 0; m < tl.marks.size(); ++m)
          marks.push_back({{"mark", tl.marks[m]}, {"rank0_ms", tl.rank0_ms[m]}, {"max_ms", tl.max_ms[m]}});
        rows.push_back({{"tokens_per_rank", T},
                        {"layout", layout_name(layout)},
                        {"chunks", var.chunks},
                        {"timeline", marks},
                        {"route_ms", st.route_ms},
                        {"dispatch_ms", st.dispatch_ms},
                        {"experts_ms", st.experts_ms},
                        {"combine_ms", st.combine_ms},
                        {"total_ms", st.total_ms},
                        {"bytes_per_rank_each_way", S},
                        {"dc_busbw_gbps", both.busbw_gbps},
                        {"raw_ms", raw_d + raw_c},
                        {"raw_busbw_gbps", raw.busbw_gbps},
                        {"dc_vs_raw", ratio},
                        {"one_gpu_ch02_ms", single_ms},
                        {"check_pass", ok != 0}});
      }
    }
    // This size's timelines side by side: one row per mark, one column per inplace variant.
    if (rank == 0 && !tls.empty()) {
      std::vector<std::string> head{"mark (ms since start)"};
      for (const auto& v : tls) head.push_back(v.first + " r0 / max");
      Table tt(head);
      for (const std::string& mark : merged_marks(tls)) {
        std::vector<std::string> row{mark};
        for (const auto& v : tls) {
          const TimelineStats& t = v.second;
          const auto at = std::find(t.marks.begin(), t.marks.end(), mark);
          const std::size_t i = std::size_t(at - t.marks.begin());
          row.push_back(at == t.marks.end() ? "-" : strf("%.3f / %.3f", t.rank0_ms[i], t.max_ms[i]));
        }
        tt.add_row(row);
      }
      timelines.push_back(strf("\nsub-stage timeline at T=%d per rank (ms since the forward's start, GPU clock; median "
                               "of %d undrained forwards; rank 0 / max over ranks)\n",
                               T, iters) +
                          tt.str());
    }
  }
  if (rank == 0) {
    std::printf("\nEP layer on %d ranks (ms: max over ranks, median of %d forwards; busbw in GB/s as nccl-tests "
                "defines it for all-to-all: algbw * (N-1)/N, over the bytes of dispatch + combine)\n",
                N, iters);
    std::fputs(table.str().c_str(), stdout);
    std::printf("d+c vs raw: time of a plain all-to-all-v of the same bytes (both directions, own rows included, "
                "as nccl-tests counts them) / dispatch+combine time; the inplace layout keeps own rows out of NCCL. "
                "1 GPU (ch02): chapter 02's grouped layer on one GPU holding all experts, N*T tokens. "
                "inplace c=C: the chunked pipeline with C pieces per peer message.\n");
    for (const std::string& t : timelines) std::fputs(t.c_str(), stdout);
    if (!timelines.empty())
      std::printf(
          "marks: CUDA events on the stream where the work runs ((side) = the side stream of the permutes and of "
          "the chunked combines; the rest: comm.stream()). Read the gaps:\n"
          "  plan built -> counts on GPU           the NCCL count exchange (E ints per peer)\n"
          "  counts on GPU -> host has counts      the count table's copy to the host and the host's one wait\n"
          "  host has counts -> dispatch exchange  NCCL moving the rows that travel; it waits for the remote "
          "permute (chunked: only for each piece's own permute)\n"
          "  experts done -> return exchange done  NCCL bringing the rows back\n"
          "  return exchange done -> combine done  combine work left after the last row came back (chunked: "
          "the last piece's tokens, and class combines still queued)\n"
          "  combine done                          the whole forward with no drains (compare: total ms above, "
          "measured with a drain after each stage)\n");
  }
  return {{"chapter", "04_expert_parallel"}, {"bench", true}, {"ranks", N}, {"device", comm.describe()},
          {"placement", placement_name(pkind)}, {"chunks", chunks}, {"rows", rows}, {"pass", *pass}};
}

}  // namespace eplab
