// EpMoeGpu: the expert-parallel MoE layer on one rank's GPU (see ep_moe_gpu.hpp for the flow and layouts).
//
// Streams. Main stream s = comm.stream(): route, plan, count exchange, NCCL exchanges, experts, combine.
// Side stream s2 (InPlace only): the send-side permute, in two kernels whose row ranges are read on the GPU:
//   remote rows  (to other ranks, into the send buffer)  start right after the plan, before the counts are
//                known on the host, so they overlap the count exchange and the host's planning;
//   own rows     (straight into the front of the arrival buffer) start once the host has sized that
//                buffer, and overlap the NCCL exchange of the remote rows.
// Events order the two: the exchange waits for the remote permute, the experts for the own rows.
//
// Host waits: one per forward, for the N x E count table (comm.sync(): NCCL needs every message size on
// the host); plus, with time_stages, one at the end of each stage.
//
// Chunked pipeline (InPlace, chunks C > 1; C = 1 runs the flow above exactly as before):
//
//   time ─────────────────────────────────────────────────────────────────────────────────────────────────►
//   side  [piece 0][piece 1][piece 2][piece 3][own rows]               [local tokens][tokens of 0][.. of 1] ..
//   main  [counts][host wait] [NCCL 0][NCCL 1][NCCL 2][NCCL 3][experts][back 0][back 1][back 2][back 3]
//                             └ waits for piece 0's event only (one event per piece)
//
//   Piece c of the rows for peer p is rows [cnt*c/C, cnt*(c+1)/C) of p's block (cnt = rows for p;
//   common/moe/ep_pieces.hpp); the receiver cuts what it gets from p by the same rule, so both sides post
//   the same sizes, and every rank posts its C groups in the same order c = 0..C-1 (each group pairs with
//   the same group on every peer: no deadlock). Empty pieces are left out on both sides. The count exchange
//   is queued before the pieces here, so the C extra launches do not delay the host's one wait.
//   Combine: the return exchange travels in the same pieces. A token whose k rows all stayed on this rank
//   (read from the expert output) needs none of them: those tokens are combined on the side stream while
//   the first piece travels; a token with remote rows is combined on the side stream as soon as the piece
//   holding its last remote row is back (combine_class), while the next piece travels. Only the tokens of
//   the last piece are combined after the exchange. Every token is still computed whole, by the same
//   per-element code (combine_load/combine_sum below: fp32, j = 0..k-1, one rounding), so the bits equal
//   C = 1's. (Keeping an fp32 partial sum of the tokens whose rows arrive in different pieces would also be
//   exact, but it writes and re-reads 4 bytes per element to save waiting for one piece.)
//
// Timeline (set_timeline): CUDA events with timing, recorded on the stream where each step happens, so
// they measure the GPU's own clock without adding host waits; read once the stream has drained.
//
// Profiling: every forward opens NVTX ranges route / plan / dispatch / experts / combine (nvtx_range.hpp)
// inside one "EpMoeGpu::forward" range, so Nsight Systems shows each rank's data path by name.
//
// Kernel versions in this file (all bandwidth-bound copies / gathers, one thread per 16 bytes when rows
// are 16-byte aligned, else per element; grid-stride with a capped grid so NCCL's blocks still find room,
// and several vectors in flight per thread: kernels/grid_stride.cuh):
//   ids_to_slots_kernel    ids -> slots (rank-major expert order), for non-linear placements
//   permute_part_kernel    send-side permute of the remote rows (-> send buffer) or the own rows (-> arrival)
//   segment_table_kernel   the (source, local expert) segment offsets of the arrival buffer, from the count table
//   (the combine: combine.cuh's combine_rows, own rows read from the expert output, the others from the
//    returned rows; combine_rows_class for the chunked pipeline's classes of tokens)
//   permute_piece_kernel   (chunked) piece c of the remote rows of every peer -> send buffer
#include "ep_moe_gpu.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>

#include "combine.cuh"
#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "device_util.cuh"
#include "grid_stride.cuh"
#include "grouped_experts.cuh"
#include "moe/ep_pieces.hpp"
#include "nvtx_range.hpp"
#include "permute.cuh"
#include "random_init.cuh"
#include "moe_router.cuh"
#include "router.cuh"
#include "routing.cuh"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

using gpu::bf16;
static_assert(sizeof(bf16) == sizeof(bf16_bits), "bf16_bits and __nv_bfloat16 must have the same layout");

namespace {

// ---------------------------------------------------------------- kernels

// Vectors in flight per thread (kernels/grid_stride.cuh): the permutes copy 4 at a time.
constexpr int kCopyUnroll = 4;

// ids -> slots, so that build_dispatch_plan groups rows by (destination rank, local expert). Row i is token
// i / k's choice of expert e = ids[i]; e's replicas are replica_slots[e * max_rep ...] (replica_count[e] of
// them) and the token's index picks one: placement.hpp's slot_for. The tables sit in L1. Skipped for the
// linear placement without replicas, where slot == expert.
__global__ void ids_to_slots_kernel(const int* ids, int n, int k, const int* replica_slots, const int* replica_count,
                                    int max_rep, int* slots) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int e = ids[i], t = i / k;
  slots[i] = replica_slots[e * max_rep + t % replica_count[e]];
}

// One row = per_row elements of V (int4 = 8 bf16, or one bf16).
// own == false: send rows [0, lo) and [hi, TK) -> send[r]          (the rows other ranks receive)
// own == true:  send rows [lo, hi)           -> arrival[r - lo]    (this rank's own rows)
// lo = offsets[lo_slot], hi = offsets[hi_slot]: this rank's slots in the slot plan, read here because the
// host does not know them yet when the remote part is launched. Row r holds token assignment[r] / k;
// a negative assignment (an invalid id upstream) gives a zero row, as permute_rows does.
template <typename V>
__global__ void permute_part_kernel(const V* __restrict__ x, const int* __restrict__ assignment, int TK, int k,
                                    int per_row, const int* __restrict__ offsets, int lo_slot, int hi_slot, bool own,
                                    V* __restrict__ send, V* __restrict__ arrival) {
  const int lo = offsets[lo_slot], hi = offsets[hi_slot];
  const std::size_t rows = own ? std::size_t(hi - lo) : std::size_t(TK - (hi - lo));
  gpu::copy_unrolled<kCopyUnroll, V>(rows * per_row, [&](std::size_t i, const V*& src, V*& dst) {
    const int q = int(i / per_row), v = int(i - std::size_t(q) * per_row);
    const int r = own ? lo + q : (q < lo ? q : q + (hi - lo));
    const int a = assignment[r];
    src = a >= 0 ? x + std::size_t(a / k) * per_row + v : nullptr;
    dst = own ? arrival + std::size_t(r - lo) * per_row + v : send + std::size_t(r) * per_row + v;
  });
}

// Piece c of C of the rows that travel: for every peer p != me, rows [a + piece_begin(cnt, c, C),
// a + piece_begin(cnt, c + 1, C)) of its block [a, a + cnt) = [offsets[rank_slot[p]], offsets[rank_slot[p+1]])
// -> send[r], exactly as permute_part_kernel (own == false) writes them. The block bounds are read here:
// the pieces are queued before the host knows the counts.
template <typename V>
__global__ void permute_piece_kernel(const V* __restrict__ x, const int* __restrict__ assignment, int k, int per_row,
                                     const int* __restrict__ offsets, const int* __restrict__ rank_slot, int N, int me,
                                     int c, int C, V* __restrict__ send) {
  for (int p = 0; p < N; ++p) {
    if (p == me) continue;
    const int a = offsets[rank_slot[p]], cnt = offsets[rank_slot[p + 1]] - a;
    const int r0 = a + piece_begin(cnt, c, C), r1 = a + piece_begin(cnt, c + 1, C);
    gpu::copy_unrolled<kCopyUnroll, V>(std::size_t(r1 - r0) * per_row, [&](std::size_t i, const V*& src, V*& dst) {
      const int q = int(i / per_row), v = int(i - std::size_t(q) * per_row);
      const int r = r0 + q;
      const int as = assignment[r];
      src = as >= 0 ? x + std::size_t(as / k) * per_row + v : nullptr;
      dst = send + std::size_t(r) * per_row + v;
    });
  }
}

// The arrival buffer of the InPlace layout: this rank's own rows first, then every other rank's block in
// rank order; each block is ordered by local expert. Group g = (block b, local expert le) = b * n + le:
// goff[G+1] row offsets, gexp[G] = le. all: [N, S] (S slots). One thread: G = N * n entries (about S), once
// per forward.
__global__ void segment_table_kernel(const int* __restrict__ all, int N, int E, int me, int my0, int n,
                                     int* __restrict__ goff, int* __restrict__ gexp) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int g = 0, off = 0;
  goff[0] = 0;
  for (int b = 0; b < N; ++b) {
    const int src = b == 0 ? me : (b <= me ? b - 1 : b);
    for (int le = 0; le < n; ++le, ++g) {
      off += all[std::size_t(src) * E + my0 + le];
      gexp[g] = le;
      goff[g + 1] = off;
    }
  }
}

// ---------------------------------------------------------------- helpers

using gpu::aligned16;

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

// Random weights (generator's scales: gate and w1/w3 std 1/sqrt(H), w2 std 1/sqrt(I)).
void fill_layer(bf16* gate, bf16* w13, bf16* w2, const std::vector<int>& experts, int H, int I, int E,
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

}  // namespace

// ---------------------------------------------------------------- the shared workspace

// Scratch of every EpMoeGpu on one communicator. Used by one forward at a time (they run in order on the
// communicator's stream), so nothing in here outlives a forward except the capacities.
struct EpWorkspace {
  cudaStream_t s = nullptr;   // comm.stream()
  cudaStream_t s2 = nullptr;  // side stream (own)
  cublasHandle_t blas = nullptr;
  gpu::GroupedWorkspace gws;
  gpu::TiledRouterWorkspace rws;  // the tiled router's split-K partials (moe_router.cuh)
  cudaEvent_t ev_plan = nullptr, ev_remote = nullptr, ev_side = nullptr, ev_experts = nullptr;
  std::vector<cudaEvent_t> ev_piece;     // chunked pipeline: piece c of the remote rows is in the send buffer
  std::vector<cudaEvent_t> ev_returned;  // chunked pipeline: return piece c has arrived
  int sms = 1;

  DeviceBuffer<float> logits;
  DeviceBuffer<int> slot_ids, counts, offsets, row_of, assign, all_counts, goff, gexp, idx;
  DeviceBuffer<bf16> send, xg, recv;
  PinnedBuffer<int> h_all;  // [N*S]
  PinnedBuffer<int> h_idx;  // uploads of the Permute / Direct layouts

  explicit EpWorkspace(cudaStream_t stream) : s(stream) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&blas));
    CUBLAS_CHECK(cublasSetStream(blas, s));
    for (cudaEvent_t* e : {&ev_plan, &ev_remote, &ev_side, &ev_experts})
      CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    sms = gpu::sm_count();
  }
  ~EpWorkspace() {  // no throwing here: errors at exit (dead context) are ignored; the buffers go after this
    if (s) cudaStreamSynchronize(s);
    if (s2) cudaStreamSynchronize(s2);
    for (cudaEvent_t e : {ev_plan, ev_remote, ev_side, ev_experts})
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : ev_piece) cudaEventDestroy(e);
    for (cudaEvent_t e : ev_returned) cudaEventDestroy(e);
    if (blas) cublasDestroy(blas);
    if (s2) cudaStreamDestroy(s2);
  }
  EpWorkspace(const EpWorkspace&) = delete;
  EpWorkspace& operator=(const EpWorkspace&) = delete;

  // Grid for a grid-stride copy of `work` threads: at most 4 blocks of 256 per SM, so that NCCL's
  // kernels, which run at the same time, still get SMs.
  unsigned grid(std::size_t work) const {
    return unsigned(std::max<std::size_t>(1, std::min<std::size_t>((work + 255) / 256, std::size_t(sms) * 4)));
  }
  // At least n piece events (created once, kept for later forwards).
  void grow_piece_events(int n) {
    for (std::vector<cudaEvent_t>* v : {&ev_piece, &ev_returned})
      while (int(v->size()) < n) {
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        v->push_back(e);
      }
  }
  // s waits for everything queued on s2 so far.
  void join_side() {
    CUDA_CHECK(cudaEventRecord(ev_side, s2));
    CUDA_CHECK(cudaStreamWaitEvent(s, ev_side, 0));
  }
};

namespace {

// One workspace per communicator, alive while some layer uses it.
std::shared_ptr<EpWorkspace> shared_workspace(dist::Communicator& comm) {
  static std::mutex mu;
  static std::map<const void*, std::weak_ptr<EpWorkspace>> all;
  std::lock_guard<std::mutex> lock(mu);
  auto& w = all[&comm];
  if (auto p = w.lock()) return p;
  auto p = std::make_shared<EpWorkspace>(reinterpret_cast<cudaStream_t>(comm.stream()));
  w = p;
  return p;
}

}  // namespace

// ---------------------------------------------------------------- the layer

struct EpMoeGpu::Impl {
  dist::Communicator& comm;
  Placement placement;
  int H, I, E, N, me, n, k;
  int S;  // slots (placement.hpp): E without replicas; every per-slot array below has S entries
  RouterCfg router;
  EpLayout layout;
  std::shared_ptr<EpWorkspace> ws;
  cudaStream_t s = nullptr;
  bool identity_slots = true;
  int lo_slot = 0, hi_slot = 0;  // this rank's slots: [first_slot(me), first_slot(me + 1))

  // per layer: weights, slot table, the last forward's routing and plan
  DeviceBuffer<bf16> gate, w13, w2;
  DeviceBuffer<int> replica_slots, replica_count;  // [E, max_rep], [E]: placement.replicas on the GPU
  int max_rep = 1;
  DeviceBuffer<int> ids;
  DeviceBuffer<float> weights;
  int last_T = 0;
  EpPlan plan;
  std::vector<int> h_goff, h_gexp;  // InPlace: the segment table on the host
  int chunks = 1;                   // the chunked pipeline (InPlace): pieces per peer message
  DeviceBuffer<int> rank_slot;      // [N+1] placement.first_slot(p): where each rank's block starts
  // The kernels' choices (the lesson's --bench options and the tests set them; Auto otherwise).
  RouterImpl router_impl = RouterImpl::Auto;
  ExpertStrategy strategy = ExpertStrategy::Auto;
  int small_rows = 32;

  // N = 1: the single-GPU layer runs the forward (forward_local); nothing above is allocated then.
  std::unique_ptr<GpuMoeLayer> local;
  std::unique_ptr<MoeStageEvents> local_events;  // its stage boundaries, for time_stages and the timeline
  bool local_timeline = false;                   // the last forward recorded local_events' boundaries
  bool plan_stale = false;                       // plan() must be rebuilt from the last routing
  DeviceBuffer<bf16> raw_a, raw_b;               // N = 1: raw_exchange_ms's copy of the same bytes

  // ------------------------------------------------------------ timeline
  // The marks of one forward, in the order the table prints them. Each is a CUDA event recorded on the
  // stream named in brackets, right after the work it names was queued there, so it fires when the GPU
  // has finished that work (main = comm.stream(), side = the permute / combine stream):
  enum Mark {
    kStart,           // [main] the forward's first work: everything below is ms after this
    kRouted,          // [main] router logits + top-k / sparsemixer done
    kPlan,            // [main] dispatch plan over slots (counts, offsets, row_of) built on the GPU
    kCounts,          // [main] the NCCL count exchange done: every rank's E counts on this GPU
    kHostCounts,      // [main] recorded right after comm.sync() returned: the N x E table reached the host
                      //        and the host went on (its one wait ends here; what follows is queued after)
    kRemotePermuted,  // [side] the send-side permute of the rows that travel done (the last piece)
    kDispatched,      // [main] the dispatch exchange done (its last piece arrived)
    kOwnPermuted,     // [side] InPlace: this rank's own rows written to the front of the arrival buffer
    kExperts,         // [main] grouped experts done
    kLocalCombined,   // [side] chunks > 1: tokens whose rows all stayed here, combined during the return exchange
    kReturned,        // [main] the return exchange done
    kCombined,        // [main] y complete (the side stream joined)
    kMarks
  };
  static constexpr const char* kMarkNames[kMarks] = {
      "start",           "routed",        "plan built",           "counts on GPU",
      "host has counts", "remote rows permuted (side)",            "dispatch exchange done",
      "own rows permuted (side)",         "experts done",         "local tokens combined (side)",
      "return exchange done",             "combine done"};
  bool timeline_on = false;
  cudaEvent_t tl_ev[kMarks] = {};  // with timing; created on first use
  bool tl_set[kMarks] = {};        // recorded in the last forward

  void mark(Mark m, cudaStream_t st) {
    if (!timeline_on) return;
    if (!tl_ev[m]) CUDA_CHECK(cudaEventCreate(&tl_ev[m]));
    CUDA_CHECK(cudaEventRecord(tl_ev[m], st));
    tl_set[m] = true;
  }
  // The recorded marks, ms after kStart. Waits for the main stream (every side-stream mark is joined into it
  // before a forward ends).
  EpTimeline read_timeline() {
    EpTimeline out;
    if (local) {  // N = 1: the single-GPU layer's stage boundaries
      if (!local_timeline) return out;
      const std::pair<MoeBoundary, const char*> marks[] = {
          {kMoeRoutingDone, "routed"}, {kMoePermuted, "rows permuted by expert"},
          {kMoeExpertsDone, "experts done"}, {kMoeCombined, "combine done"}};
      out.emplace_back("start", 0.0);
      for (const auto& [b, name] : marks) out.emplace_back(name, double(local_events->ms(kMoeStart, b)));
      return out;
    }
    if (!tl_set[kStart]) return out;
    comm.sync();
    for (int m = 0; m < kMarks; ++m) {
      if (!tl_set[m]) continue;
      CUDA_CHECK(cudaEventSynchronize(tl_ev[m]));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, tl_ev[kStart], tl_ev[m]));
      out.emplace_back(kMarkNames[m], double(ms));
    }
    return out;
  }

  Impl(dist::Communicator& c, const Placement& p, int hidden, int inter, const RouterCfg& r, EpLayout l)
      : comm(c), placement(p), H(hidden), I(inter), E(p.num_experts()), N(p.num_ranks()), me(c.rank()),
        n(p.num_local(c.rank())), k(r.top_k), router(r), layout(l) {
    require(comm.memory() == dist::Memory::Device,
            "EpMoeGpu needs a device-memory (NCCL) communicator; the MPI one is the CPU path's");
    require(N == comm.size(), "EpMoeGpu: the placement is for ", N, " ranks but the communicator has ", comm.size());
    require(H > 0 && I > 0 && k >= 1 && k <= E, "EpMoeGpu: bad layer shape H=", H, " I=", I, " top-k=", k, " E=", E);
    S = placement.num_slots();
    require(N > 1 || !placement.has_replicas(), "EpMoeGpu: replicas of experts need at least 2 ranks (one GPU "
            "holds every expert once)");
    if (N == 1)  // the single-GPU layer stores expert e at index e
      for (int e = 0; e < E; ++e)
        require(placement.experts_of(0)[std::size_t(e)] == e, "EpMoeGpu: one rank holds the experts in id order; "
                "this map puts expert ", placement.experts_of(0)[std::size_t(e)], " in slot ", e);
    if (N == 1) {  // the single-GPU layer holds the weights and runs the forward (forward_local)
      s = reinterpret_cast<cudaStream_t>(comm.stream());
      return;
    }
    ws = shared_workspace(comm);
    s = ws->s;
    lo_slot = placement.first_slot(me);
    hi_slot = placement.first_slot(me + 1);
    gate.grow(std::size_t(E) * H);
    w13.grow(std::size_t(n) * 2 * I * H);
    w2.grow(std::size_t(n) * H * I);
    max_rep = placement.max_replicas();
    std::vector<int> table(std::size_t(E) * max_rep, 0), count(E);
    for (int e = 0; e < E; ++e) {
      const std::vector<int>& r = placement.replicas(e);
      count[e] = int(r.size());
      std::copy(r.begin(), r.end(), table.begin() + std::ptrdiff_t(e) * max_rep);
      identity_slots &= r.size() == 1 && r[0] == e;
    }
    replica_slots = DeviceBuffer<int>(table);
    replica_count = DeviceBuffer<int>(count);
    std::vector<int> rs(N + 1);
    for (int p = 0; p <= N; ++p) rs[p] = placement.first_slot(p);
    rank_slot = DeviceBuffer<int>(rs);
  }

  ~Impl() {  // the buffers are freed after this, once the streams are idle
    if (s) cudaStreamSynchronize(s);
    if (ws && ws->s2) cudaStreamSynchronize(ws->s2);
    for (cudaEvent_t e : tl_ev)
      if (e) cudaEventDestroy(e);
  }

  // Checkpoint weights: gate as is; w1 and w3 of each local expert stacked into [2I, H]; w2 as is.
  void upload(const MoeLayerWeights& mine) {
    require(mine.hidden == H && mine.inter == I && mine.num_experts == E, "EpMoeGpu: weights of shape H=", mine.hidden,
            " I=", mine.inter, " E=", mine.num_experts, " do not match the layer (H=", H, " I=", I, " E=", E, ")");
    require(mine.expert_ids == placement.experts_of(me), "EpMoeGpu: rank ", me,
            " was given the wrong experts (load exactly placement.experts_of(rank), in that order)");
    if (N == 1) {
      local = std::make_unique<GpuMoeLayer>(mine, router.kind, k, router.jitter_eps);
      return;
    }
    const std::size_t IH = std::size_t(I) * H;
    require(mine.gate.size() == std::size_t(E) * H && mine.w1.size() == n * IH && mine.w3.size() == n * IH &&
                mine.w2.size() == n * IH,
            "EpMoeGpu: weight tensors have the wrong sizes for ", n, " experts of H=", H, " I=", I);
    std::vector<bf16_bits> packed(std::size_t(n) * 2 * IH);
    for (int e = 0; e < n; ++e) {
      std::copy_n(&mine.w1[e * IH], IH, &packed[(2 * e) * IH]);
      std::copy_n(&mine.w3[e * IH], IH, &packed[(2 * e + 1) * IH]);
    }
    CUDA_CHECK(cudaMemcpy(gate.get(), mine.gate.data(), mine.gate.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(w13.get(), packed.data(), packed.size() * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(w2.get(), mine.w2.data(), mine.w2.size() * 2, cudaMemcpyHostToDevice));
  }

  gpu::ExpertWeightsDevice experts() const { return {w13.get(), w2.get(), std::max(n, 1), H, I}; }

  // Every rank's S slot counts into ws->all_counts [N*S] on the GPU (NCCL, self by a device copy), then
  // one copy to the host; the host waits for it in comm.sync().
  void exchange_counts() {
    EpWorkspace& w = *ws;
    const std::size_t row = sizeof(int) * S;
    CUDA_CHECK(
        cudaMemcpyAsync(w.all_counts.get() + std::size_t(me) * S, w.counts.get(), row, cudaMemcpyDeviceToDevice, s));
    if (N > 1) {
      std::vector<dist::Transfer> sends, recvs;
      for (int p = 0; p < N; ++p)
        if (p != me) {
          sends.push_back({p, 0, 1});
          recvs.push_back({p, std::size_t(p), 1});
        }
      comm.exchange(w.counts.get(), sends, w.all_counts.get(), recvs, row);
    }
    mark(kCounts, s);
    if (layout == EpLayout::InPlace && n > 0)
      segment_table_kernel<<<1, 32, 0, s>>>(w.all_counts.get(), N, S, me, placement.first_slot(me), n, w.goff.get(),
                                            w.gexp.get());
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemcpyAsync(w.h_all.get(), w.all_counts.get(), row * N, cudaMemcpyDeviceToHost, s));
  }

  void permute_part(const bf16* d_x, int TK, bool own, cudaStream_t st) {
    EpWorkspace& w = *ws;
    if (TK == 0) return;
    if (H % 8 == 0 && aligned16(d_x)) {
      const int per_row = H / 8;
      permute_part_kernel<int4><<<w.grid(std::size_t(TK) * per_row), 256, 0, st>>>(
          reinterpret_cast<const int4*>(d_x), w.assign.get(), TK, k, per_row, w.offsets.get(), lo_slot, hi_slot, own,
          reinterpret_cast<int4*>(w.send.get()), reinterpret_cast<int4*>(w.xg.get()));
    } else {
      permute_part_kernel<bf16><<<w.grid(std::size_t(TK) * H), 256, 0, st>>>(
          d_x, w.assign.get(), TK, k, H, w.offsets.get(), lo_slot, hi_slot, own, w.send.get(), w.xg.get());
    }
    CUDA_CHECK_LAUNCH();
  }

  // Chunked pipeline: piece c of C of the remote rows (every peer's block) -> send buffer, on stream st.
  void permute_piece(const bf16* d_x, int TK, int c, cudaStream_t st) {
    EpWorkspace& w = *ws;
    if (TK == 0 || N == 1) return;
    const std::size_t rows = std::size_t(TK) / chunks + 1;  // about one piece of every block together
    if (H % 8 == 0 && aligned16(d_x)) {
      const int per_row = H / 8;
      permute_piece_kernel<int4><<<w.grid(rows * per_row), 256, 0, st>>>(
          reinterpret_cast<const int4*>(d_x), w.assign.get(), k, per_row, w.offsets.get(), rank_slot.get(), N, me, c,
          chunks, reinterpret_cast<int4*>(w.send.get()));
    } else {
      permute_piece_kernel<bf16><<<w.grid(rows * H), 256, 0, st>>>(d_x, w.assign.get(), k, H, w.offsets.get(),
                                                                   rank_slot.get(), N, me, c, chunks, w.send.get());
    }
    CUDA_CHECK_LAUNCH();
  }

  // The combine on stream st (combine.cuh): every token (cls = kAllTokens), or one class of tokens of the chunked
  // pipeline (cls = -1: all rows stayed here; c: the last remote row came back in return piece c). Own rows are
  // read from the arrival buffer's front, the others from where they left the send buffer.
  static constexpr int kAllTokens = -2;
  void combine(bf16* d_y, int T, int cls, cudaStream_t st) {
    EpWorkspace& w = *ws;
    const gpu::CombineSources src{w.send.get(), w.xg.get(), w.offsets.get(), lo_slot, hi_slot};
    const unsigned cap = unsigned(w.sms) * 4;  // leave SMs for NCCL's kernels, which run at the same time
    if (cls == kAllTokens)
      gpu::combine_rows(src, w.row_of.get(), weights.get(), T, k, H, d_y, st, cap);
    else
      gpu::combine_rows_class(src, w.row_of.get(), weights.get(), T, k, H, d_y, {cls, rank_slot.get(), N, chunks}, st,
                              cap);
  }

  // Piece c of C of one message (a peer's whole block), by piece_begin: what both sides post.
  static dist::Transfer piece_of(const dist::Transfer& b, int c, int C) {
    const int rows = int(b.rows), p0 = piece_begin(rows, c, C), p1 = piece_begin(rows, c + 1, C);
    return {b.peer, b.offset + std::size_t(p0), std::size_t(p1 - p0)};
  }
  // The non-empty pieces c of C of every message in `blocks` -> out (what one group of the pipeline posts).
  static void pieces_of(const std::vector<dist::Transfer>& blocks, int c, int C, std::vector<dist::Transfer>& out) {
    out.clear();
    for (const dist::Transfer& b : blocks)
      if (const dist::Transfer q = piece_of(b, c, C); q.rows) out.push_back(q);
  }

  // ------------------------------------------------------------ one forward: route -> dispatch -> experts -> combine
  //
  // dispatch() returns the forward's layout handle (EpDispatch): what the exchange put where. experts() runs
  // on the rows it names and combine() sends them back by it, so the two directions cannot disagree.
  struct EpDispatch {
    int T = 0, TK = 0;
    int R = 0;                               // rows this rank's experts run on (the arrival buffer)
    bool piped = false;                      // the chunked pipeline (InPlace, chunks > 1)
    std::vector<dist::Transfer> arrived;     // InPlace: the other ranks' blocks of the arrival buffer
    std::vector<dist::Transfer> sent;        // InPlace: this rank's blocks of the send buffer, per peer
  };

  // Stage clock of a timed forward (time_stages): each lap drains the stream and takes the wall time.
  bool timing = false;
  WallTimer stage_clock;
  void lap(double& ms) {
    if (!timing) return;
    comm.sync();  // polls the stream and NCCL's async error state (watchdog)
    ms = stage_clock.ms();
    stage_clock.reset();
  }

  EpTimes forward(const bf16* d_x, int T, bf16* d_y, bool time_stages) {
    require(T >= 0, "EpMoeGpu::forward_device: T must be >= 0, got ", T);
    require(T == 0 || (d_x && d_y && d_x != d_y), "EpMoeGpu::forward_device: d_x and d_y must be distinct device buffers");
    std::fill(std::begin(tl_set), std::end(tl_set), false);
    last_T = T;
    if (local) return forward_local(d_x, T, d_y, time_stages);
    NvtxRange whole("EpMoeGpu::forward");
    NvtxStages stage;  // route, plan, dispatch, experts, combine (nvtx_range.hpp)
    EpTimes t;
    timing = time_stages;
    stage_clock.reset();
    grow_buffers(T);
    mark(kStart, s);
    stage.next("route");
    route(d_x, T);
    lap(t.route_ms);
    const EpDispatch h = dispatch(d_x, T, stage);
    lap(t.dispatch_ms);
    stage.next("experts");
    run_experts(h);
    lap(t.experts_ms);
    stage.next("combine");
    combine_back(h, d_y);
    lap(t.combine_ms);
    if (time_stages && timeline_on) t.timeline = read_timeline();  // the stream has drained: no extra wait
    return t;
  }

  // Buffers that depend on T only (grow to the largest T seen).
  void grow_buffers(int T) {
    EpWorkspace& w = *ws;
    const int TK = T * k;
    ids.grow(std::size_t(TK));
    weights.grow(std::size_t(TK));
    w.logits.grow(std::size_t(T) * E);
    w.slot_ids.grow(std::size_t(TK));
    w.counts.grow(std::size_t(S));
    w.offsets.grow(std::size_t(S) + 1);
    w.row_of.grow(std::size_t(TK));
    w.assign.grow(std::size_t(TK));
    w.all_counts.grow(std::size_t(N) * S);
    w.goff.grow(std::size_t(N) * std::max(n, 1) + 1);
    w.gexp.grow(std::size_t(N) * std::max(n, 1));
    w.send.grow(std::size_t(TK) * H);
    w.h_all.grow(std::size_t(N) * S);
    if (layout == EpLayout::InPlace && chunks > 1) w.grow_piece_events(chunks);
  }

  // The single-GPU layer's route stage (moe_router.cuh): the same kernels at every EP size.
  void route(const bf16* d_x, int T) {
    EpWorkspace& w = *ws;
    if (T > 0) {
      gpu::reserve_router(w.rws, gate.get(), T, H, E);
      gpu::route_tokens(router_impl, w.blas, d_x, gate.get(), T, H, E, k, router.kind, router.jitter_eps,
                        w.logits.get(), ids.get(), weights.get(), w.rws, s);
    }
    mark(kRouted, s);
  }

  // Plan over slots, count exchange, send-side permute and the exchange of the rows: returns the handle.
  EpDispatch dispatch(const bf16* d_x, int T, NvtxStages& stage) {
    EpWorkspace& w = *ws;
    EpDispatch h;
    h.T = T;
    h.TK = T * k;
    h.piped = layout == EpLayout::InPlace && chunks > 1;
    const int TK = h.TK;
    stage.next("plan");
    const int* plan_ids = ids.get();
    if (!identity_slots && TK > 0) {
      ids_to_slots_kernel<<<(TK + 255) / 256, 256, 0, s>>>(ids.get(), TK, k, replica_slots.get(), replica_count.get(),
                                                           max_rep, w.slot_ids.get());
      CUDA_CHECK_LAUNCH();
      plan_ids = w.slot_ids.get();
    }
    gpu::build_dispatch_plan(plan_ids, T, k, S, w.counts.get(), w.offsets.get(), w.row_of.get(), w.assign.get(), s);
    mark(kPlan, s);
    stage.next("dispatch");
    // The send-side permute on the side stream, while the counts travel and the host plans (InPlace: the
    // remote rows only; the others: every row, into the send buffer).
    CUDA_CHECK(cudaEventRecord(w.ev_plan, s));
    CUDA_CHECK(cudaStreamWaitEvent(w.s2, w.ev_plan, 0));
    if (!h.piped) {
      if (layout == EpLayout::InPlace) permute_part(d_x, TK, /*own=*/false, w.s2);
      else if (TK > 0) gpu::permute_rows(d_x, w.assign.get(), TK, k, H, w.send.get(), w.s2);
      mark(kRemotePermuted, w.s2);
      CUDA_CHECK(cudaEventRecord(w.ev_remote, w.s2));
      exchange_counts();
    } else {
      exchange_counts();  // queued first: the host's one wait needs it, the pieces do not
      for (int c = 0; c < chunks; ++c) {
        permute_piece(d_x, TK, c, w.s2);
        CUDA_CHECK(cudaEventRecord(w.ev_piece[c], w.s2));
      }
      mark(kRemotePermuted, w.s2);
    }
    comm.sync();  // the count table is on the host (and the watchdog knows we are alive)
    mark(kHostCounts, s);
    plan = make_ep_counts_plan(placement, me, std::span<const int>(w.h_all.get() + std::size_t(me) * S, S));
    // Only Permute reads the per-row maps; building them is O(R) host work on the dispatch's critical path.
    finish_ep_plan(plan, placement, std::span<const int>(w.h_all.get(), std::size_t(N) * S),
                   layout == EpLayout::Permute ? EpRowMaps::Build : EpRowMaps::Skip);
    h.R = plan.recv_rows();
    const std::size_t row = std::size_t(H) * sizeof(bf16);
    w.xg.grow(std::size_t(h.R) * H);  // experts' input and (aliased) output

    if (layout == EpLayout::InPlace) {
      // arrival buffer: own rows [0, own), then every other rank's block in rank order
      const int own = plan.recv_counts[me];
      int off = own;
      for (int p = 0; p < N; ++p) {
        if (p == me) continue;
        if (plan.send_counts[p])
          h.sent.push_back({p, std::size_t(plan.send_offsets[p]), std::size_t(plan.send_counts[p])});
        if (plan.recv_counts[p]) h.arrived.push_back({p, std::size_t(off), std::size_t(plan.recv_counts[p])});
        off += plan.recv_counts[p];
      }
      if (!h.piped) {
        CUDA_CHECK(cudaStreamWaitEvent(s, w.ev_remote, 0));
        if (!h.sent.empty() || !h.arrived.empty()) comm.exchange(w.send.get(), h.sent, w.xg.get(), h.arrived, row);
      } else {
        // Piece c of every block, sent as soon as its permute is done. Every rank posts the same C groups
        // in the same order; both sides cut a block by piece_begin, so the sizes match; empty pieces are
        // left out on both sides.
        std::vector<dist::Transfer> ps, pr;
        for (int c = 0; c < chunks; ++c) {
          pieces_of(h.sent, c, chunks, ps);
          pieces_of(h.arrived, c, chunks, pr);
          CUDA_CHECK(cudaStreamWaitEvent(s, w.ev_piece[c], 0));
          if (!ps.empty() || !pr.empty()) comm.exchange(w.send.get(), ps, w.xg.get(), pr, row);
        }
      }
      mark(kDispatched, s);
      if (own > 0) permute_part(d_x, TK, /*own=*/true, w.s2);  // concurrent with the exchange
      mark(kOwnPermuted, w.s2);
      w.join_side();
      // the same segment table the GPU built, on the host (the cuBLAS paths size their GEMMs from it)
      h_goff.assign(1, 0);
      h_gexp.clear();
      for (int b = 0; b < N && n > 0; ++b) {
        const int src = b == 0 ? me : (b <= me ? b - 1 : b);
        for (int le = 0; le < n; ++le) {
          h_goff.push_back(h_goff.back() + w.h_all.get()[std::size_t(src) * S + lo_slot + le]);
          h_gexp.push_back(le);
        }
      }
      require(h_goff.back() == h.R, "EpMoeGpu: segment table covers ", h_goff.back(), " rows, expected ", h.R);
    } else {
      const int R = h.R;
      // Index upload, one copy: [local_offsets (n+1) | grouped_to_recv (R) | recv_to_grouped (R)]
      if (layout == EpLayout::Permute) w.recv.grow(std::size_t(R) * H);
      const std::size_t idx_n = std::size_t(n) + 1 + (layout == EpLayout::Permute ? 2 * std::size_t(R) : 0);
      w.h_idx.grow(idx_n);
      w.idx.grow(idx_n);
      std::copy(plan.local_offsets.begin(), plan.local_offsets.end(), w.h_idx.get());
      if (layout == EpLayout::Permute) {
        std::copy(plan.grouped_to_recv.begin(), plan.grouped_to_recv.end(), w.h_idx.get() + n + 1);
        std::copy(plan.recv_to_grouped.begin(), plan.recv_to_grouped.end(), w.h_idx.get() + n + 1 + R);
      }
      CUDA_CHECK(cudaMemcpyAsync(w.idx.get(), w.h_idx.get(), sizeof(int) * idx_n, cudaMemcpyHostToDevice, s));
      CUDA_CHECK(cudaStreamWaitEvent(s, w.ev_remote, 0));  // the send buffer is complete
      if (layout == EpLayout::Permute) {
        comm.alltoallv(w.send.get(), to_sizes(plan.send_counts), w.recv.get(), to_sizes(plan.recv_counts), row);
        mark(kDispatched, s);
        if (R > 0) gpu::permute_rows(w.recv.get(), w.idx.get() + n + 1, R, 1, H, w.xg.get(), s);  // a gather: k = 1
      } else {
        comm.exchange(w.send.get(), to_transfers(plan.send_segments), w.xg.get(), to_transfers(plan.recv_segments),
                      row);
        mark(kDispatched, s);
      }
    }
    return h;
  }

  // This rank's experts on the rows the dispatch put in the arrival buffer, output written over their
  // input (grouped_experts reads all of it first).
  void run_experts(const EpDispatch& h) {
    EpWorkspace& w = *ws;
    w.gws.strategy = strategy;  // the workspace is shared by the layers: set this layer's choice
    w.gws.small_rows_max = small_rows;
    if (h.R > 0 && n > 0) {
      if (layout == EpLayout::InPlace)
        gpu::grouped_experts_segments(w.blas, experts(), w.xg.get(), int(h_gexp.size()), w.goff.get(), h_goff.data(),
                                      w.gexp.get(), h_gexp.data(), h.R, w.xg.get(), w.gws, s);
      else
        gpu::grouped_experts(w.blas, experts(), w.xg.get(), w.idx.get(), plan.local_offsets.data(), h.R, w.xg.get(),
                             w.gws, s);
    }
    mark(kExperts, s);
  }

  // The rows go back to where they left the send buffer; y[t] = Σ_j w[t,j] · row(t,j).
  void combine_back(const EpDispatch& h, bf16* d_y) {
    EpWorkspace& w = *ws;
    const std::size_t row = std::size_t(H) * sizeof(bf16);
    const int T = h.T;
    if (layout == EpLayout::InPlace) {
      // my expert outputs back to their owners (the blocks that arrived), theirs into my send buffer
      if (!h.piped) {
        if (!h.arrived.empty() || !h.sent.empty()) comm.exchange(w.xg.get(), h.arrived, w.send.get(), h.sent, row);
        mark(kReturned, s);
        combine(d_y, T, kAllTokens, s);
      } else {
        // The tokens that need nothing from the return exchange, on the side stream, while it runs.
        CUDA_CHECK(cudaEventRecord(w.ev_experts, s));
        CUDA_CHECK(cudaStreamWaitEvent(w.s2, w.ev_experts, 0));
        combine(d_y, T, -1, w.s2);
        mark(kLocalCombined, w.s2);
        // The return exchange in the dispatch's pieces (the same rule, the same C groups in the same order on
        // every rank). The tokens whose last remote row came back in piece c are combined on the side stream
        // while piece c + 1 travels; a piece that brings nothing back here has no tokens to combine.
        std::vector<dist::Transfer> ps, pr;
        for (int c = 0; c < chunks; ++c) {
          pieces_of(h.arrived, c, chunks, ps);
          pieces_of(h.sent, c, chunks, pr);
          if (ps.empty() && pr.empty()) continue;
          comm.exchange(w.xg.get(), ps, w.send.get(), pr, row);
          if (pr.empty()) continue;
          CUDA_CHECK(cudaEventRecord(w.ev_returned[c], s));
          CUDA_CHECK(cudaStreamWaitEvent(w.s2, w.ev_returned[c], 0));
          combine(d_y, T, c, w.s2);
        }
        mark(kReturned, s);
        w.join_side();
      }
    } else {
      const int R = h.R;
      if (layout == EpLayout::Permute) {
        if (R > 0)
          gpu::permute_rows(w.xg.get(), w.idx.get() + n + 1 + R, R, 1, H, w.recv.get(), s);  // back to arrival order
        comm.alltoallv(w.recv.get(), to_sizes(plan.recv_counts), w.send.get(), to_sizes(plan.send_counts), row);
      } else {
        comm.exchange(w.xg.get(), to_transfers(plan.recv_segments), w.send.get(), to_transfers(plan.send_segments),
                      row);
      }
      mark(kReturned, s);
      // the returned rows sit where they left the send buffer: row_of of the slot plan finds them
      gpu::unpermute_combine(w.send.get(), w.row_of.get(), weights.get(), T, k, H, d_y, s);
    }
    mark(kCombined, s);
  }

  // ------------------------------------------------------------ N = 1: the single-GPU layer is the data path
  // One rank has no peers: dispatch is the local permute by expert, and the layer of moe_gpu.hpp runs the
  // whole forward with its fast chain (the token-direct decode kernels, the padded GEMMs, CUDA graphs).
  EpTimes forward_local(const bf16* d_x, int T, bf16* d_y, bool time_stages) {
    plan_stale = true;
    EpTimes t;
    if (T == 0) return t;
    if (!time_stages && !timeline_on) {
      local->forward_device(d_x, T, d_y, MoePath::Grouped, s);
      return t;
    }
    if (!local_events) local_events = std::make_unique<MoeStageEvents>();
    local->forward_device_observed(d_x, T, d_y, MoePath::Grouped, s, *local_events);
    local_timeline = timeline_on;
    if (time_stages) {
      const MoeTimings m = local_events->eager_split();
      t.route_ms = m.router_ms + m.routing_ms;
      t.dispatch_ms = m.permute_ms;
      t.experts_ms = m.experts_ms;
      t.combine_ms = m.combine_ms;
      if (timeline_on) t.timeline = read_timeline();
    }
    return t;
  }

  // The N = 1 plan, from the routing on the host (reports ask for it; the forward itself needs none).
  void refresh_local_plan() {
    if (!plan_stale) return;
    const Routing r = local->last_routing(last_T);
    std::vector<int> counts(std::size_t(E), 0);
    for (int id : r.ids)
      if (id >= 0 && id < E) ++counts[std::size_t(placement.slot(id))];
    plan = make_ep_counts_plan(placement, 0, counts);
    finish_ep_plan(plan, placement, counts, EpRowMaps::Skip);
    plan_stale = false;
  }

  // The same byte counts as the last forward (self rows included, as nccl-tests counts them), as plain
  // all-to-all-v's between preallocated buffers.
  std::pair<double, double> raw_exchange_ms() {
    if (local) {  // one rank: no exchange; the ceiling is a device copy of the same bytes each way
      const std::size_t bytes = std::size_t(last_T) * k * H * sizeof(bf16);
      raw_a.grow(bytes / sizeof(bf16) + 1);
      raw_b.grow(bytes / sizeof(bf16) + 1);
      double ms[2];
      for (double& m : ms) {
        comm.sync();
        WallTimer clk;
        CUDA_CHECK(cudaMemcpyAsync(raw_b.get(), raw_a.get(), bytes, cudaMemcpyDeviceToDevice, s));
        comm.sync();
        m = clk.ms();
      }
      return {ms[0], ms[1]};
    }
    require(plan.finished, "EpMoeGpu::raw_exchange_ms: run forward_device first");
    EpWorkspace& w = *ws;
    const std::size_t row = std::size_t(H) * 2;
    w.xg.grow(std::size_t(plan.recv_rows()) * H);
    comm.sync();
    comm.barrier();
    WallTimer clk;
    comm.alltoallv(w.send.get(), to_sizes(plan.send_counts), w.xg.get(), to_sizes(plan.recv_counts), row);
    comm.sync();
    const double t1 = clk.ms();
    comm.barrier();
    clk.reset();
    comm.alltoallv(w.xg.get(), to_sizes(plan.recv_counts), w.send.get(), to_sizes(plan.send_counts), row);
    comm.sync();
    return {t1, clk.ms()};
  }

};

EpMoeGpu::EpMoeGpu(dist::Communicator& comm, const Placement& placement, const MoeLayerWeights& mine,
                   const RouterCfg& router, EpLayout layout)
    : impl_(std::make_unique<Impl>(comm, placement, mine.hidden, mine.inter, router, layout)) {
  impl_->upload(mine);
}

EpMoeGpu::EpMoeGpu(dist::Communicator& comm, const Placement& placement, const RandomSpec& spec,
                   const RouterCfg& router, EpLayout layout)
    : impl_(std::make_unique<Impl>(comm, placement, spec.hidden, spec.inter, router, layout)) {
  require(spec.experts == placement.num_experts(), "EpMoeGpu: random spec has ", spec.experts,
          " experts but the placement ", placement.num_experts());
  Impl& m = *impl_;
  if (m.N == 1) {  // the same values as every EP size (fill_layer per expert), in the single-GPU layer
    const std::vector<int> all = placement.experts_of(0);
    m.local = std::make_unique<GpuMoeLayer>(spec.hidden, spec.inter, spec.experts, router.kind, router.top_k,
                                            router.jitter_eps, [&](bf16* gate, bf16* w13, bf16* w2, cudaStream_t s) {
                                              fill_layer(gate, w13, w2, all, spec.hidden, spec.inter, spec.experts,
                                                         spec.seed, s);
                                            });
    return;
  }
  fill_layer(impl_->gate.get(), impl_->w13.get(), impl_->w2.get(), placement.experts_of(comm.rank()), spec.hidden,
             spec.inter, spec.experts, spec.seed, impl_->s);
  CUDA_CHECK(cudaStreamSynchronize(impl_->s));
}

EpMoeGpu::~EpMoeGpu() = default;

EpTimes EpMoeGpu::forward_device(const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y, bool time_stages) {
  return impl_->forward(d_x, T, d_y, time_stages);
}

void EpMoeGpu::set_chunks(int chunks) {
  require(chunks >= 1 && chunks <= kMaxChunks, "EpMoeGpu::set_chunks: chunks must be in [1, ", kMaxChunks, "], got ",
          chunks);
  require(chunks == 1 || impl_->layout == EpLayout::InPlace,
          "EpMoeGpu::set_chunks: chunks > 1 pipelines the inplace layout only; this layer uses another layout");
  impl_->chunks = chunks;
}
int EpMoeGpu::chunks() const { return impl_->chunks; }
void EpMoeGpu::set_timeline(bool on) { impl_->timeline_on = on; }
EpTimeline EpMoeGpu::last_timeline() { return impl_->read_timeline(); }

const EpPlan& EpMoeGpu::plan() const {
  if (impl_->local) impl_->refresh_local_plan();
  return impl_->plan;
}

void EpMoeGpu::set_expert_strategy(ExpertStrategy strategy, int small_rows_max) {
  require(small_rows_max >= 0, "EpMoeGpu::set_expert_strategy: small_rows_max must be >= 0, got ", small_rows_max);
  Impl& m = *impl_;
  m.strategy = strategy;
  m.small_rows = small_rows_max;
  if (m.local) m.local->set_expert_strategy(strategy, small_rows_max);
}
ExpertStrategy EpMoeGpu::expert_strategy() const { return impl_->strategy; }

void EpMoeGpu::set_router_impl(RouterImpl r) {
  impl_->router_impl = r;
  if (impl_->local) impl_->local->set_router_impl(r);
}

void EpMoeGpu::set_use_graphs(bool on) {
  if (impl_->local) impl_->local->set_use_graphs(on);
}

std::uint64_t EpMoeGpu::buffers_generation() const {
  return impl_->local ? impl_->local->buffers_generation() : 0;
}

Routing EpMoeGpu::routing(int rows) {
  Impl& m = *impl_;
  if (m.local) {
    CUDA_CHECK(cudaStreamSynchronize(m.s));
    return m.local->last_routing(rows);
  }
  require(rows == m.last_T, "EpMoeGpu::routing: asked for ", rows, " rows, the last forward had ", m.last_T);
  return routing();
}

Routing EpMoeGpu::routing() {
  Impl& m = *impl_;
  if (m.local) return routing(m.last_T);
  Routing r;
  r.tokens = m.last_T;
  r.k = m.k;
  r.ids.resize(std::size_t(m.last_T) * m.k);
  r.weights.resize(r.ids.size());
  CUDA_CHECK(cudaStreamSynchronize(m.s));
  if (!r.ids.empty()) {
    CUDA_CHECK(cudaMemcpy(r.ids.data(), m.ids.get(), r.ids.size() * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(r.weights.data(), m.weights.get(), r.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
  return r;
}

int EpMoeGpu::hidden() const { return impl_->H; }
int EpMoeGpu::inter() const { return impl_->I; }
int EpMoeGpu::num_local_experts() const { return impl_->n; }
EpLayout EpMoeGpu::layout() const { return impl_->layout; }
std::size_t EpMoeGpu::weight_bytes() const {
  const Impl& m = *impl_;
  return (std::size_t(m.E) * m.H + std::size_t(m.n) * 3 * m.I * m.H) * sizeof(bf16);
}
std::size_t EpMoeGpu::row_bytes() const { return std::size_t(impl_->H) * sizeof(bf16); }
std::pair<double, double> EpMoeGpu::raw_exchange_ms() { return impl_->raw_exchange_ms(); }

// ---------------------------------------------------------------- the random layer on the host

MoeLayerWeights random_layer_weights(const EpMoeGpu::RandomSpec& spec) {
  const int H = spec.hidden, I = spec.inter, E = spec.experts;
  const std::size_t IH = std::size_t(I) * H;
  MoeLayerWeights w;
  w.hidden = H;
  w.inter = I;
  w.num_experts = E;
  for (int e = 0; e < E; ++e) w.expert_ids.push_back(e);
  DeviceBuffer<bf16> gate(std::size_t(E) * H), w13(2 * IH), w2(IH);
  w.gate.resize(std::size_t(E) * H);
  w.w1.resize(E * IH);
  w.w3.resize(E * IH);
  w.w2.resize(E * IH);
  for (int e = 0; e < E; ++e) {  // one expert at a time: little extra GPU memory
    fill_layer(gate.get(), w13.get(), w2.get(), {e}, H, I, E, spec.seed, nullptr);
    CUDA_CHECK(cudaMemcpy(&w.w1[e * IH], w13.get(), IH * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(&w.w3[e * IH], w13.get() + IH, IH * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(&w.w2[e * IH], w2.get(), IH * 2, cudaMemcpyDeviceToHost));
  }
  CUDA_CHECK(cudaMemcpy(w.gate.data(), gate.get(), w.gate.size() * 2, cudaMemcpyDeviceToHost));
  return w;
}

void random_tokens_device(const EpMoeGpu::RandomSpec& spec, int rank, int T, __nv_bfloat16* d_x) {
  if (T > 0) gpu::fill_random_bf16(d_x, std::size_t(T) * spec.hidden, 1.f, tensor_seed(spec.seed, kTokens, rank), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<bf16_bits> random_tokens(const EpMoeGpu::RandomSpec& spec, int rank, int T) {
  std::vector<bf16_bits> x(std::size_t(T) * spec.hidden);
  DeviceBuffer<bf16> d(std::max<std::size_t>(x.size(), 1));
  random_tokens_device(spec, rank, T, d.get());
  CUDA_CHECK(cudaMemcpy(x.data(), d.get(), x.size() * 2, cudaMemcpyDeviceToHost));
  return x;
}

}  // namespace eplab
