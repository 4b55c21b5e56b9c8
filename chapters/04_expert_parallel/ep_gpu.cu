// The GPU expert-parallel layer: NCCL between ranks, the kernels of kernels/ on each rank's GPU.
//
// Everything runs on the communicator's stream, so kernels and NCCL transfers are ordered without
// events. The host waits twice per forward on purpose:
//   1. for the per-slot counts (E ints): NCCL needs every message size on the host before it starts.
//      The copy is enqueued BEFORE the permute of the send buffer, and the host waits only for the copy
//      (an event), so the GPU permutes while the host exchanges the counts over MPI.
//   2. at the end of each stage, to time it (wall clock, stream drained, max over ranks later).
// The grouped cuBLAS experts need the per-expert row counts on the host: they are already there (the
// plan computed them from the exchanged counts), so grouped_experts never waits for the GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "combine.cuh"
#include "cuda_check.hpp"
#include "ep_layer.hpp"
#include "grouped_experts.cuh"
#include "permute.cuh"
#include "random_init.cuh"
#include "router.cuh"
#include "routing.cuh"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

using gpu::bf16;
static_assert(sizeof(bf16) == sizeof(bf16_bits), "bf16_bits and __nv_bfloat16 must have the same layout");

namespace {

// ids -> slots (rank-major expert order), so that build_dispatch_plan groups rows by (destination rank,
// local expert). One thread per id; the E-entry table sits in L1. Skipped for the linear placement,
// where slot == expert.
__global__ void ids_to_slots_kernel(const int* ids, int n, const int* slot_of, int* slots) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) slots[i] = slot_of[ids[i]];
}

template <typename T>
void grow(T*& p, std::size_t& cap, std::size_t need) {
  if (p && need <= cap) return;
  if (p) CUDA_CHECK(cudaFree(p));
  p = nullptr;
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(need, 1) * sizeof(T)));
  cap = need;
}

std::vector<dist::Transfer> to_transfers(const std::vector<EpPlan::Segment>& segs) {
  std::vector<dist::Transfer> t;
  t.reserve(segs.size());
  for (const auto& s : segs) t.push_back({s.peer, std::size_t(s.offset), std::size_t(s.rows)});
  return t;
}
std::vector<std::size_t> to_sizes(const std::vector<int>& v) { return {v.begin(), v.end()}; }

// Seeds of the random layer: one stream of values per (tensor, expert), so any rank can rebuild any part.
unsigned long long tensor_seed(std::uint64_t seed, int tensor, int index) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + std::uint64_t(tensor) * 0xBF58476D1CE4E5B9ull +
                    std::uint64_t(index + 1) * 0x94D049BB133111EBull;
  return z ^ (z >> 29);
}
enum Tensor { kGate = 1, kW1 = 2, kW3 = 3, kW2 = 4, kTokens = 5 };

class GpuEpLayer final : public EpLayer {
 public:
  GpuEpLayer(dist::Communicator& comm, const Placement& placement, int H, int I, int T, const RouterCfg& router,
             EpLayout layout)
      : comm_(comm), placement_(placement), H_(H), I_(I), E_(placement.num_experts()), T_(T),
        n_(placement.num_local(comm.rank())), router_(router), layout_(layout) {
    require(comm.memory() == dist::Memory::Device, "the GPU layer needs a device-memory (NCCL) communicator");
    s_ = reinterpret_cast<cudaStream_t>(comm.stream());
    CUBLAS_CHECK(cublasCreate(&handle_));
    CUBLAS_CHECK(cublasSetStream(handle_, s_));
    const std::size_t TK = std::size_t(T) * router.top_k;
    std::size_t cap = 0;
    grow(d_x_, cap, std::size_t(T) * H);
    grow(d_gate_, cap, std::size_t(E_) * H);
    grow(d_w13_, cap, std::size_t(n_) * 2 * I * H);
    grow(d_w2_, cap, std::size_t(n_) * H * I);
    grow(d_logits_, cap, std::size_t(T) * E_);
    grow(d_ids_, cap, TK);
    grow(d_slot_ids_, cap, TK);
    grow(d_weights_, cap, TK);
    grow(d_slot_of_, cap, std::size_t(E_));
    grow(d_counts_, cap, std::size_t(E_));
    grow(d_offsets_, cap, std::size_t(E_) + 1);
    grow(d_row_of_, cap, TK);
    grow(d_assign_, cap, TK);
    grow(d_send_, cap, TK * H);
    grow(d_yret_, cap, TK * H);
    grow(d_y_, cap, std::size_t(T) * H);
    CUDA_CHECK(cudaMallocHost(&h_counts_, sizeof(int) * std::max(E_, 1)));
    CUDA_CHECK(cudaEventCreateWithFlags(&counts_ready_, cudaEventDisableTiming));
    std::vector<int> slot_of(E_);
    identity_slots_ = true;
    for (int e = 0; e < E_; ++e) {
      slot_of[e] = placement.slot(e);
      identity_slots_ &= slot_of[e] == e;
    }
    CUDA_CHECK(cudaMemcpy(d_slot_of_, slot_of.data(), sizeof(int) * E_, cudaMemcpyHostToDevice));
  }

  ~GpuEpLayer() override {
    for (void* p : {(void*)d_x_, (void*)d_gate_, (void*)d_w13_, (void*)d_w2_, (void*)d_logits_, (void*)d_ids_,
                    (void*)d_slot_ids_, (void*)d_weights_, (void*)d_slot_of_, (void*)d_counts_, (void*)d_offsets_,
                    (void*)d_row_of_, (void*)d_assign_, (void*)d_send_, (void*)d_yret_, (void*)d_y_, (void*)d_recv_,
                    (void*)d_xg_, (void*)d_yg_, (void*)d_idx_})
      if (p) cudaFree(p);
    if (h_counts_) cudaFreeHost(h_counts_);
    if (h_idx_) cudaFreeHost(h_idx_);
    if (counts_ready_) cudaEventDestroy(counts_ready_);
    if (handle_) cublasDestroy(handle_);
  }

  // Checkpoint weights: gate as is; w1 and w3 of each local expert stacked into [2I, H]; w2 as is.
  void upload(const MoeLayerWeights& mine, std::span<const bf16_bits> x) {
    require(mine.num_held() == n_ && mine.hidden == H_ && mine.inter == I_, "GPU EP layer: weights do not match");
    require(x.size() == std::size_t(T_) * H_, "GPU EP layer: x has ", x.size(), " values, expected ",
            std::size_t(T_) * H_);
    const std::size_t IH = std::size_t(I_) * H_;
    std::vector<bf16_bits> w13(std::size_t(n_) * 2 * IH);
    for (int e = 0; e < n_; ++e) {
      std::copy_n(&mine.w1[e * IH], IH, &w13[(2 * e) * IH]);
      std::copy_n(&mine.w3[e * IH], IH, &w13[(2 * e + 1) * IH]);
    }
    CUDA_CHECK(cudaMemcpy(d_gate_, mine.gate.data(), mine.gate.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_w13_, w13.data(), w13.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_w2_, mine.w2.data(), mine.w2.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_x_, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  }

  // Random weights (generator's scales: gate and w1/w3 std 1/sqrt(H), w2 std 1/sqrt(I)) and tokens ~ 1.
  void randomize(std::uint64_t seed) {
    fill_layer(d_gate_, d_w13_, d_w2_, placement_.experts_of(comm_.rank()), H_, I_, E_, seed, s_);
    gpu::fill_random_bf16(d_x_, std::size_t(T_) * H_, 1.f, tensor_seed(seed, kTokens, comm_.rank()), s_);
    CUDA_CHECK(cudaStreamSynchronize(s_));
  }

  static void fill_layer(bf16* gate, bf16* w13, bf16* w2, const std::vector<int>& experts, int H, int I, int E,
                         std::uint64_t seed, cudaStream_t s) {
    const std::size_t IH = std::size_t(I) * H;
    const float sh = 1.f / std::sqrt(float(H)), si = 1.f / std::sqrt(float(I));
    gpu::fill_random_bf16(gate, std::size_t(E) * H, sh, tensor_seed(seed, kGate, 0), s);
    for (std::size_t le = 0; le < experts.size(); ++le) {
      const int e = experts[le];
      gpu::fill_random_bf16(w13 + (2 * le) * IH, IH, sh, tensor_seed(seed, kW1, e), s);
      gpu::fill_random_bf16(w13 + (2 * le + 1) * IH, IH, sh, tensor_seed(seed, kW3, e), s);
      gpu::fill_random_bf16(w2 + le * IH, IH, si, tensor_seed(seed, kW2, e), s);
    }
  }

  EpTimes forward() override {
    EpTimes t;
    const int H = H_, k = router_.top_k, TK = T_ * k;
    WallTimer clk;
    auto lap = [&](double& ms) {
      comm_.sync();  // polls the stream and NCCL's async error state (watchdog)
      ms = clk.ms();
      clk.reset();
    };

    // --- route
    gpu::router_logits(handle_, d_x_, d_gate_, T_, H, E_, d_logits_, s_);
    gpu::route_topk(d_logits_, T_, E_, k, router_.kind, router_.jitter_eps, d_ids_, d_weights_, s_);
    lap(t.route_ms);

    // --- dispatch
    const int* plan_ids = d_ids_;
    if (!identity_slots_ && TK > 0) {
      ids_to_slots_kernel<<<(TK + 255) / 256, 256, 0, s_>>>(d_ids_, TK, d_slot_of_, d_slot_ids_);
      CUDA_CHECK_LAUNCH();
      plan_ids = d_slot_ids_;
    }
    gpu::build_dispatch_plan(plan_ids, T_, k, E_, d_counts_, d_offsets_, d_row_of_, d_assign_, s_);
    CUDA_CHECK(cudaMemcpyAsync(h_counts_, d_counts_, sizeof(int) * E_, cudaMemcpyDeviceToHost, s_));
    CUDA_CHECK(cudaEventRecord(counts_ready_, s_));
    gpu::permute_rows(d_x_, d_assign_, TK, k, H, d_send_, s_);  // runs while the host exchanges counts
    CUDA_CHECK(cudaEventSynchronize(counts_ready_));
    plan_ = make_ep_counts_plan(placement_, comm_.rank(), std::span<const int>(h_counts_, E_));
    finish_ep_plan(plan_, placement_, comm_.allgather_int(plan_.slot_counts));
    const int R = plan_.recv_rows();
    // Buffers for received rows grow to the largest R seen (the warm-up forward allocates them).
    grow(d_xg_, cap_xg_, std::size_t(R) * H);  // grouped rows: the experts' input
    grow(d_yg_, cap_yg_, std::size_t(R) * H);  // the experts' output
    if (layout_ == EpLayout::Permute) grow(d_recv_, cap_recv_, std::size_t(R) * H);  // arrival order
    // Index upload, one copy: [local_offsets (n+1) | grouped_to_recv (R) | recv_to_grouped (R)]
    const std::size_t idx_n = std::size_t(n_) + 1 + (layout_ == EpLayout::Permute ? 2 * std::size_t(R) : 0);
    if (idx_n > idx_cap_) {
      if (h_idx_) CUDA_CHECK(cudaFreeHost(h_idx_));
      CUDA_CHECK(cudaMallocHost(&h_idx_, sizeof(int) * idx_n));
      std::size_t c = 0;
      if (d_idx_) CUDA_CHECK(cudaFree(d_idx_));
      d_idx_ = nullptr;
      grow(d_idx_, c, idx_n);
      idx_cap_ = idx_n;
    }
    std::copy(plan_.local_offsets.begin(), plan_.local_offsets.end(), h_idx_);
    if (layout_ == EpLayout::Permute) {
      std::copy(plan_.grouped_to_recv.begin(), plan_.grouped_to_recv.end(), h_idx_ + n_ + 1);
      std::copy(plan_.recv_to_grouped.begin(), plan_.recv_to_grouped.end(), h_idx_ + n_ + 1 + R);
    }
    CUDA_CHECK(cudaMemcpyAsync(d_idx_, h_idx_, sizeof(int) * idx_n, cudaMemcpyHostToDevice, s_));
    const int* d_local_offsets = d_idx_;
    const int* d_grouped_to_recv = d_idx_ + n_ + 1;
    const int* d_recv_to_grouped = d_idx_ + n_ + 1 + R;
    const std::size_t row = std::size_t(H) * sizeof(bf16);
    if (layout_ == EpLayout::Permute) {
      comm_.alltoallv(d_send_, to_sizes(plan_.send_counts), d_recv_, to_sizes(plan_.recv_counts), row);
      gpu::permute_rows(d_recv_, d_grouped_to_recv, R, 1, H, d_xg_, s_);  // a gather: k = 1
    } else {
      comm_.exchange(d_send_, to_transfers(plan_.send_segments), d_xg_, to_transfers(plan_.recv_segments), row);
    }
    lap(t.dispatch_ms);

    // --- experts (offsets on the host already: no wait inside grouped_experts)
    const gpu::ExpertWeightsDevice w{d_w13_, d_w2_, n_, H, I_};
    gpu::grouped_experts(handle_, w, d_xg_, d_local_offsets, plan_.local_offsets.data(), R, d_yg_, ws_, s_);
    lap(t.experts_ms);

    // --- combine
    if (layout_ == EpLayout::Permute) {
      gpu::permute_rows(d_yg_, d_recv_to_grouped, R, 1, H, d_recv_, s_);  // back to arrival order
      comm_.alltoallv(d_recv_, to_sizes(plan_.recv_counts), d_yret_, to_sizes(plan_.send_counts), row);
    } else {
      comm_.exchange(d_yg_, to_transfers(plan_.recv_segments), d_yret_, to_transfers(plan_.send_segments), row);
    }
    // the returned rows sit where they left the send buffer: row_of of the slot plan finds them
    gpu::unpermute_combine(d_yret_, d_row_of_, d_weights_, T_, k, H, d_y_, s_);
    lap(t.combine_ms);
    return t;
  }

  const EpPlan& plan() const override { return plan_; }

  Routing routing() override {
    Routing r;
    r.tokens = T_;
    r.k = router_.top_k;
    r.ids.resize(std::size_t(T_) * r.k);
    r.weights.resize(r.ids.size());
    CUDA_CHECK(cudaStreamSynchronize(s_));
    CUDA_CHECK(cudaMemcpy(r.ids.data(), d_ids_, r.ids.size() * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(r.weights.data(), d_weights_, r.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return r;
  }

  std::vector<float> output() override {
    std::vector<bf16_bits> y(std::size_t(T_) * H_);
    CUDA_CHECK(cudaStreamSynchronize(s_));
    CUDA_CHECK(cudaMemcpy(y.data(), d_y_, y.size() * 2, cudaMemcpyDeviceToHost));
    return bf16_to_float(std::span<const bf16_bits>(y));
  }

  std::size_t dispatch_row_bytes() const override { return std::size_t(H_) * 2; }
  std::size_t combine_row_bytes() const override { return std::size_t(H_) * 2; }

  // The same byte counts as the last forward, as plain all-to-all-v's between preallocated buffers.
  std::pair<double, double> raw_exchange_ms() override {
    const std::size_t row = std::size_t(H_) * 2;
    bf16* recv = layout_ == EpLayout::Permute ? d_recv_ : d_xg_;
    comm_.barrier();
    WallTimer clk;
    comm_.alltoallv(d_send_, to_sizes(plan_.send_counts), recv, to_sizes(plan_.recv_counts), row);
    comm_.sync();
    const double t1 = clk.ms();
    comm_.barrier();
    clk.reset();
    comm_.alltoallv(recv, to_sizes(plan_.recv_counts), d_yret_, to_sizes(plan_.send_counts), row);
    comm_.sync();
    return {t1, clk.ms()};
  }

 private:
  dist::Communicator& comm_;
  const Placement& placement_;
  int H_, I_, E_, T_, n_;
  RouterCfg router_;
  EpLayout layout_;
  cudaStream_t s_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  gpu::GroupedWorkspace ws_;
  bool identity_slots_ = true;
  bf16 *d_x_ = nullptr, *d_gate_ = nullptr, *d_w13_ = nullptr, *d_w2_ = nullptr;
  float *d_logits_ = nullptr, *d_weights_ = nullptr;
  int *d_ids_ = nullptr, *d_slot_ids_ = nullptr, *d_slot_of_ = nullptr, *d_counts_ = nullptr, *d_offsets_ = nullptr,
      *d_row_of_ = nullptr, *d_assign_ = nullptr;
  bf16 *d_send_ = nullptr, *d_yret_ = nullptr, *d_y_ = nullptr;
  bf16 *d_recv_ = nullptr, *d_xg_ = nullptr, *d_yg_ = nullptr;
  std::size_t cap_recv_ = 0, cap_xg_ = 0, cap_yg_ = 0;  // elements
  int* d_idx_ = nullptr;
  int* h_idx_ = nullptr;
  std::size_t idx_cap_ = 0;
  int* h_counts_ = nullptr;
  cudaEvent_t counts_ready_ = nullptr;
  EpPlan plan_;
};

}  // namespace

std::unique_ptr<EpLayer> make_gpu_ep_layer(dist::Communicator& comm, const Placement& placement,
                                           const MoeLayerWeights& mine, std::span<const bf16_bits> x, int T,
                                           const RouterCfg& router, EpLayout layout) {
  auto l = std::make_unique<GpuEpLayer>(comm, placement, mine.hidden, mine.inter, T, router, layout);
  l->upload(mine, x);
  return l;
}

std::unique_ptr<EpLayer> make_gpu_ep_layer_random(dist::Communicator& comm, const Placement& placement,
                                                  const RandomLayerSpec& spec, int T, const RouterCfg& router,
                                                  EpLayout layout) {
  auto l = std::make_unique<GpuEpLayer>(comm, placement, spec.hidden, spec.inter, T, router, layout);
  l->randomize(spec.seed);
  return l;
}

MoeLayerWeights random_layer_weights(const RandomLayerSpec& spec) {
  const int H = spec.hidden, I = spec.inter, E = spec.experts;
  const std::size_t IH = std::size_t(I) * H;
  MoeLayerWeights w;
  w.hidden = H;
  w.inter = I;
  w.num_experts = E;
  for (int e = 0; e < E; ++e) w.expert_ids.push_back(e);
  bf16 *gate = nullptr, *w13 = nullptr, *w2 = nullptr;
  CUDA_CHECK(cudaMalloc(&gate, std::size_t(E) * H * 2));
  CUDA_CHECK(cudaMalloc(&w13, 2 * IH * 2));
  CUDA_CHECK(cudaMalloc(&w2, IH * 2));
  w.gate.resize(std::size_t(E) * H);
  w.w1.resize(E * IH);
  w.w3.resize(E * IH);
  w.w2.resize(E * IH);
  for (int e = 0; e < E; ++e) {  // one expert at a time: little extra GPU memory
    GpuEpLayer::fill_layer(gate, w13, w2, {e}, H, I, E, spec.seed, nullptr);
    CUDA_CHECK(cudaMemcpy(&w.w1[e * IH], w13, IH * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(&w.w3[e * IH], w13 + IH, IH * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(&w.w2[e * IH], w2, IH * 2, cudaMemcpyDeviceToHost));
  }
  CUDA_CHECK(cudaMemcpy(w.gate.data(), gate, w.gate.size() * 2, cudaMemcpyDeviceToHost));
  cudaFree(gate);
  cudaFree(w13);
  cudaFree(w2);
  return w;
}

std::vector<bf16_bits> random_tokens(const RandomLayerSpec& spec, int rank, int T) {
  std::vector<bf16_bits> x(std::size_t(T) * spec.hidden);
  bf16* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<std::size_t>(x.size(), 1) * 2));
  gpu::fill_random_bf16(d, x.size(), 1.f, tensor_seed(spec.seed, kTokens, rank), nullptr);
  CUDA_CHECK(cudaMemcpy(x.data(), d, x.size() * 2, cudaMemcpyDeviceToHost));
  cudaFree(d);
  return x;
}

}  // namespace eplab
