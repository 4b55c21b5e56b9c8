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
//   count is what sets the time. The experts step is experts_decode's w1|w3 kernel followed by
//   experts_direct's w2 kernel (experts_decode.cuh says why); a shape experts_decode cannot run
//   (experts_decode_ok: up to 32 rows, I <= 512) runs experts_direct's two kernels. Measured on an H200, the
//   plan + permute + combine chain instead of this path: T = 1 0.0415 vs 0.0407 ms (chapter 02 README).
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
// cublas-padded (Auto above the small-batch rows; measured in grouped_experts.cuh): the permute writes x
// straight into the padded layout [E, M_pad, H] (padded_layout.cuh; M_pad found on the GPU from the offsets,
// capped), the experts are two strided-batched GEMMs over it, and the combine reads it back: the same kernel
// count as the other cuBLAS strategies, no extra pass. xp and yp are then sized for E x the cap rows (2 x rows).
//
// Buffers grow to the largest T seen and are never shrunk: after one forward at the largest T (and one
// more for the graph capture) forward_device allocates nothing.
//
// Profiling: every forward that runs host code (eager, or while a graph is captured) opens NVTX ranges
// route / plan / dispatch / experts / combine (nvtx_range.hpp) inside one "GpuMoeLayer::forward" range.
#include "moe_gpu.hpp"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "combine.cuh"
#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "experts_decode.cuh"
#include "grouped_experts.cuh"
#include "naive_moe.cuh"
#include "nvtx_range.hpp"
#include "padded_layout.cuh"
#include "permute.cuh"
#include "random_init.cuh"
#include "moe_router.cuh"
#include "router.cuh"
#include "router_tiled.cuh"
#include "routing.cuh"

namespace eplab {

using gpu::bf16;
static_assert(sizeof(bf16) == sizeof(bf16_bits), "bf16_bits and __nv_bfloat16 must have the same layout");

namespace {

constexpr int kMaxGraphs = 16;  // e.g. the benchmark rotates over 8 input batches


}  // namespace

const char* expert_strategy_name(ExpertStrategy s) { return gpu::grouped_strategy_name(s); }

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

// ---- stage events --------------------------------------------------------------------------------------

MoeStageEvents::MoeStageEvents() {
  for (auto& e : ev_) CUDA_CHECK(cudaEventCreate(&e));
}

MoeStageEvents::~MoeStageEvents() {
  for (auto& e : ev_)
    if (e) cudaEventDestroy(e);
}

void MoeStageEvents::boundary(MoeBoundary b, cudaStream_t s) { CUDA_CHECK(cudaEventRecord(ev_[b], s)); }

float MoeStageEvents::ms(MoeBoundary from, MoeBoundary to) const {
  CUDA_CHECK(cudaEventSynchronize(ev_[to]));
  float t = 0;
  CUDA_CHECK(cudaEventElapsedTime(&t, ev_[from], ev_[to]));
  return t;
}

MoeTimings MoeStageEvents::eager_split() const {
  MoeTimings r;
  r.router_ms = ms(kMoeStart, kMoeRouted);
  r.routing_ms = ms(kMoeRouted, kMoeRoutingDone);
  r.permute_ms = ms(kMoeRoutingDone, kMoePermuted);
  r.experts_ms = ms(kMoePermuted, kMoeExpertsDone);
  r.combine_ms = ms(kMoeExpertsDone, kMoeCombined);
  r.offsets_wait_ms = ms(kMoePermuted, kMoeExpertsStart);
  r.total_ms = ms(kMoeStart, kMoeCombined);
  return r;
}

// ---- the layer -----------------------------------------------------------------------------------------

struct GpuMoeLayer::Impl {
  int H = 0, I = 0, E = 0, k = 0;
  RouterKind router = RouterKind::SparseMixer;
  float eps = 0.f;

  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;   // forward()'s stream
  cudaStream_t capture = nullptr;  // private stream that graph captures are recorded on
  cudaEvent_t ev_offsets = nullptr;
  std::unique_ptr<MoeStageEvents> stage_events;  // forward(..., time_stages), made on first use

  DeviceBuffer<bf16> gate, w13, w2;
  DeviceBuffer<bf16> w1, w3;  // naive path only, split from w13 on first use

  // Per-token scratch, sized for cap_T tokens (xp and yp: more for cublas-padded's layout).
  int cap_T = 0;
  DeviceBuffer<float> logits;
  DeviceBuffer<int> ids;
  DeviceBuffer<float> weights;
  DeviceBuffer<int> counts, offsets, row_of, assignment;
  DeviceBuffer<bf16> xp, yp;
  DeviceBuffer<bf16> xio, yio;  // forward()'s device copies of x and y
  PinnedBuffer<int> h_offsets;  // [E+1]

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
  // Router: Auto = router_route_tiled wherever it runs (E <= 64, H % 8 == 0, aligned), else the fused
  // per-token kernel up to kFusedRouterMaxT, else cuBLAS + route_topk. set_router_impl forces one (fused /
  // tiled fall back to cuBLAS when they cannot run the shape).
  RouterImpl router_impl = RouterImpl::Auto;
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
    CUDA_CHECK(cudaEventCreateWithFlags(&ev_offsets, cudaEventDisableTiming));
    h_offsets = PinnedBuffer<int>(std::size_t(E) + 1);
    gate = DeviceBuffer<bf16>(std::size_t(E) * H);
    w13 = DeviceBuffer<bf16>(std::size_t(E) * 2 * I * H);
    w2 = DeviceBuffer<bf16>(std::size_t(E) * H * I);
    ws.auto_padded = true;  // Auto above the small-batch rows: cublas-padded (measured fastest, grouped_experts.cuh)
  }

  ~Impl() {
    clear_graphs();
    if (ev_offsets) cudaEventDestroy(ev_offsets);
    if (capture) cudaStreamDestroy(capture);
    if (stream) cudaStreamDestroy(stream);
    if (blas) cublasDestroy(blas);
  }

  gpu::ExpertWeightsDevice experts() const { return {w13.get(), w2.get(), E, H, I}; }

  // ---- buffers -------------------------------------------------------------------------------------

  void ensure_tokens(int T) {
    if (T <= cap_T) return;
    const std::size_t t = std::size_t(T), rows = t * k;
    logits.grow(t * E);
    ids.grow(rows);
    weights.grow(rows);
    counts.grow(std::size_t(E));
    offsets.grow(std::size_t(E) + 1);
    row_of.grow(rows);
    assignment.grow(rows);
    xp.grow(rows * H);
    yp.grow(rows * H);
    cap_T = T;
    ++generation;
  }

  void ensure_naive_weights() {
    if (w1.get()) return;
    const std::size_t per = std::size_t(I) * H;
    w1 = DeviceBuffer<bf16>(std::size_t(E) * per);
    w3 = DeviceBuffer<bf16>(std::size_t(E) * per);
    for (int e = 0; e < E; ++e) {
      CUDA_CHECK(cudaMemcpyAsync(w1.get() + e * per, w13.get() + 2 * e * per, per * sizeof(bf16),
                                 cudaMemcpyDeviceToDevice, stream));
      CUDA_CHECK(cudaMemcpyAsync(w3.get() + e * per, w13.get() + (2 * e + 1) * per, per * sizeof(bf16),
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
        if (xp.grow(need) | yp.grow(need)) ++generation;
      }
    }
    gpu::reserve_router(rws, gate.get(), T, H, E);
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
    if (rows == 0 ||
        gpu::choose_grouped_strategy(ws, experts(), rows, xp.get(), yp.get()) != gpu::GroupedStrategy::CublasPadded)
      return 0;
    return gpu::padded_capacity_per_expert(ws.padded_max_ratio, E, rows);
  }

  // Enqueues one forward on s. obs != nullptr: told of every stage boundary (MoeBoundary) and of the host's
  // wait for the offsets; programmatic dependent launch is then off (work queued between kernels).
  void enqueue(const bf16* d_x, int T, bf16* d_y, MoePath path, cudaStream_t s, MoeStageObserver* obs) {
    NvtxRange whole("GpuMoeLayer::forward");
    NvtxStages stage;
    auto mark = [&](MoeBoundary b) {
      if (!obs) return;
      obs->boundary(b, s);
      if (b == kMoePermuted) obs->boundary(kMoeExpertsStart, s);  // no host wait: experts start here
    };
    const int rows = T * k;
    mark(kMoeStart);
    stage.next("route");
    route(d_x, T, s, mark);
    mark(kMoeRoutingDone);
    if (path == MoePath::Grouped && direct_path(d_x, T, d_y)) {
      // Small batches: 3 kernels, no plan, no permute, no combine (see the top of this file).
      mark(kMoePermuted);
      stage.next("experts");
      if (gpu::experts_decode_ok(experts(), d_x, d_y, T, k))
        gpu::experts_decode(experts(), d_x, ids.get(), weights.get(), T, k, d_y, ws, s, /*pdl=*/obs == nullptr);
      else
        gpu::experts_direct(experts(), d_x, ids.get(), weights.get(), T, k, d_y, ws, s);
      mark(kMoeExpertsDone);
      mark(kMoeCombined);
      return;
    }
    if (path == MoePath::Naive) {
      mark(kMoePermuted);
      stage.next("experts");
      gpu::naive_moe(d_x, ids.get(), weights.get(), T, k, H, I, w1.get(), w3.get(), w2.get(), d_y, s);
      mark(kMoeExpertsDone);
      mark(kMoeCombined);
      return;
    }
    stage.next("plan");
    gpu::build_dispatch_plan(ids.get(), T, k, E, counts.get(), offsets.get(), row_of.get(), assignment.get(), s);
    const gpu::GroupedStrategy st = gpu::choose_grouped_strategy(ws, experts(), rows, xp.get(), yp.get());
    const bool need_host = gpu::grouped_strategy_needs_host_offsets(st);
    if (need_host) {  // start the copy now, wait for it only after permute_rows is enqueued
      CUDA_CHECK(cudaMemcpyAsync(h_offsets.get(), offsets.get(), std::size_t(E + 1) * sizeof(int),
                                 cudaMemcpyDeviceToHost, s));
      CUDA_CHECK(cudaEventRecord(ev_offsets, s));
    }
    // cublas-padded: x goes straight into the padded layout (no extra pass), unless M_pad > m_cap, which the
    // permute kernel sees on the GPU and the host below sees in the same offsets.
    stage.next("dispatch");
    const int m_cap = padded_cap(T);
    if (m_cap)
      gpu::permute_rows_padded(d_x, offsets.get(), assignment.get(), T, k, E, m_cap, H, xp.get(), s);
    else
      gpu::permute_rows(d_x, assignment.get(), rows, k, H, xp.get(), s);
    if (obs) obs->boundary(kMoePermuted, s);
    stage.next("experts");
    if (need_host) {
      if (obs) obs->before_host_wait();
      CUDA_CHECK(cudaEventSynchronize(ev_offsets));
      if (obs) obs->after_host_wait(s);  // e.g. the GEMMs, SwiGLU and combine get queued behind a busy-wait
    }
    if (obs) obs->boundary(kMoeExpertsStart, s);
    if (m_cap) {
      const int m_pad = gpu::padded_rows_per_expert(h_offsets.get(), E);
      if (m_pad > 0 && m_pad <= m_cap) {
        gpu::grouped_experts_padded(blas, experts(), xp.get(), h_offsets.get(), m_pad, yp.get(), ws, s);
        mark(kMoeExpertsDone);
        stage.next("combine");
        gpu::unpermute_combine_padded(yp.get(), E * m_pad, ids.get(), row_of.get(), offsets.get(), m_pad,
                                      weights.get(), T, k, E, H, d_y, s);
        mark(kMoeCombined);
        return;
      }
      // xp holds contiguous rows: grouped_experts sees the same M_pad > cap and runs cublas-streams.
    }
    gpu::grouped_experts(blas, experts(), xp.get(), offsets.get(), need_host ? h_offsets.get() : nullptr, rows,
                         yp.get(), ws, s);
    mark(kMoeExpertsDone);
    stage.next("combine");
    gpu::unpermute_combine(yp.get(), row_of.get(), weights.get(), T, k, H, d_y, s);
    mark(kMoeCombined);
  }

  // Router GEMM + routing into logits / ids / weights (moe_router.cuh: the same stage the EP engine runs).
  // mark(kMoeRouted) after the logits (the routing is part of the router stage for the fused and tiled kernels).
  template <typename Mark>
  void route(const bf16* d_x, int T, cudaStream_t s, Mark&& mark) {
    last_router = gpu::route_tokens(router_impl, blas, d_x, gate.get(), T, H, E, k, router, eps, logits.get(),
                                    ids.get(), weights.get(), rws, s, [&] { mark(kMoeRouted); });
  }
  RouterImpl last_router = RouterImpl::Auto;

  // The token-direct decode path: weight streaming chosen for this T and its kernels can run the shape.
  bool direct_path(const bf16* d_x, int T, const bf16* d_y) const {
    return gpu::choose_grouped_strategy(ws, experts(), T * k, xp.get(), yp.get()) ==
               gpu::GroupedStrategy::WeightStream &&
           gpu::experts_direct_ok(experts(), d_x, d_y, T, k);
  }

  bool graphable(int T, MoePath path) const {
    if (!use_graphs || graphs_broken) return false;
    if (path == MoePath::Naive) return true;
    return gpu::choose_grouped_strategy(ws, experts(), T * k, xp.get(), yp.get()) == gpu::GroupedStrategy::WeightStream;
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

  void forward_device_observed(const bf16* d_x, int T, bf16* d_y, MoePath path, cudaStream_t s,
                               MoeStageObserver& obs) {
    require(T >= 0, "GpuMoeLayer::forward_device_observed: tokens must be >= 0, got ", T);
    last_T = T;
    if (T == 0) return;
    prepare(T, path);
    enqueue(d_x, T, d_y, path, s, &obs);
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

  // A forced choice changed: a captured graph has the old one baked in.
  void forget_graphs() {
    clear_graphs();
    warm.clear();
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
  CUDA_CHECK(cudaMemcpy(m.gate.get(), w.gate.data(), w.gate.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  for (int e = 0; e < E; ++e) {  // w13_e = [w1_e ; w3_e]
    CUDA_CHECK(cudaMemcpy(m.w13.get() + 2 * e * per, w.w1.data() + e * per, per * sizeof(bf16),
                          cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(m.w13.get() + (2 * e + 1) * per, w.w3.data() + e * per, per * sizeof(bf16),
                          cudaMemcpyHostToDevice));
  }
  CUDA_CHECK(cudaMemcpy(m.w2.get(), w.w2.data(), w.w2.size() * sizeof(bf16), cudaMemcpyHostToDevice));
}

GpuMoeLayer::GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
                         unsigned long long seed)
    : GpuMoeLayer(hidden, inter, num_experts, router, top_k, jitter_eps,
                  [&](bf16* gate, bf16* w13, bf16* w2, cudaStream_t s) {
                    const std::size_t E = std::size_t(num_experts), H = std::size_t(hidden), I = std::size_t(inter);
                    // std 1/sqrt(fan_in): logits and expert activations keep unit scale for unit-scale x.
                    gpu::fill_random_bf16(gate, E * H, 1.f / std::sqrt(float(H)), seed * 3 + 0, s);
                    gpu::fill_random_bf16(w13, E * 2 * I * H, 1.f / std::sqrt(float(H)), seed * 3 + 1, s);
                    gpu::fill_random_bf16(w2, E * H * I, 1.f / std::sqrt(float(I)), seed * 3 + 2, s);
                  }) {}

GpuMoeLayer::GpuMoeLayer(int hidden, int inter, int num_experts, RouterKind router, int top_k, float jitter_eps,
                         const DeviceFill& fill) {
  impl_ = std::make_unique<Impl>(hidden, inter, num_experts, router, top_k, jitter_eps);
  Impl& m = *impl_;
  fill(m.gate.get(), m.w13.get(), m.w2.get(), m.stream);
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
  if (m.xio.grow(xn) | m.yio.grow(xn)) ++m.generation;
  CUDA_CHECK(cudaMemcpyAsync(m.xio.get(), x.data(), xn * sizeof(bf16), cudaMemcpyHostToDevice, m.stream));
  if (time_stages) {
    if (!m.stage_events) m.stage_events = std::make_unique<MoeStageEvents>();
    m.forward_device_observed(m.xio.get(), T, m.yio.get(), path, m.stream, *m.stage_events);
  } else {
    m.forward_device(m.xio.get(), T, m.yio.get(), path, m.stream);
  }

  r.logits.resize(std::size_t(T) * m.E);
  r.routing.ids.resize(std::size_t(T) * m.k);
  r.routing.weights.resize(std::size_t(T) * m.k);
  std::vector<bf16_bits> y(xn);
  CUDA_CHECK(cudaMemcpyAsync(r.logits.data(), m.logits.get(), r.logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                             m.stream));
  CUDA_CHECK(cudaMemcpyAsync(r.routing.ids.data(), m.ids.get(), r.routing.ids.size() * sizeof(int),
                             cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaMemcpyAsync(r.routing.weights.data(), m.weights.get(), r.routing.weights.size() * sizeof(float),
                             cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaMemcpyAsync(y.data(), m.yio.get(), xn * sizeof(bf16), cudaMemcpyDeviceToHost, m.stream));
  CUDA_CHECK(cudaStreamSynchronize(m.stream));
  r.y = bf16_to_float(std::span<const bf16_bits>(y));

  if (time_stages) r.timings = m.stage_events->eager_split();
  return r;
}

void GpuMoeLayer::forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                                 cudaStream_t stream) {
  impl_->forward_device(d_x, T, d_y, path, stream);
}

void GpuMoeLayer::forward_device_observed(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, MoePath path,
                                          cudaStream_t stream, MoeStageObserver& observer) {
  impl_->forward_device_observed(d_x, T, d_y, path, stream, observer);
}

void GpuMoeLayer::set_expert_strategy(ExpertStrategy s, int small_rows_max) {
  require(small_rows_max >= 0, "set_expert_strategy: small_rows_max must be >= 0, got ", small_rows_max);
  impl_->ws.strategy = s;
  impl_->ws.small_rows_max = small_rows_max;
  impl_->forget_graphs();
}

ExpertStrategy GpuMoeLayer::last_expert_strategy() const { return impl_->ws.last_used; }
ExpertStrategy GpuMoeLayer::expert_strategy() const { return impl_->ws.strategy; }
int GpuMoeLayer::small_rows_max() const { return impl_->ws.small_rows_max; }

void GpuMoeLayer::set_router_impl(RouterImpl r) {
  impl_->router_impl = r;
  impl_->forget_graphs();
}

RouterImpl GpuMoeLayer::last_router_impl() const { return impl_->last_router; }

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
    CUDA_CHECK(cudaMemcpy(r.ids.data(), m.ids.get(), r.ids.size() * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(
        cudaMemcpy(r.weights.data(), m.weights.get(), r.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
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
