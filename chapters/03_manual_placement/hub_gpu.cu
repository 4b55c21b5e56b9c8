#include "hub_gpu.hpp"

#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>

#include "combine.cuh"
#include "cuda_check.hpp"
#include "grouped_experts.cuh"
#include "router.cuh"
#include "routing.cuh"
#include "util/report.hpp"
#include "util/timer.hpp"

namespace eplab::ch03 {

using gpu::bf16;

namespace {

// Makes `device` current for a scope and restores the previous one (CUDA's current device is per host thread).
struct DeviceScope {
  int prev = 0;
  explicit DeviceScope(int device) {
    CUDA_CHECK(cudaGetDevice(&prev));
    CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(prev); }
};

// A device allocation on one GPU that only grows (so timed forwards never allocate after the first).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }
  void reserve(int device, std::size_t n) {
    if (n <= cap_ && device == dev_ && p_) return;
    release();
    DeviceScope on(device);
    CUDA_CHECK(cudaMalloc(&p_, std::max<std::size_t>(n, 1) * sizeof(T)));
    dev_ = device;
    cap_ = n;
  }
  T* get() const { return p_; }

 private:
  void release() {
    if (!p_) return;
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(dev_);
    cudaFree(p_);
    cudaSetDevice(prev);
    p_ = nullptr;
    cap_ = 0;
  }
  T* p_ = nullptr;
  std::size_t cap_ = 0;
  int dev_ = -1;
};

// Pinned host memory, so the routing read-back and the index upload are real asynchronous DMA.
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  void reserve(std::size_t n) {
    if (n <= cap_ && p_) return;
    if (p_) cudaFreeHost(p_);
    p_ = nullptr;
    CUDA_CHECK(cudaMallocHost(&p_, std::max<std::size_t>(n, 1) * sizeof(T)));
    cap_ = n;
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  std::size_t cap_ = 0;
};

// xs[r, :] = x[assignment[r] / k, :] for the r < rows rows of ONE device's slice.
//
// Why not gpu::permute_rows: that kernel is written for the full plan (rows == T*k) and treats any
// assignment >= rows as invalid, writing a zero row. A device's slice has fewer rows than T*k while its
// assignments still range over all of [0, T*k), so permute_rows would zero every row whose assignment is
// >= the slice's row count (about half of all rows with 2 devices: rel-L2 ~0.7 with the routing right).
// Here the bound is the number of assignments, passed separately. The host checks the assignments before
// uploading them (HubGpu::forward), so the zero row below is only a last guard against reading outside x.
// One thread per 16-byte vector (8 bf16) when H % 8 == 0 and both pointers are 16-byte aligned, else one
// per element; grid-stride, consecutive threads on consecutive vectors of a row (coalesced, bit-exact).
template <typename V>
__global__ void gather_slice_kernel(const V* __restrict__ x, const int* __restrict__ assignment, int rows, int k,
                                    int num_assignments, int per_row, V* __restrict__ xs) {
  const std::size_t total = std::size_t(rows) * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const int r = int(i / per_row);
    const int v = int(i - std::size_t(r) * per_row);
    const int a = assignment[r];
    V val{};
    if (a >= 0 && a < num_assignments) val = x[std::size_t(a / k) * per_row + v];
    xs[i] = val;
  }
}

void gather_slice(const bf16* x, const int* assignment, int rows, int k, int num_assignments, int H, bf16* xs,
                  cudaStream_t s) {
  if (rows == 0) return;
  constexpr int threads = 256;
  auto grid = [](std::size_t work) {
    return unsigned(std::min<std::size_t>((work + threads - 1) / threads, std::size_t(1) << 20));
  };
  const bool vec = H % 8 == 0 && (reinterpret_cast<std::uintptr_t>(x) & 15u) == 0 &&
                   (reinterpret_cast<std::uintptr_t>(xs) & 15u) == 0;
  if (vec) {
    const int per_row = H / 8;
    gather_slice_kernel<int4><<<grid(std::size_t(rows) * per_row), threads, 0, s>>>(
        reinterpret_cast<const int4*>(x), assignment, rows, k, num_assignments, per_row, reinterpret_cast<int4*>(xs));
  } else {  // bf16 copied as its raw 16 bits
    gather_slice_kernel<unsigned short><<<grid(std::size_t(rows) * H), threads, 0, s>>>(
        reinterpret_cast<const unsigned short*>(x), assignment, rows, k, num_assignments, H,
        reinterpret_cast<unsigned short*>(xs));
  }
  CUDA_CHECK_LAUNCH();
}

float elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

}  // namespace

// Everything one GPU g owns: its experts, its stream, and the hub-side stream that feeds it.
struct Spoke {
  int id = 0;   // logical device g (the placement's rank)
  int gpu = 0;  // the physical GPU it runs on (== id, unless --share-gpu puts every spoke on GPU 0)
  std::vector<int> experts;
  cudaStream_t hub_stream = nullptr;  // on GPU 0: gather + copy out for this GPU
  cudaStream_t stream = nullptr;      // on GPU g: experts + copy back
  cublasHandle_t blas = nullptr;      // on GPU g
  DeviceBuffer<bf16> w13, w2;         // on GPU g
  gpu::ExpertWeightsDevice weights{};
  gpu::GroupedWorkspace ws;           // on GPU g
  DeviceBuffer<bf16> xp, yp;          // on GPU g: its rows in, its results out
  DeviceBuffer<int> offsets;          // on GPU g: [n+1]
  // Timing events: gather start/end and copy-out end on GPU 0; experts start/end and copy-back end on GPU g.
  cudaEvent_t gather0 = nullptr, gather1 = nullptr, out1 = nullptr;
  cudaEvent_t experts0 = nullptr, experts1 = nullptr, back1 = nullptr;
};

struct HubGpu::Impl {
  int N = 0, H = 0, I = 0, E = 0, k = 0;
  RouterKind router = RouterKind::SparseMixer;
  float eps = 0;
  std::vector<std::string> notes;
  std::vector<std::unique_ptr<Spoke>> spokes;

  // GPU 0, the hub.
  cudaStream_t main = nullptr;
  cublasHandle_t router_blas = nullptr;
  DeviceBuffer<bf16> gate, x, send, recv, y;
  DeviceBuffer<float> logits, weights;
  DeviceBuffer<int> ids, index;  // index = [assignment of every device's rows, device by device | slot_of]
  PinnedBuffer<int> h_ids, h_index;
  PinnedBuffer<float> h_weights;
  cudaEvent_t route0 = nullptr, route1 = nullptr, spokes0 = nullptr, combine0 = nullptr, combine1 = nullptr;
  int T = 0;

  void spoke_forward(Spoke& d, const DeviceSlice& s);
};

HubGpu::HubGpu(std::span<const bf16_bits> gate, const std::vector<MoeLayerWeights>& dev_weights, RouterKind router,
               int top_k, float jitter_eps, std::vector<int> gpu_of)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.N = int(dev_weights.size());
  require(m.N >= 1, "HubGpu needs at least one GPU");
  if (gpu_of.empty())
    for (int g = 0; g < m.N; ++g) gpu_of.push_back(g);
  require(int(gpu_of.size()) == m.N && gpu_of[0] == 0, "HubGpu: device 0 must be GPU 0 (the hub)");
  int present = 0;
  CUDA_CHECK(cudaGetDeviceCount(&present));
  for (int p : gpu_of) require(p >= 0 && p < present, "--gpus ", m.N, " needs GPU ", p, " but only ", present,
                               " GPU(s) present");
  m.H = dev_weights[0].hidden;
  m.I = dev_weights[0].inter;
  m.E = dev_weights[0].num_experts;
  m.k = top_k;
  m.router = router;
  m.eps = jitter_eps;
  require(gate.size() == std::size_t(m.E) * m.H, "router gate has ", gate.size(), " values, expected E*H = ",
          std::size_t(m.E) * m.H);

  // The hub: router weight, streams, events.
  {
    DeviceScope on(0);
    CUDA_CHECK(cudaStreamCreateWithFlags(&m.main, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&m.router_blas));
    m.gate.reserve(0, gate.size());
    CUDA_CHECK(cudaMemcpy(m.gate.get(), gate.data(), gate.size() * 2, cudaMemcpyHostToDevice));
    for (cudaEvent_t* e : {&m.route0, &m.route1, &m.spokes0, &m.combine0, &m.combine1})
      CUDA_CHECK(cudaEventCreate(e));
  }

  // Every GPU: its experts (w1 and w3 stacked per expert as grouped_experts wants them), stream, cuBLAS.
  for (int g = 0; g < m.N; ++g) {
    const MoeLayerWeights& w = dev_weights[g];
    require(w.hidden == m.H && w.inter == m.I && w.num_experts == m.E, "GPU ", g, "'s expert weights have another shape");
    auto d = std::make_unique<Spoke>();
    d->id = g;
    d->gpu = gpu_of[g];
    d->experts = w.expert_ids;
    const std::size_t n = w.expert_ids.size(), IH = std::size_t(m.I) * m.H;
    std::vector<bf16_bits> w13(n * 2 * IH);
    for (std::size_t e = 0; e < n; ++e) {
      std::copy_n(&w.w1[e * IH], IH, &w13[(2 * e) * IH]);
      std::copy_n(&w.w3[e * IH], IH, &w13[(2 * e + 1) * IH]);
    }
    {
      DeviceScope on(0);
      CUDA_CHECK(cudaStreamCreateWithFlags(&d->hub_stream, cudaStreamNonBlocking));
      for (cudaEvent_t* e : {&d->gather0, &d->gather1, &d->out1}) CUDA_CHECK(cudaEventCreate(e));
    }
    DeviceScope on(d->gpu);
    CUDA_CHECK(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&d->blas));
    for (cudaEvent_t* e : {&d->experts0, &d->experts1, &d->back1}) CUDA_CHECK(cudaEventCreate(e));
    d->w13.reserve(d->gpu, w13.size());
    d->w2.reserve(d->gpu, w.w2.size());
    CUDA_CHECK(cudaMemcpy(d->w13.get(), w13.data(), w13.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d->w2.get(), w.w2.data(), w.w2.size() * 2, cudaMemcpyHostToDevice));
    d->weights = {d->w13.get(), d->w2.get(), int(n), m.H, m.I};
    m.spokes.push_back(std::move(d));
  }

  // Peer access between the hub and every other GPU, both ways (the copies go both ways).
  std::vector<int> others(gpu_of.begin() + 1, gpu_of.end());
  std::sort(others.begin(), others.end());
  others.erase(std::unique(others.begin(), others.end()), others.end());
  if (!others.empty() && others.front() == 0) {
    others.erase(others.begin());
    m.notes.push_back(strf("--share-gpu: %d logical GPUs on physical GPU 0; the \"peer\" copies are copies inside "
                           "GPU 0 and the times say nothing about a real multi-GPU machine", m.N));
  }
  for (int g : others) {
    int hub_to_g = 0, g_to_hub = 0;
    CUDA_CHECK(cudaDeviceCanAccessPeer(&hub_to_g, 0, g));
    CUDA_CHECK(cudaDeviceCanAccessPeer(&g_to_hub, g, 0));
    if (hub_to_g && g_to_hub) {
      for (auto [from, to] : {std::pair{0, g}, std::pair{g, 0}}) {
        DeviceScope on(from);
        const cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();  // fine: clear it
        else CUDA_CHECK(err);
      }
      int rank = 0;
      CUDA_CHECK(cudaDeviceGetP2PAttribute(&rank, cudaDevP2PAttrPerformanceRank, 0, g));
      m.notes.push_back(strf("GPU 0 <-> GPU %d: peer access enabled (direct copies; link performance rank %d)", g, rank));
    } else {
      m.notes.push_back(strf("GPU 0 <-> GPU %d: peer access NOT available (cudaDeviceCanAccessPeer = %d/%d): "
                             "cudaMemcpyPeerAsync stages every copy through host memory",
                             g, hub_to_g, g_to_hub));
    }
  }
}

HubGpu::~HubGpu() {
  if (!impl_) return;
  Impl& m = *impl_;
  for (auto& d : m.spokes) {
    cudaSetDevice(d->gpu);
    if (d->stream) cudaStreamSynchronize(d->stream);
    for (cudaEvent_t e : {d->experts0, d->experts1, d->back1})
      if (e) cudaEventDestroy(e);
    if (d->blas) cublasDestroy(d->blas);
    if (d->stream) cudaStreamDestroy(d->stream);
    cudaSetDevice(0);
    for (cudaEvent_t e : {d->gather0, d->gather1, d->out1})
      if (e) cudaEventDestroy(e);
    if (d->hub_stream) cudaStreamDestroy(d->hub_stream);
    cudaSetDevice(d->gpu);
    d.reset();  // buffers and workspace go while their GPU is current
  }
  cudaSetDevice(0);
  for (cudaEvent_t e : {m.route0, m.route1, m.spokes0, m.combine0, m.combine1})
    if (e) cudaEventDestroy(e);
  if (m.router_blas) cublasDestroy(m.router_blas);
  if (m.main) cudaStreamDestroy(m.main);
}

const std::vector<std::string>& HubGpu::notes() const { return impl_->notes; }

void HubGpu::set_input(std::span<const bf16_bits> x, int T) {
  Impl& m = *impl_;
  require(T >= 0 && x.size() == std::size_t(T) * m.H, "HubGpu::set_input: x has ", x.size(), " values, expected ",
          std::size_t(std::max(T, 0)) * m.H);
  m.T = T;
  DeviceScope on(0);
  m.x.reserve(0, x.size());
  m.y.reserve(0, x.size());
  if (T) CUDA_CHECK(cudaMemcpy(m.x.get(), x.data(), x.size() * 2, cudaMemcpyHostToDevice));
}

std::vector<float> HubGpu::output() const {
  const Impl& m = *impl_;
  std::vector<bf16_bits> y(std::size_t(m.T) * m.H);
  DeviceScope on(0);
  if (m.T) CUDA_CHECK(cudaMemcpy(y.data(), m.y.get(), y.size() * 2, cudaMemcpyDeviceToHost));
  return bf16_to_float(std::span<const bf16_bits>(y));
}

// What GPU g's host thread does. It only enqueues work: gather and copy-out on the hub's stream for g,
// experts and copy-back on g's own stream, chained by events, so the GPUs run concurrently.
void HubGpu::Impl::spoke_forward(Spoke& d, const DeviceSlice& s) {
  const int g = d.id, dev = d.gpu, rows = s.rows();
  const std::size_t bytes = std::size_t(rows) * H * sizeof(bf16);
  // GPU 0's own experts read and write the hub's buffers directly: its rows never travel.
  bf16* gathered = g == 0 ? d.xp.get() : send.get() + std::size_t(s.base) * H;
  bf16* result = g == 0 ? recv.get() + std::size_t(s.base) * H : d.yp.get();

  CUDA_CHECK(cudaSetDevice(0));
  CUDA_CHECK(cudaStreamWaitEvent(d.hub_stream, spokes0, 0));  // the index upload is done
  CUDA_CHECK(cudaEventRecord(d.gather0, d.hub_stream));
  gather_slice(x.get(), index.get() + s.base, rows, k, T * k, H, gathered, d.hub_stream);
  CUDA_CHECK(cudaEventRecord(d.gather1, d.hub_stream));
  if (g != 0 && bytes) CUDA_CHECK(cudaMemcpyPeerAsync(d.xp.get(), dev, gathered, 0, bytes, d.hub_stream));
  CUDA_CHECK(cudaEventRecord(d.out1, d.hub_stream));

  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaStreamWaitEvent(d.stream, d.out1, 0));  // g's rows have arrived
  CUDA_CHECK(cudaEventRecord(d.experts0, d.stream));
  if (rows) gpu::grouped_experts(d.blas, d.weights, d.xp.get(), d.offsets.get(), s.offsets.data(), rows, result, d.ws,
                                 d.stream);
  CUDA_CHECK(cudaEventRecord(d.experts1, d.stream));
  if (g != 0 && bytes)
    CUDA_CHECK(cudaMemcpyPeerAsync(recv.get() + std::size_t(s.base) * H, 0, result, dev, bytes, d.stream));
  CUDA_CHECK(cudaEventRecord(d.back1, d.stream));
}

HubRun HubGpu::forward() {
  Impl& m = *impl_;
  const int T = m.T, H = m.H, E = m.E, k = m.k, N = m.N;
  HubRun run;
  run.row_bytes = sizeof(bf16) * std::size_t(H);
  run.times.dev.resize(N);
  WallTimer total;

  // 1. Route on GPU 0, then read the routing back: the host needs it to plan who gets which rows.
  CUDA_CHECK(cudaSetDevice(0));
  m.logits.reserve(0, std::size_t(T) * E);
  m.ids.reserve(0, std::size_t(T) * k);
  m.weights.reserve(0, std::size_t(T) * k);
  m.h_ids.reserve(std::size_t(T) * k);
  m.h_weights.reserve(std::size_t(T) * k);
  CUDA_CHECK(cudaEventRecord(m.route0, m.main));
  if (T) {
    gpu::router_logits(m.router_blas, m.x.get(), m.gate.get(), T, H, E, m.logits.get(), m.main);
    gpu::route_topk(m.logits.get(), T, E, k, m.router, m.eps, m.ids.get(), m.weights.get(), m.main);
    CUDA_CHECK(cudaMemcpyAsync(m.h_ids.get(), m.ids.get(), std::size_t(T) * k * 4, cudaMemcpyDeviceToHost, m.main));
    CUDA_CHECK(cudaMemcpyAsync(m.h_weights.get(), m.weights.get(), std::size_t(T) * k * 4, cudaMemcpyDeviceToHost,
                               m.main));
  }
  CUDA_CHECK(cudaEventRecord(m.route1, m.main));
  CUDA_CHECK(cudaEventSynchronize(m.route1));
  run.routing.tokens = T;
  run.routing.k = k;
  run.routing.ids.assign(m.h_ids.get(), m.h_ids.get() + std::size_t(T) * k);
  run.routing.weights.assign(m.h_weights.get(), m.h_weights.get() + std::size_t(T) * k);

  // 2. Plan on the host: the dispatch plan, then which rows each GPU gets and where they come back.
  WallTimer plan_timer;
  const DispatchPlan plan = make_dispatch_plan(run.routing, E);
  std::vector<std::vector<int>> experts_of(N);
  for (int g = 0; g < N; ++g) experts_of[g] = m.spokes[g]->experts;
  run.layout = make_hub_layout(plan, experts_of);
  const HubLayout& L = run.layout;
  const std::size_t R = std::size_t(L.total_rows);
  m.send.reserve(0, R * H);
  m.recv.reserve(0, R * H);
  m.index.reserve(0, R + std::size_t(T) * k);
  m.h_index.reserve(R + std::size_t(T) * k);
  // Guard the kernels' preconditions on the host (they cannot throw): every slice row names an assignment
  // in [0, T*k) (gather_slice), and every assignment comes back to a row of the receive buffer (combine).
  require(R == std::size_t(T) * k && L.slot_of.size() == std::size_t(T) * k, "hub layout has ", R, " rows and ",
          L.slot_of.size(), " slots for T*k = ", std::size_t(T) * k, " assignments");
  for (int g = 0; g < N; ++g) {
    const DeviceSlice& s = L.dev[g];
    require(int(s.assignment.size()) == s.rows() && std::size_t(s.base) + s.rows() <= R, "hub layout: GPU ", g,
            "'s slice does not fit the send buffer");
    for (int a : s.assignment) require(a >= 0 && a < T * k, "hub layout: GPU ", g, " gets assignment ", a,
                                       " outside [0, T*k = ", T * k, ")");
    std::copy(s.assignment.begin(), s.assignment.end(), m.h_index.get() + s.base);
  }
  for (int r : L.slot_of) require(r >= 0 && std::size_t(r) < R, "hub layout: slot ", r, " outside [0, ", R, ")");
  std::copy(L.slot_of.begin(), L.slot_of.end(), m.h_index.get() + R);
  CUDA_CHECK(cudaMemcpyAsync(m.index.get(), m.h_index.get(), (R + std::size_t(T) * k) * 4, cudaMemcpyHostToDevice,
                             m.main));
  for (int g = 0; g < N; ++g) {
    Spoke& d = *m.spokes[g];
    const DeviceSlice& s = L.dev[g];
    d.xp.reserve(d.gpu, std::size_t(s.rows()) * H);
    d.yp.reserve(d.gpu, std::size_t(s.rows()) * H);
    d.offsets.reserve(d.gpu, s.offsets.size());
    DeviceScope on(d.gpu);
    // Pageable source: cudaMemcpyAsync returns once it has staged the bytes, so s.offsets may change later.
    CUDA_CHECK(cudaMemcpyAsync(d.offsets.get(), s.offsets.data(), s.offsets.size() * 4, cudaMemcpyHostToDevice,
                               d.stream));
  }
  CUDA_CHECK(cudaSetDevice(0));
  CUDA_CHECK(cudaEventRecord(m.spokes0, m.main));
  run.times.plan_ms = plan_timer.ms();

  // 3. The spokes: one host thread per GPU enqueues that GPU's gather, copies and experts.
  std::vector<std::exception_ptr> errors(N);
  std::vector<std::thread> threads;
  for (int g = 0; g < N; ++g)
    threads.emplace_back([&, g] {
      try {
        m.spoke_forward(*m.spokes[g], L.dev[g]);
      } catch (...) {
        errors[g] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);

  // 4. Combine on GPU 0 once every GPU's results are back: y[t] = sum_j w[t,j] * result(t, j).
  CUDA_CHECK(cudaSetDevice(0));
  for (auto& d : m.spokes) CUDA_CHECK(cudaStreamWaitEvent(m.main, d->back1, 0));
  CUDA_CHECK(cudaEventRecord(m.combine0, m.main));
  gpu::unpermute_combine(m.recv.get(), m.index.get() + R, m.weights.get(), T, k, H, m.y.get(), m.main);
  CUDA_CHECK(cudaEventRecord(m.combine1, m.main));
  CUDA_CHECK(cudaEventSynchronize(m.combine1));
  run.times.total_ms = total.ms();

  run.times.route_ms = elapsed_ms(m.route0, m.route1);
  run.times.spokes_ms = elapsed_ms(m.spokes0, m.combine0);
  run.times.combine_ms = elapsed_ms(m.combine0, m.combine1);
  for (int g = 0; g < N; ++g) {
    const Spoke& d = *m.spokes[g];
    DeviceTimes& t = run.times.dev[g];
    t.gather_ms = elapsed_ms(d.gather0, d.gather1);
    t.copy_out_ms = elapsed_ms(d.gather1, d.out1);
    DeviceScope on(d.gpu);  // events are compared on the GPU that recorded them
    t.experts_ms = elapsed_ms(d.experts0, d.experts1);
    t.copy_back_ms = elapsed_ms(d.experts1, d.back1);
  }
  return run;
}

}  // namespace eplab::ch03
