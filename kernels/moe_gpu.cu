// GpuMoeLayer: one MoE layer on one GPU, stringing the topic kernels together (API in moe_gpu.hpp).
//
//   naive:   router_logits -> route_topk -> naive_moe
//   grouped: router_logits -> route_topk -> build_dispatch_plan -> permute_rows -> grouped_experts
//            -> unpermute_combine
//
// Weights on the GPU: gate [E, H]; w13 [E, 2I, H] (expert e: I rows of w1, then I rows of w3, the layout
// grouped_experts reads, so its first GEMM is ONE GEMM per expert with N = 2I); w2 [E, H, I]. naive_moe
// takes w1 and w3 as separate [E, I, H] tensors, so the naive path gets its own copies, split from w13 on
// the GPU the first time it runs (one layer of Phi-tiny: +117 MB; chapters that never run it pay nothing).
//
// Small batches (rows = T*k <= small_rows_max, weight streaming) take a shorter, token-direct chain:
//   router_route_fused (router GEMM + routing, one kernel) -> experts_direct (w13+SwiGLU, then w2 +
//   weighted combine), 3 kernels instead of 7: the experts read x rows through d_ids and write y
//   directly, so there is no dispatch plan, no permuted copy and no combine pass. At T = 1 each launch
//   in the chain costs a few microseconds of latency next to ~5 us of weight streaming, so the kernel
//   count is what sets the time. (EPLAB_DIRECT=0 turns it off, for comparison.)
//
// Host synchronisation: none on the naive path, none on the grouped path while grouped_experts streams
// weights (small batches). The cuBLAS strategies need the per-expert row counts on the host: the offsets
// are copied back right after the dispatch plan, permute_rows is enqueued, and only then does the host
// wait for the copy, so the GPU permutes while the host waits and then enqueues the GEMMs.
//
// Launch overhead: a small-batch forward is ~10 short kernels, and at T = 1 the whole layer is ~20 us
// of GPU time, so launching them one by one from the host would cost as much as running them. Forwards
// without a host sync are therefore captured into a CUDA graph (on a private stream, in thread-local
// capture mode so that any forbidden call fails the capture instead of running outside it) the second
// time the same (T, path, x, y, buffers) comes by, and replayed with one cudaGraphLaunch after that. If a
// capture fails, the layer says so once on stderr and runs without graphs.
//
// cublas-padded (Auto above the small-batch rows; measured in grouped_experts.cuh): the permute writes x straight into the padded
// layout [E, M_pad, H] (padded_layout.cuh; M_pad found on the GPU from the offsets, capped), the experts are two
// strided-batched GEMMs over it, and the combine reads it back: the same kernel count as the other cuBLAS
// strategies, no extra pass. xp and yp are then sized for E x the cap rows (2 x rows at the default ratio).
//
// Buffers grow to the largest T seen and are never shrunk: after one forward at the largest T (and one
// more for the graph capture) forward_device allocates nothing.
#include "moe_gpu.hpp"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "combine.cuh"
#include "cuda_check.hpp"
#include "experts_decode.cuh"
#include "grouped_experts.cuh"
#include "naive_moe.cuh"
#include "padded_layout.cuh"
#include "permute.cuh"
#include "random_init.cuh"
#include "router.cuh"
#include "router_tiled.cuh"
#include "routing.cuh"

namespace eplab {

using gpu::bf16;
static_assert(sizeof(bf16) == sizeof(bf16_bits), "bf16_bits and __nv_bfloat16 must have the same layout");

namespace {

template <typename T>
void grow(T*& p, std::size_t& cap, std::size_t need) {
  if (need <= cap && p) return;
  if (p) CUDA_CHECK(cudaFree(p));
  p = nullptr;
  cap = 0;
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(need, 1) * sizeof(T)));
  cap = need;
}

template <typename T>
void dev_free(T*& p) {
  if (p) cudaFree(p);  // destructor path: errors ignored
  p = nullptr;
}

gpu::GroupedStrategy to_gpu(ExpertStrategy s) {
  switch (s) {
    case ExpertStrategy::Auto: return gpu::GroupedStrategy::Auto;
    case ExpertStrategy::WeightStream: return gpu::GroupedStrategy::WeightStream;
    case ExpertStrategy::CublasGrouped: return gpu::GroupedStrategy::CublasGrouped;
    case ExpertStrategy::CublasLoop: return gpu::GroupedStrategy::CublasLoop;
    case ExpertStrategy::CublasStreams: return gpu::GroupedStrategy::CublasStreams;
    case ExpertStrategy::CublasPadded: return gpu::GroupedStrategy::CublasPadded;
  }
  return gpu::GroupedStrategy::Auto;
}

ExpertStrategy from_gpu(gpu::GroupedStrategy s) {
  switch (s) {
    case gpu::GroupedStrategy::Auto: return ExpertStrategy::Auto;
    case gpu::GroupedStrategy::WeightStream: return ExpertStrategy::WeightStream;
    case gpu::GroupedStrategy::CublasGrouped: return ExpertStrategy::CublasGrouped;
    case gpu::GroupedStrategy::CublasLoop: return ExpertStrategy::CublasLoop;
    case gpu::GroupedStrategy::CublasStreams: return ExpertStrategy::CublasStreams;
    case gpu::GroupedStrategy::CublasPadded: return ExpertStrategy::CublasPadded;
  }
  return ExpertStrategy::Auto;
}

constexpr int kMaxGraphs = 16;  // e.g. the benchmark rotates over 8 input batches

}  // namespace

const char* expert_strategy_name(ExpertStrategy s) { return gpu::grouped_strategy_name(to_gpu(s)); }

const char* router_impl_name(RouterImpl r) {
  switch (r) {
    case RouterImpl::Auto: return "auto";
    case RouterImpl::Cublas: return "cublas";
    case RouterImpl::Fused: return "fused";
    case RouterImpl::Tiled: return "tiled";
  }
  return "?";
}

RouterImpl parse_router_impl(const std::string& name) {
  for (RouterImpl r : {RouterImpl::Auto, RouterImpl::Cublas, RouterImpl::Fused, RouterImpl::Tiled})
    if (name == router_impl_name(r)) return r;
  fail("unknown router implementation '", name, "': use auto, cublas, fused or tiled");
}

ExpertStrategy parse_expert_strategy(const std::string& name) {
  for (ExpertStrategy s : {ExpertStrategy::Auto, ExpertStrategy::WeightStream, ExpertStrategy::CublasGrouped,
                           ExpertStrategy::CublasLoop, ExpertStrategy::CublasStreams, ExpertStrategy::CublasPadded})
    if (name == expert_strategy_name(s)) return s;
  fail("unknown expert strategy '", name,
       "': use auto, weight-stream, cublas-grouped, cublas-loop, cublas-streams or cublas-padded");
}

struct GpuMoeLayer::Impl {
  int H = 0, I = 0, E = 0, k = 0;
  RouterKind router = RouterKind::SparseMixer;
  float eps = 0.f;

  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;   // forward()'s stream
  cudaStream_t capture = nullptr;  // private stream that graph captures are recorded on
  // Stage boundaries for time_stages: 0 start, 1 router, 2 routing, 3 permute, 4 experts, 5 combine,
  // 6 experts start (after the host's wait for the offsets on the cuBLAS paths, else = 3).
  cudaEvent_t ev[7] = {};
  cudaEvent_t ev_offsets = nullptr;
  // time_stages_queued: busy-wait length (0 = off, the normal forward) and what the last queued run saw.
  float spin_us = 0.f;
  cudaEvent_t ev_spin = nullptr;  // after the latest busy-wait
  int queue_misses = 0;

  bf16 *d_gate = nullptr, *d_w13 = nullptr, *d_w2 = nullptr;
  bf16 *d_w1 = nullptr, *d_w3 = nullptr;  // naive path only, split from w13 on first use

  // Per-token scratch, sized for cap_T tokens.
  int cap_T = 0;
  std::size_t c_logits = 0, c_ids = 0, c_wts = 0, c_counts = 0, c_offsets = 0, c_row_of = 0, c_assign = 0, c_xp = 0,
              c_yp = 0, c_xio = 0, c_yio = 0;
  float* d_logits = nullptr;
  int* d_ids = nullptr;
  float* d_weights = nullptr;
  int *d_counts = nullptr, *d_offsets = nullptr, *d_row_of = nullptr, *d_assignment = nullptr;
  bf16 *d_xp = nullptr, *d_yp = nullptr;
  bf16 *d_xio = nullptr, *d_yio = nullptr;  // forward()'s device copies of x and y
  int* h_offsets = nullptr;                 // pinned [E+1]

  gpu::GroupedWorkspace ws;
  gpu::TiledRouterWorkspace rws;  // router_route_tiled's split-K partials and tile counters
  unsigned generation = 0;  // bumped when a layer buffer is reallocated

  // CUDA graphs.
  struct Key {
    int T = 0;
    MoePath path = MoePath::Naive;
    const void* x = nullptr;
    void* y = nullptr;
    unsigned long long gen = 0;
    bool operator==(const Key& o) const {
      return T == o.T && path == o.path && x == o.x && y == o.y && gen == o.gen;
    }
  };
  struct Graph {
    Key key;
    cudaGraphExec_t exec = nullptr;
  };
  bool use_graphs = true, graphs_broken = false;
  int fused_router_max_t = 512;  // router_route_fused up to this T, cuBLAS + route_topk above (EPLAB_FUSED_ROUTER_MAX_T)
  bool use_direct = true;  // EPLAB_DIRECT=0: the decode path goes through plan + permute + combine instead
  // Router: Auto = router_route_tiled wherever it runs (E <= 64, H % 8 == 0, aligned), else the fused
  // per-token kernel up to fused_router_max_t, else cuBLAS + route_topk. EPLAB_ROUTER=cublas|fused|tiled forces one
  // (fused / tiled fall back when they cannot run the shape).
  RouterImpl router_impl = RouterImpl::Auto;
  int router_splits = 0;  // the tiled router's split-K count (0: its automatic choice; EPLAB_ROUTER_SPLITS)
  // direct path with T*k <= 32: which expert kernels (DecodeKernels, EPLAB_DECODE=direct|decode|hybrid).
  // Hybrid: measured fastest at T = 1 on an H200 (notes/perf-02.md, v7).
  DecodeKernels decode_kernels = DecodeKernels::Hybrid;
  bool use_pdl = true;     // programmatic dependent launch for experts_decode (EPLAB_PDL=0: off)
  std::vector<Graph> graphs;                      // oldest first
  std::vector<std::pair<int, MoePath>> warm;      // (T, path) already run eagerly at the current buffers
  unsigned long long graphs_gen = ~0ull;

  Impl(int hidden, int inter, int experts, RouterKind r, int top_k, float jitter_eps) {
    require(hidden > 0 && inter > 0, "GpuMoeLayer: hidden and inter must be > 0, got ", hidden, " and ", inter);
    require(experts >= 1, "GpuMoeLayer: need at least one expert, got ", experts);
    require(top_k >= 1 && top_k <= experts, "GpuMoeLayer: top-k must be in [1, ", experts, "], got ", top_k);
    require(r != RouterKind::SparseMixer || top_k == 2, "GpuMoeLayer: sparsemixer routes exactly 2 experts, got top-k ",
            top_k);
    H = hidden, I = inter, E = experts, k = top_k, router = r, eps = jitter_eps;
    CUBLAS_CHECK(cublasCreate(&blas));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
    for (auto& e : ev) CUDA_CHECK(cudaEventCreate(&e));
    CUDA_CHECK(cudaEventCreateWithFlags(&ev_offsets, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&ev_spin, cudaEventDisableTiming));
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&h_offsets), std::size_t(E + 1) * sizeof(int)));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_gate), std::size_t(E) * H * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_w13), std::size_t(E) * 2 * I * H * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_w2), std::size_t(E) * H * I * sizeof(bf16)));
    ws.auto_padded = true;  // Auto above the small-batch rows: cublas-padded (measured fastest, grouped_experts.cuh)
    read_environment();
  }

  ~Impl() {
    clear_graphs();
    dev_free(d_gate), dev_free(d_w13), dev_free(d_w2), dev_free(d_w1), dev_free(d_w3);
    dev_free(d_logits), dev_free(d_ids), dev_free(d_weights), dev_free(d_counts), dev_free(d_offsets);
    dev_free(d_row_of), dev_free(d_assignment), dev_free(d_xp), dev_free(d_yp), dev_free(d_xio), dev_free(d_yio);
    if (h_offsets) cudaFreeHost(h_offsets);
    for (auto& e : ev)
      if (e) cudaEventDestroy(e);
    if (ev_offsets) cudaEventDestroy(ev_offsets);
    if (ev_spin) cudaEventDestroy(ev_spin);
    if (capture) cudaStreamDestroy(capture);
    if (stream) cudaStreamDestroy(stream);
    if (blas) cublasDestroy(blas);
  }

  void read_environment() {
    if (const char* s = std::getenv("EPLAB_EXPERTS"); s && *s) ws.strategy = to_gpu(parse_expert_strategy(s));
    if (const char* s = std::getenv("EPLAB_SMALL_ROWS"); s && *s) {
      char* end = nullptr;
      const long v = std::strtol(s, &end, 10);
      require(end && *end == '\0' && v >= 0 && v < (1L << 30), "EPLAB_SMALL_ROWS must be a row count >= 0, got '", s,
              "'");
      ws.small_rows_max = int(v);
    }
    if (const char* s = std::getenv("EPLAB_EXPERT_STREAMS"); s && *s) {
      const int v = std::atoi(s);
      require(v >= 1 && v <= 8, "EPLAB_EXPERT_STREAMS must be 1..8, got '", s, "'");
      ws.streams = v;
    }
    if (const char* s = std::getenv("EPLAB_PADDED_RATIO"); s && *s) {
      char* end = nullptr;
      const double v = std::strtod(s, &end);
      require(end && *end == '\0' && v >= 1.0 && v <= 64.0, "EPLAB_PADDED_RATIO must be a number in [1, 64], got '",
              s, "'");
      ws.padded_max_ratio = float(v);
    }
    if (const char* s = std::getenv("EPLAB_GRAPHS"); s && std::string(s) == "0") use_graphs = false;
    if (const char* s = std::getenv("EPLAB_DIRECT"); s && std::string(s) == "0") use_direct = false;
    if (const char* s = std::getenv("EPLAB_FUSED_ROUTER_MAX_T"); s && *s) fused_router_max_t = std::atoi(s);
    if (const char* s = std::getenv("EPLAB_ROUTER"); s && *s) router_impl = parse_router_impl(s);
    if (const char* s = std::getenv("EPLAB_ROUTER_SPLITS"); s && *s) {
      char* end = nullptr;
      const long v = std::strtol(s, &end, 10);
      require(end && *end == '\0' && v >= 0 && v <= 4096, "EPLAB_ROUTER_SPLITS must be 0 (automatic) or a split count, got '",
              s, "'");
      router_splits = int(v);
    }
    if (const char* s = std::getenv("EPLAB_DECODE"); s && *s) decode_kernels = parse_decode_kernels(s);
    if (const char* s = std::getenv("EPLAB_PDL"); s && std::string(s) == "0") use_pdl = false;
  }

  gpu::ExpertWeightsDevice experts() const { return {d_w13, d_w2, E, H, I}; }

  // ---- buffers -------------------------------------------------------------------------------------

  void ensure_tokens(int T) {
    if (T <= cap_T) return;
    const std::size_t t = std::size_t(T), rows = t * k;
    grow(d_logits, c_logits, t * E);
    grow(d_ids, c_ids, rows);
    grow(d_weights, c_wts, rows);
    grow(d_counts, c_counts, std::size_t(E));
    grow(d_offsets, c_offsets, std::size_t(E) + 1);
    grow(d_row_of, c_row_of, rows);
    grow(d_assignment, c_assign, rows);
    grow(d_xp, c_xp, rows * H);
    grow(d_yp, c_yp, rows * H);
    cap_T = T;
    ++generation;
  }

  void ensure_naive_weights() {
    if (d_w1) return;
    const std::size_t per = std::size_t(I) * H;
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_w1), std::size_t(E) * per * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_w3), std::size_t(E) * per * sizeof(bf16)));
    for (int e = 0; e < E; ++e) {
      CUDA_CHECK(cudaMemcpyAsync(d_w1 + e * per, d_w13 + 2 * e * per, per * sizeof(bf16), cudaMemcpyDeviceToDevice,
                                 stream));
      CUDA_CHECK(cudaMemcpyAsync(d_w3 + e * per, d_w13 + (2 * e + 1) * per, per * sizeof(bf16),
                                 cudaMemcpyDeviceToDevice, stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    ++generation;
  }

  // Everything a forward of T tokens on `path` needs, allocated now (never inside a capture).
  void prepare(int T, MoePath path) {
    ensure_tokens(T);
    if (path == MoePath::Naive) ensure_naive_weights();
    if (path == MoePath::Grouped) {
      gpu::reserve_grouped_workspace(ws, experts(), T * k);
      if (const int m_cap = padded_cap(T)) {  // permute_rows_padded writes up to E * m_cap rows into xp
        const std::size_t need = std::max<std::size_t>(std::size_t(T) * k, std::size_t(E) * m_cap) * H;
        const std::size_t xp_before = c_xp, yp_before = c_yp;
        grow(d_xp, c_xp, need);
        grow(d_yp, c_yp, need);
        if (c_xp != xp_before || c_yp != yp_before) ++generation;
      }
    }
    if (gpu::router_route_tiled_ok(d_gate, d_gate, H, E)) gpu::reserve_router_tiled(rws, T, H, E, router_splits);
    const unsigned long long g = (static_cast<unsigned long long>(generation) << 40) ^
                                 (static_cast<unsigned long long>(ws.generation) << 20) ^ rws.generation;
    if (g != graphs_gen) {  // some buffer moved: every captured graph points at freed memory
      clear_graphs();
      warm.clear();
      graphs_gen = g;
    }
  }

  // ---- the forward ---------------------------------------------------------------------------------

  // cublas-padded's cap on M_pad for T tokens when the grouped path runs it (0: it does not). The permute
  // then writes the padded layout whenever M_pad <= this (decided on the GPU, checked again on the host).
  int padded_cap(int T) const {
    const int rows = T * k;
    if (rows == 0 || gpu::choose_grouped_strategy(ws, experts(), rows, d_xp, d_yp) != gpu::GroupedStrategy::CublasPadded)
      return 0;
    return gpu::padded_capacity_per_expert(ws.padded_max_ratio, E, rows);
  }

  // time_stages_queued: the busy-wait in front of a stretch of the forward, and the check that it was still
  // running when the host had queued the stretch (else the GPU may have waited for the host after all).
  void spin_start(cudaStream_t s) {
    gpu_busy_wait(s, spin_us);
    CUDA_CHECK(cudaEventRecord(ev_spin, s));
  }
  void spin_check() {
    const cudaError_t q = cudaEventQuery(ev_spin);
    if (q == cudaSuccess) ++queue_misses;
    else if (q != cudaErrorNotReady) CUDA_CHECK(q);
  }

  // Enqueues one forward on s. ev != nullptr: records the 7 stage-boundary events (see ev).
  void enqueue(const bf16* d_x, int T, bf16* d_y, MoePath path, cudaStream_t s, cudaEvent_t* evs) {
    auto mark = [&](int i) {
      if (evs) CUDA_CHECK(cudaEventRecord(evs[i], s));
      if (i == 3) mark_experts_start(s, evs);  // paths without a host wait: experts start where permute ends
    };
    const int rows = T * k;
    if (spin_us > 0) spin_start(s);
    mark(0);
    if (path == MoePath::Grouped && direct_path(d_x, T, d_y)) {
      // Small batches: 3 kernels, no plan, no permute, no combine (see the header).
      route(d_x, T, s, mark);
      mark(2);
      mark(3);
      const bool hybrid = decode_kernels == DecodeKernels::Hybrid;
      if (decode_kernels != DecodeKernels::Direct && gpu::experts_decode_ok(experts(), d_x, d_y, T, k) &&
          (!hybrid || gpu::experts_direct_ok(experts(), d_x, d_y, T, k)))
        gpu::experts_decode(experts(), d_x, d_ids, d_weights, T, k, d_y, ws, s, use_pdl && evs == nullptr, hybrid);
      else
        gpu::experts_direct(experts(), d_x, d_ids, d_weights, T, k, d_y, ws, s);
      mark(4);
      mark(5);
      return;
    }
    route(d_x, T, s, mark);
    mark(2);
    if (path == MoePath::Naive) {
      mark(3);
      gpu::naive_moe(d_x, d_ids, d_weights, T, k, H, I, d_w1, d_w3, d_w2, d_y, s);
      mark(4);
      mark(5);
      return;
    }
    gpu::build_dispatch_plan(d_ids, T, k, E, d_counts, d_offsets, d_row_of, d_assignment, s);
    const gpu::GroupedStrategy st = gpu::choose_grouped_strategy(ws, experts(), rows, d_xp, d_yp);
    const bool need_host = gpu::grouped_strategy_needs_host_offsets(st);
    if (need_host) {  // start the copy now, wait for it only after permute_rows is enqueued
      CUDA_CHECK(cudaMemcpyAsync(h_offsets, d_offsets, std::size_t(E + 1) * sizeof(int), cudaMemcpyDeviceToHost, s));
      CUDA_CHECK(cudaEventRecord(ev_offsets, s));
    }
    // cublas-padded: x goes straight into the padded layout (no extra pass), unless M_pad > m_cap, which the
    // permute kernel sees on the GPU and the host below sees in the same offsets.
    const int m_cap = padded_cap(T);
    if (m_cap)
      gpu::permute_rows_padded(d_x, d_offsets, d_assignment, T, k, E, m_cap, H, d_xp, s);
    else
      gpu::permute_rows(d_x, d_assignment, rows, k, H, d_xp, s);
    if (evs) CUDA_CHECK(cudaEventRecord(evs[3], s));
    if (need_host) {
      if (spin_us > 0) spin_check();
      CUDA_CHECK(cudaEventSynchronize(ev_offsets));
      if (spin_us > 0) spin_start(s);  // the GEMMs, SwiGLU and combine get queued behind this one
    }
    mark_experts_start(s, evs);
    if (m_cap) {
      const int m_pad = gpu::padded_rows_per_expert(h_offsets, E);
      if (m_pad > 0 && m_pad <= m_cap) {
        gpu::grouped_experts_padded(blas, experts(), d_xp, h_offsets, m_pad, d_yp, ws, s);
        mark(4);
        gpu::unpermute_combine_padded(d_yp, E * m_pad, d_ids, d_row_of, d_offsets, m_pad, d_weights, T, k, E, H, d_y,
                                      s);
        mark(5);
        return;
      }
      // xp holds contiguous rows: grouped_experts sees the same M_pad > cap and runs cublas-streams.
    }
    gpu::grouped_experts(blas, experts(), d_xp, d_offsets, need_host ? h_offsets : nullptr, rows, d_yp, ws, s);
    mark(4);
    gpu::unpermute_combine(d_yp, d_row_of, d_weights, T, k, H, d_y, s);
    mark(5);
  }

  void mark_experts_start(cudaStream_t s, cudaEvent_t* evs) {
    if (evs) CUDA_CHECK(cudaEventRecord(evs[6], s));
  }

  RouterImpl resolve_router(const bf16* d_x, int T) const {
    const bool tiled_ok = gpu::router_route_tiled_ok(d_x, d_gate, H, E);
    const bool fused_ok = gpu::router_route_fused_ok(d_x, d_gate, H);
    switch (router_impl) {
      case RouterImpl::Cublas: return RouterImpl::Cublas;
      case RouterImpl::Fused: return fused_ok ? RouterImpl::Fused : RouterImpl::Cublas;
      case RouterImpl::Tiled: return tiled_ok ? RouterImpl::Tiled : RouterImpl::Cublas;
      case RouterImpl::Auto: break;
    }
    if (tiled_ok) return RouterImpl::Tiled;
    // Measured on an H200 (Phi-tiny gate, 16 x 4096), whole layer: T = 512 0.1435 ms fused vs 0.1486 ms
    // with cuBLAS + route_topk; T = 4096 0.442 vs 0.383 ms (the fused kernel re-reads the 128 KB gate
    // from L2 per token, 512 MB at T = 4096), so cuBLAS from T = 513 on.
    return fused_ok && T <= fused_router_max_t ? RouterImpl::Fused : RouterImpl::Cublas;
  }

  // Router GEMM + routing into d_logits / d_ids / d_weights. mark(1) after the logits (the routing is part of
  // the router stage for the fused and tiled kernels).
  template <typename Mark>
  void route(const bf16* d_x, int T, cudaStream_t s, Mark&& mark) {
    last_router = resolve_router(d_x, T);
    switch (last_router) {
      case RouterImpl::Tiled:
        gpu::router_route_tiled(d_x, d_gate, T, H, E, k, router, eps, d_logits, d_ids, d_weights, rws, s, router_splits);
        mark(1);
        break;
      case RouterImpl::Fused:
        gpu::router_route_fused(d_x, d_gate, T, H, E, k, router, eps, d_logits, d_ids, d_weights, s);
        mark(1);
        break;
      default:
        gpu::router_logits(blas, d_x, d_gate, T, H, E, d_logits, s);
        mark(1);
        gpu::route_topk(d_logits, T, E, k, router, eps, d_ids, d_weights, s);
    }
  }
  RouterImpl last_router = RouterImpl::Auto;

  // The token-direct decode path: weight streaming chosen for this T and its kernels can run the shape.
  bool direct_path(const bf16* d_x, int T, const bf16* d_y) const {
    return use_direct &&
           gpu::choose_grouped_strategy(ws, experts(), T * k, d_xp, d_yp) == gpu::GroupedStrategy::WeightStream &&
           gpu::experts_direct_ok(experts(), d_x, d_y, T, k);
  }

  bool graphable(int T, MoePath path) const {
    if (!use_graphs || graphs_broken) return false;
    if (path == MoePath::Naive) return true;
    return gpu::choose_grouped_strategy(ws, experts(), T * k, d_xp, d_yp) == gpu::GroupedStrategy::WeightStream;
  }

  bool is_warm(int T, MoePath path) const {
    return std::find(warm.begin(), warm.end(), std::make_pair(T, path)) != warm.end();
  }

  void clear_graphs() {
    for (auto& g : graphs)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    graphs.clear();
  }

  void give_up_graphs(const char* why, cudaError_t err) {
    (void)cudaGetLastError();  // capture errors are not sticky; clear them so the eager run starts clean
    graphs_broken = true;
    std::fprintf(stderr, "note: GpuMoeLayer: CUDA graph capture failed (%s: %s); running without graphs\n", why,
                 cudaGetErrorString(err));
  }

  // Records one forward into a graph (nothing runs). Returns the executable graph or nullptr.
  cudaGraphExec_t capture_graph(const bf16* d_x, int T, bf16* d_y, MoePath path) {
    CUDA_CHECK(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
    std::string error;
    try {
      enqueue(d_x, T, d_y, path, capture, nullptr);
    } catch (const std::exception& e) {
      error = e.what();
    }
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(capture, &graph);
    if (!error.empty() || end != cudaSuccess || !graph) {
      if (graph) cudaGraphDestroy(graph);
      give_up_graphs(error.empty() ? "cudaStreamEndCapture" : error.c_str(), end);
      return nullptr;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (inst != cudaSuccess) {
      give_up_graphs("cudaGraphInstantiate", inst);
      return nullptr;
    }
    return exec;
  }

  int last_T = 0;  // rows of the last forward (last_routing)

  // The stage split from the events of the last timed enqueue (queued: experts from the experts-start event).
  MoeTimings read_timings(bool queued) const {
    auto ms = [&](int a, int b) {
      float t = 0;
      CUDA_CHECK(cudaEventElapsedTime(&t, ev[a], ev[b]));
      return t;
    };
    MoeTimings r;
    r.router_ms = ms(0, 1);
    r.routing_ms = ms(1, 2);
    r.permute_ms = ms(2, 3);
    r.experts_ms = queued ? ms(6, 4) : ms(3, 4);
    r.combine_ms = ms(4, 5);
    r.offsets_wait_ms = queued ? 0.f : ms(3, 6);
    r.total_ms = queued ? r.router_ms + r.routing_ms + r.permute_ms + r.experts_ms + r.combine_ms : ms(0, 5);
    return r;
  }

  MoeTimings time_stages_queued(const bf16* d_x, int T, bf16* d_y, MoePath path, cudaStream_t s, float spin) {
    require(T >= 0, "GpuMoeLayer::time_stages_queued: tokens must be >= 0, got ", T);
    require(spin > 0 && spin <= 1e5f, "GpuMoeLayer::time_stages_queued: busy-wait ", spin,
            " us is outside (0, 100000]");
    last_T = T;
    if (T == 0) return {};
    prepare(T, path);
    spin_us = spin;
    queue_misses = 0;
    try {
      enqueue(d_x, T, d_y, path, s, ev);
    } catch (...) {
      spin_us = 0.f;
      throw;
    }
    spin_check();  // the last busy-wait must still be running now that everything is queued
    spin_us = 0.f;
    CUDA_CHECK(cudaEventSynchronize(ev[5]));
    MoeTimings r = read_timings(true);
    r.queue_misses = queue_misses;
    return r;
  }

  void forward_device(const bf16* d_x, int T, bf16* d_y, MoePath path, cudaStream_t s) {
    last_T = T;
    require(T >= 0, "GpuMoeLayer::forward_device: tokens must be >= 0, got ", T);
    if (T == 0) return;
    prepare(T, path);
    if (graphable(T, path)) {
      const Key key{T, path, d_x, d_y, graphs_gen};
      if (path == MoePath::Grouped) ws.last_used = gpu::GroupedStrategy::WeightStream;  // what the graph runs
      for (auto& g : graphs)
        if (g.key == key) {
          CUDA_CHECK(cudaGraphLaunch(g.exec, s));
          return;
        }
      if (is_warm(T, path)) {
        if (cudaGraphExec_t exec = capture_graph(d_x, T, d_y, path)) {
          if (int(graphs.size()) >= kMaxGraphs) {
            cudaGraphExecDestroy(graphs.front().exec);
            graphs.erase(graphs.begin());
          }
          graphs.push_back({key, exec});
          CUDA_CHECK(cudaGraphLaunch(exec, s));
          return;
        }
      }
    }
    enqueue(d_x, T, d_y, path, s, nullptr);
    if (!is_warm(T, path)) warm.emplace_back(T, path);
  }
};

GpuMoeLayer::GpuMoeLayer(const MoeLayerWeights& w, RouterKind router, int top_k, float jitter_eps) {
  const int E = w.num_experts, H = w.hidden, I = w.inter;
  require(w.num_held() == E, "GpuMoeLayer: the layer weights hold ", w.num_held(), " of ", E,
          " experts; the one-GPU layer needs all of them");
  for (int e = 0; e < E; ++e)
    require(w.expert_ids[e] == e, "GpuMoeLayer: expert ids must be 0..", E - 1, " in order (position ", e, " holds ",
            w.expert_ids[e], ")");
  const std::size_t per = std::size_t(I) * H;
  require(w.gate.size() == std::size_t(E) * H, "GpuMoeLayer: gate has ", w.gate.size(), " values, expected E*H = ",
          std::size_t(E) * H);
  require(w.w1.size() == E * per && w.w3.size() == E * per && w.w2.size() == E * per,
          "GpuMoeLayer: expert weights do not have E*I*H = ", E * per, " values each");
  impl_ = std::make_unique<Impl>(H, I, E, router, top_k, jitter_eps);
  Impl& m = *impl_;
  CUDA_CHECK(cudaMemcpy(m.d_gate, w.gate.data(), w.gate.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  for (int e = 0; e < E; ++e) {  // w13_e = [w1_e ; w3_e]
    CUDA_CHECK(cudaMemcpy(m.d_w13 + 2 * e * per, w.w1.data() + e * per, per * sizeof(bf16), cudaMemcpyHostToDevice));
    CUDA_CHECK(
        cudaMemcpy(m.d_w13 + (2 * e + 1) * per, w.w3.data() + e * per, per * sizeof(bf16), cudaMemcpyHostToDevice));
  }
  CUDA_CHECK(cudaMemcpy(m.d_w2, w.w2.data(), w.w2.size() * sizeof(bf16), cudaMemcpyHostToDevice));
}

GpuMoeLayer::GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
                         unsigned long long seed) {
  impl_ = std::make_unique<Impl>(hidden, inter, num_experts, router, top_k, jitter_eps);
  Impl& m = *impl_;
  const std::size_t E = std::size_t(num_experts), H = std::size_t(hidden), I = std::size_t(inter);
  // std 1/sqrt(fan_in): logits and expert activations keep unit scale for unit-scale x.
  gpu::fill_random_bf16(m.d_gate, E * H, 1.f / std::sqrt(float(H)), seed * 3 + 0, m.stream);
  gpu::fill_random_bf16(m.d_w13, E * 2 * I * H, 1.f / std::sqrt(float(H)), seed * 3 + 1, m.stream);
  gpu::fill_random_bf16(m.d_w2, E * H * I, 1.f / std::sqrt(float(I)), seed * 3 + 2, m.stream);
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

GpuMoeLayer::~GpuMoeLayer() = default;

GpuMoeLayer::Result GpuMoeLayer::forward(std::span<const bf16_bits> x, int T, MoePath path, bool time_stages) {
  Impl& m = *impl_;
  require(T >= 0, "GpuMoeLayer::forward: tokens must be >= 0, got ", T);
  require(x.size() == std::size_t(T) * m.H, "GpuMoeLayer::forward: x has ", x.size(), " values, expected T*H = ",
          std::size_t(T) * m.H);
  Result r;
  r.routing.tokens = T;
  r.routing.k = m.k;
  if (T == 0) return r;

  const std::size_t xn = std::size_t(T) * m.H;
  const std::size_t xio_before = m.c_xio, yio_before = m.c_yio;
  grow(m.d_xio, m.c_xio, xn);
  grow(m.d_yio, m.c_yio, xn);
  if (m.c_xio != xio_before || m.c_yio != yio_before) ++m.generation;
  CUDA_CHECK(cudaMemcpyAsync(m.d_xio, x.data(), xn * sizeof(bf16), cudaMemcpyHostToDevice, m.stream));
  if (time_stages) {
    m.prepare(T, path);
    m.enqueue(m.d_xio, T, m.d_yio, path, m.stream, m.ev);
  } else {
    m.forward_device(m.d_xio, T, m.d_yio, path, m.stream);
  }

  r.logits.resize(std::size_t(T) * m.E);
  r.routing.ids.resize(std::size_t(T) * m.k);
  r.routing.weights.resize(std::size_t(T) * m.k);
  std::vector<bf16_bits> y(xn);
  CUDA_CHECK(cudaMemcpyAsync(r.logits.data(), m.d_logits, r.logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                             m.stream));
  CUDA_CHECK(cudaMemcpyAsync(r.routing.ids.data(), m.d_ids, r.routing.ids.size() * sizeof(int), cudaMemcpyDeviceToHost,
                             m.stream));
  CUDA_CHECK(cudaMemcpyAsync(r.routing.weights.data(), m.d_weights, r.routing.weights.size() * sizeof(float),
                             cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaMemcpyAsync(y.data(), m.d_yio, xn * sizeof(bf16), cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
  r.y = bf16_to_float(std::span<const bf16_bits>(y));

  if (time_stages) r.timings = m.read_timings(false);
  return r;
}

void GpuMoeLayer::forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                                 cudaStream_t stream) {
  impl_->forward_device(d_x, T, d_y, path, stream);
}

MoeTimings GpuMoeLayer::time_stages_queued(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                                           cudaStream_t stream, float spin_us) {
  return impl_->time_stages_queued(d_x, T, d_y, path, stream, spin_us);
}

void GpuMoeLayer::set_expert_strategy(ExpertStrategy s, int small_rows_max) {
  require(small_rows_max >= 0, "set_expert_strategy: small_rows_max must be >= 0, got ", small_rows_max);
  impl_->ws.strategy = to_gpu(s);
  impl_->ws.small_rows_max = small_rows_max;
  impl_->clear_graphs();  // a captured graph has the old strategy baked in
  impl_->warm.clear();
}

ExpertStrategy GpuMoeLayer::last_expert_strategy() const { return from_gpu(impl_->ws.last_used); }
ExpertStrategy GpuMoeLayer::expert_strategy() const { return from_gpu(impl_->ws.strategy); }
int GpuMoeLayer::small_rows_max() const { return impl_->ws.small_rows_max; }

void GpuMoeLayer::set_direct_small_batches(bool on) {
  if (impl_->use_direct == on) return;
  impl_->use_direct = on;
  impl_->clear_graphs();  // a captured graph has the old chain baked in
  impl_->warm.clear();
}

void GpuMoeLayer::set_router_impl(RouterImpl r) {
  impl_->router_impl = r;
  impl_->clear_graphs();  // a captured graph has the old router baked in
  impl_->warm.clear();
}

RouterImpl GpuMoeLayer::last_router_impl() const { return impl_->last_router; }

const char* decode_kernels_name(DecodeKernels d) {
  return d == DecodeKernels::Direct ? "direct" : d == DecodeKernels::Decode ? "decode" : "hybrid";
}

DecodeKernels parse_decode_kernels(const std::string& name) {
  for (DecodeKernels d : {DecodeKernels::Direct, DecodeKernels::Decode, DecodeKernels::Hybrid})
    if (name == decode_kernels_name(d)) return d;
  if (name == "0") return DecodeKernels::Direct;  // the older on/off spelling of EPLAB_DECODE
  if (name == "1") return DecodeKernels::Decode;
  fail("unknown decode kernels '", name, "': use direct, decode or hybrid");
}

void GpuMoeLayer::set_decode_kernels(DecodeKernels d, bool pdl) {
  impl_->decode_kernels = d;
  impl_->use_pdl = pdl;
  impl_->clear_graphs();
  impl_->warm.clear();
}

Routing GpuMoeLayer::last_routing() const { return last_routing(impl_->last_T); }

std::uint64_t GpuMoeLayer::buffers_generation() const { return impl_->graphs_gen; }

Routing GpuMoeLayer::last_routing(int rows) const {
  const Impl& m = *impl_;
  require(rows >= 0, "GpuMoeLayer::last_routing: rows must be >= 0, got ", rows);
  Routing r;
  r.tokens = rows;
  r.k = m.k;
  r.ids.resize(std::size_t(r.tokens) * r.k);
  r.weights.resize(r.ids.size());
  CUDA_CHECK(cudaDeviceSynchronize());  // the last forward ran on the caller's stream: wait for all of them
  if (!r.ids.empty()) {
    CUDA_CHECK(cudaMemcpy(r.ids.data(), m.d_ids, r.ids.size() * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(r.weights.data(), m.d_weights, r.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
  return r;
}

void GpuMoeLayer::set_use_graphs(bool on) {
  impl_->use_graphs = on;
  if (!on) impl_->clear_graphs();
}

int GpuMoeLayer::cached_graphs() const { return int(impl_->graphs.size()); }

int GpuMoeLayer::hidden() const { return impl_->H; }
int GpuMoeLayer::inter() const { return impl_->I; }
int GpuMoeLayer::num_experts() const { return impl_->E; }
int GpuMoeLayer::top_k() const { return impl_->k; }

std::size_t GpuMoeLayer::weight_bytes() const {
  const std::size_t E = std::size_t(impl_->E), H = std::size_t(impl_->H), I = std::size_t(impl_->I);
  return (E * H + E * 2 * I * H + E * H * I) * sizeof(bf16);
}

}  // namespace eplab
