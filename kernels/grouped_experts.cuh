// Grouped expert computation: every expert's SwiGLU MLP over the rows routed to it, in one go.
//
// What: xp [rows, H] holds the token rows permuted by expert (expert e owns rows [off[e], off[e+1]),
// from build_dispatch_plan + permute_rows). For each expert e with c_e = off[e+1] - off[e] rows:
//     gate_up = xp_e · w13_eᵀ          [c_e, 2I]   w13_e = [w1_e ; w3_e] stacked: [2I, H]
//     h       = bf16(silu(a) * b)       [c_e, I]    a = gate_up[:, :I], b = gate_up[:, I:]
//     yp_e    = h · w2_eᵀ               [c_e, H]    w2_e: [H, I]
// bf16 in and out, fp32 accumulation, h rounded to bf16 (the reference's round_h_to_bf16 = true).
// yp is NOT weighted by the router multipliers; unpermute_combine does that.
//
// Why two strategies. The work is 6·rows·H·I flops against 6·n_touched·H·I bytes of weights, so the
// arithmetic intensity is ~rows / n_touched flops per byte (2 flops per multiply-add, 2 bytes per bf16).
// H100/H200 need ~200-300 flops/byte (989 dense bf16 TFLOP/s over 3.35-4.8 TB/s) before bf16 tensor cores
// are the limit, so:
//
//  (1) WeightStream, small rows (decode; default rows <= 32): the layer is a pure weight stream. At T = 1
//      (Phi-tiny: 2 experts x 5.5 M params x 2 B = 22 MB) the floor is ~5 us at 4.8 TB/s, and anything
//      that needs the host (copying offsets back, sizing GEMMs on the CPU) costs more than that. So two
//      custom kernels read d_offsets ON THE DEVICE, with no host synchronisation and no per-expert launch
//      (the whole MoE forward can then be one CUDA graph):
//        w13+SwiGLU kernel: grid (ceil(I/4), min(n, rows)), 128 threads. blockIdx.y picks the y-th
//          expert that HAS rows (a warp ballot over d_offsets), so no block is wasted on empty experts:
//          at T = 1 the grid is 112 x 2. Each warp owns one intermediate index i: it streams row i of
//          w1_e and row i of w3_e (H bf16 each) with coalesced 16-byte loads, 8 loads per row in flight
//          per lane (32 KB per block), and applies each loaded weight vector to ALL of the expert's rows
//          (up to 8 rows per pass, fp32 accumulators in registers; more rows -> another pass, whose weight
//          reads hit L2). A warp reduction gives a and b for each row; lane 0 writes bf16(silu(a)·b).
//          SwiGLU is fused, so gate_up never exists in memory on this path.
//        w2 kernel: grid (ceil(H/32), min(n, rows)), 256 threads; 8 lanes share one output feature o and
//          stride over row o of w2_e (I bf16 = 896 B for Phi-tiny, 7 16-byte loads per lane); a warp
//          covers 4 consecutive features, a block 32. Same reuse of each weight vector over all rows,
//          3-step shuffle reduction within the 8 lanes.
//      Each weight byte is read from HBM exactly once per forward (per 8 rows of an expert at most once
//      more, from L2), fp32 FMAs on CUDA cores (the FLOPs are negligible at these sizes).
//      Needs H % 8 == 0, I % 8 == 0 and 16-byte aligned xp/yp; otherwise the CublasLoop path is used.
//
//  (2) cuBLAS, large rows (prefill, rows > 32): tensor cores. The GEMM sizes come from the HOST copy of the
//      offsets (cuBLAS takes m/n/k on the host), so this path costs one device->host copy of n+1 ints and
//      a wait for it; GpuMoeLayer hides that wait behind permute_rows. Three variants:
//        CublasGrouped (Auto for 33..4095 rows unless ws.auto_padded): cublasGemmGroupedBatchedEx (cuBLAS >= 12.5), one call for the w13 GEMMs
//          of all non-empty experts and one for the w2 GEMMs, each expert its own group (group_size 1,
//          n = c_e). Chosen because the per-expert GEMMs are small (Phi-tiny at T = 4096: ~512 x 896 x
//          4096 per expert, i.e. ~28 128x128 tiles, a fifth of an H100) and only a single launch over
//          all experts fills the GPU; it also keeps the launch count at 3 (+1 tiny pointer kernel)
//          independent of E. bf16 A/B/C with CUBLAS_COMPUTE_32F is a documented combination (the bf16
//          form has no fp32-C variant, hence gate_up in bf16). The per-matrix pointer arrays must live in
//          device memory: a one-block kernel writes them from d_offsets (no host->device copy, no race
//          with a previous call on a host staging buffer).
//        CublasLoop: cublasGemmEx per non-empty expert (2 GEMMs each) on the caller's stream. Works for any
//          shape and alignment; the fallback when the grouped API cannot be used (odd H or I).
//        CublasStreams (Auto from 4096 rows unless ws.auto_padded): the same per-expert GEMMs spread over 4 forked streams (own
//          cuBLAS handles), largest experts first. Measured on one H200 at Phi-tiny's shape (gpu_tests,
//          grouped_experts alone, median of 5): rows = 8192: grouped 0.365-0.372 ms, loop 0.351-0.370,
//          streams 0.284-0.353; rows = 32768: grouped 1.218-1.232, loop 0.676-0.679, streams 0.629-0.633.
//          The grouped API is the slowest at large rows (its kernels are generic over the groups; each
//          cublasGemmEx call gets a kernel picked for its exact shape), so large batches use streams.
//          Below ~4096 rows the per-expert launches (~32 cuBLAS calls the host must enqueue after the
//          offsets arrive) cost more than the GEMMs: whole layer at T = 64: streams 0.404 ms vs grouped
//          0.130; T = 512: 0.436 vs 0.141. 8 streams instead of 4: no better (0.46 / 0.62 ms at
//          8192 / 32768 rows); chaining each expert's SwiGLU on its stream: slower (more launches).
//        CublasPadded (Auto above small_rows_max when ws.auto_padded, i.e. in GpuMoeLayer; measured below):
//          the rows in the padded layout of padded_layout.cuh ([n, M_pad, H], M_pad = the largest
//          count rounded up to 64), then ONE cublasGemmStridedBatchedEx for all experts' w13 (batch = the
//          experts from the first to the last non-empty one, m = 2I, n = M_pad, k = H, A/B/C a fixed stride
//          apart), SwiGLU over the padded rows, ONE strided-batched GEMM for w2. Why it may beat streams at
//          large rows: the per-expert GEMMs (~512 x 896 x 4096 at T = 4096) are ~28 output tiles each, a fifth
//          of the GPU; streams overlap at most 4 of them, with a launch and a tail per GEMM, while one batched
//          call puts every expert's tiles in one grid (448 tiles at T = 4096: ~3.4 waves on 132 SMs) with a
//          kernel cuBLAS picks for that one shape. The price is the padding (sum_e M_pad - c_e rows of
//          wasted work: ~12-25 % at balanced routing) and, when one expert takes most rows, up to n x; so
//          M_pad is capped at padded_max_ratio x the mean count (padded_capacity_per_expert) and above the cap
//          this strategy runs cublas-streams instead (last_used says which ran). Called on contiguous rows
//          (this function), it pads and unpads with two extra copies; GpuMoeLayer instead permutes x straight
//          into the padded layout and combines straight from it (permute_rows_padded,
//          unpermute_combine_padded) and calls grouped_experts_padded for the GEMMs, so the layer pays no
//          extra pass. Not available with a group->expert map (grouped_experts_segments with d_expert_of):
//          the weights are then not a fixed stride apart; it runs cublas-streams there.
//          Measured (H200, whole layer in GpuMoeLayer, strategies interleaved in one run, median
//          ms, write / read L2 flush): T = 4096 padded 0.308 / 0.303 vs streams 0.400 / 0.396 vs grouped
//          0.484; T = 16384 0.918 / 0.907 vs streams 1.003 / 0.995 vs grouped 1.571; T = 64 0.119 vs grouped
//          0.143; T = 512 0.129 vs 0.157. Its w13 GEMM at T = 4096 runs at 81 % of the SMs' throughput
//          (ncu). Hence GpuMoeLayer's Auto (ws.auto_padded).
//      Row-major vs column-major: cuBLAS is column-major, and a row-major [R, C] matrix is the same bytes
//      as a column-major [C, R] one. We compute gate_upᵀ [2I, c_e] = w13_e(as [H, 2I] col-major)ᵀ ·
//      xp_eᵀ (as [H, c_e] col-major): transa = T, transb = N, m = 2I, n = c_e, k = H, lda = ldb = H,
//      ldc = 2I ("TN", the layout cuBLAS is fastest at). w2 likewise: m = H, n = c_e, k = I, lda = ldb = I,
//      ldc = H.
//
// Threshold: small_rows_max = 32 rows (T = 16 at top-2). Below it WeightStream reads every weight once
// and has no host round trip; above it the CUDA-core FMAs (6·rows·H·I) and per-8-row passes start to
// cost more than the host round trip plus tensor-core GEMMs. Measured (H200, whole layer, token-direct
// path vs cublas-grouped): T = 16 0.123 vs 0.125 ms, T = 32 0.157 vs 0.132, T = 64 0.249 vs 0.130. It is a
// knob of the workspace (GpuMoeLayer::set_expert_strategy sets it with the strategy); 02_moe_grouped
// --bench-experts compares strategies on the whole layer.
//
// Budget at Phi-tiny's shape (H = 4096, I = 448, E = 16, top-2) against the step's targets on an H200:
//   T = 1:     22 MB of weights -> ~5 us at HBM speed; measured, the 3 kernels of the direct path (router,
//              w1|w3, w2) take ~9-11 us each, latency chains rather than bandwidth (chapter 02 README), so
//              the layer replays the sync-free forward as one CUDA graph with programmatic dependent launch.
//   T = 4096:  6·8192·4096·448 = 90 GFLOP -> ~0.14 ms at ~650 TFLOP/s, leaving ~0.2 ms of the 0.35 ms for
//              router, plan, permute (reads x, writes 2x), SwiGLU and combine (~0.3 GB of traffic).
//   T = 16384: 360 GFLOP -> ~0.55 ms, leaving ~0.45 ms of the 1.0 ms for ~1.2 GB of memory-bound traffic.
//   So the large path must keep the GEMMs at >= 60% of peak: one grouped launch over all experts, the
//   fast "TN" layout, and no per-expert host work beyond building small argument arrays.
//
// Empty experts are skipped by every strategy (cublas-padded: those before the first and after the last
// non-empty one; empty ones in between are zero rows of the batch); rows = 0 returns without launching anything.
// The workspace (gate_up, h, pointer arrays, pinned offsets, extra streams) grows on demand and never
// shrinks, so after one call at the largest rows nothing is allocated again.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "device_buffer.hpp"

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

struct ExpertWeightsDevice {
  const bf16* w13;  // [n, 2I, H]: per expert I rows of w1 then I rows of w3
  const bf16* w2;   // [n, H, I]
  int n, H, I;
};

enum class GroupedStrategy { Auto, WeightStream, CublasGrouped, CublasLoop, CublasStreams, CublasPadded };
const char* grouped_strategy_name(GroupedStrategy s);

class GroupedWorkspace {
 public:
  GroupedWorkspace();
  ~GroupedWorkspace();
  GroupedWorkspace(const GroupedWorkspace&) = delete;
  GroupedWorkspace& operator=(const GroupedWorkspace&) = delete;

  // Knobs. Auto = WeightStream when rows <= small_rows_max, else CublasPadded (auto_padded), CublasGrouped
  // (below streams_min_rows) or CublasStreams. A forced strategy that
  // cannot run for a shape (WeightStream or CublasGrouped with H or I not a multiple of 8, or unaligned
  // xp/yp) quietly becomes CublasLoop, which runs everything.
  GroupedStrategy strategy = GroupedStrategy::Auto;
  int small_rows_max = 32;
  int streams_min_rows = 4096;  // Auto: cublas-grouped below this many rows, cublas-streams from here on
  // CublasPadded: M_pad may be at most this many times the mean rows per expert (padded_capacity_per_expert);
  // above, cublas-streams runs. Buffers for the padded layout are sized for that cap (at T = 16384 the
  // layer's scratch is 1.16 GiB at 2, 0.73 GiB at 1.25, 0.58 GiB unpadded).
  static constexpr float padded_max_ratio = 2.f;
  // Auto above small_rows_max: CublasPadded instead of CublasGrouped / CublasStreams. GpuMoeLayer sets it (its
  // permute writes the padded layout directly); callers with contiguous rows keep it off (pad + unpad copies).
  bool auto_padded = false;

  // What the last grouped_experts call actually ran (Auto resolved), for benchmarks.
  GroupedStrategy last_used = GroupedStrategy::Auto;
  // Bumped whenever a device buffer is (re)allocated: CUDA graphs that captured the old pointers are stale.
  unsigned generation = 0;

  // Internal state (used by grouped_experts.cu).
  DeviceBuffer<bf16> gate_up;  // [rows, 2I]
  DeviceBuffer<bf16> h;        // [rows, I]
  DeviceBuffer<bf16> xpad;     // CublasPadded on contiguous rows: the padded copies of xp and yp [n * M_pad, H]
  DeviceBuffer<bf16> ypad;
  DeviceBuffer<void*> ptrs;    // 6 arrays of n pointers (A1, B1, C1, A2, B2, C2)
  PinnedBuffer<int> h_offsets;  // host copy of the offsets [n+1]
  struct Aux;                   // extra streams + handles for CublasStreams
  Aux* aux = nullptr;
  // Host-side argument arrays for the grouped cuBLAS call (kept to avoid reallocating them per call).
  std::vector<int> m1, n1, k1, lda1, ldb1, ldc1, m2, k2, lda2, ldb2, ldc2, group_size;
  std::vector<float> alpha, beta;
  std::vector<cublasOperation_t> opT, opN;
};

// The strategy grouped_experts(ws, w, ..., rows, xp, yp) would run (Auto and impossible choices resolved).
GroupedStrategy choose_grouped_strategy(const GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows,
                                        const bf16* d_xp, const bf16* d_yp);
// True when that strategy needs the offsets on the host (then grouped_experts waits for them unless the
// caller passes h_offsets).
bool grouped_strategy_needs_host_offsets(GroupedStrategy s);

// Grows every buffer grouped_experts needs for `rows` rows now, so a later call allocates nothing (call it
// before capturing a CUDA graph or entering a timed loop). With CublasPadded: gate_up and h for the padded
// cap; the xpad / ypad copies that only grouped_experts on contiguous rows needs are allocated on its first
// call (the strategy syncs with the host anyway and is never captured in a graph).
void reserve_grouped_workspace(GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows);

// d_xp [rows, H] permuted by expert, d_offsets [n+1] on the device (offsets[n] == rows), h_offsets: the same
// offsets on the host, or nullptr (then a cuBLAS strategy copies them back itself and waits for them;
// WeightStream never needs them). Writes d_yp [rows, H]. Enqueued on stream s; the handle's stream is
// set to s. Host-synchronous only when a cuBLAS strategy runs with h_offsets == nullptr.
// d_yp may alias d_xp: every strategy reads all of xp (w13 GEMMs / kernel) before anything writes yp
// (w2 GEMMs / kernel, after the SwiGLU); the EP layer relies on this to keep one buffer for both.
void grouped_experts(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xp, const int* d_offsets,
                     const int* h_offsets, int rows, bf16* d_yp, GroupedWorkspace& ws, cudaStream_t s);

// The GEMMs of CublasPadded on rows already in the padded layout (padded_layout.cuh): d_xpad [n * m_pad, H]
// -> d_ypad [n * m_pad, H], h_offsets [n+1] on the host (for the range of non-empty experts), m_pad >= every
// count, a multiple of kPadMultiple. Rows of experts outside the first..last non-empty range are not
// written; padding rows get w2(SwiGLU(w13 · row)), zeros for zero rows. Sets ws.last_used = CublasPadded.
// GpuMoeLayer's path (see CublasPadded above).
void grouped_experts_padded(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xpad,
                            const int* h_offsets, int m_pad, bf16* d_ypad, GroupedWorkspace& ws, cudaStream_t s);

// The same over G groups of rows that need not be one per expert: group g = rows [offsets[g], offsets[g+1])
// of xp, computed with the weights of expert expert_of[g] (several groups may name the same expert; a
// group may be empty). Chapter 04's expert-parallel layer runs its experts straight on the arrival buffer
// this way: one group per (source rank, local expert) segment, no local permute. d_expert_of and
// h_expert_of hold the same G values (device for WeightStream / CublasGrouped, host for the cuBLAS loops);
// both null means group g is expert g (then G must equal w.n: exactly grouped_experts above). Costs: each
// group is its own GEMM (or weight-stream block row), so an expert split over N groups does N smaller
// GEMMs, and on the WeightStream path streams its weights up to N times (later times mostly from L2).
void grouped_experts_segments(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xp, int G,
                              const int* d_offsets /*[G+1]*/, const int* h_offsets /*[G+1] or null*/,
                              const int* d_expert_of /*[G] or null*/, const int* h_expert_of /*[G] or null*/,
                              int rows, bf16* d_yp, GroupedWorkspace& ws, cudaStream_t s);
// reserve_grouped_workspace for grouped_experts_segments with G groups.
void reserve_grouped_workspace(GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows, int groups);

// Token-direct weight streaming for small batches (GpuMoeLayer's decode path): the same weight-streaming
// kernels, but each block finds its expert's rows from d_ids [T, k] itself and reads x rows through
// them, and the w2 kernel applies the multipliers d_weights [T, k] and sums the k choices of each token
// in shared memory, writing y [T, H] directly. So no dispatch plan, no permute and no combine kernel:
// 2 launches instead of 5. h is kept per assignment (row t*k + j) in the workspace. Requires
// experts_direct_ok: T*k <= kDirectMaxRows, H and I multiples of 8, 16-byte aligned x, y, weights,
// and the per-block shared memory (token partial sums) under 48 KB. No host synchronisation.
constexpr int kDirectMaxRows = 1024;
bool experts_direct_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k);
void experts_direct(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s);
// experts_direct's second kernel alone: y [T, H] from h [T*k, I] (per assignment), ids and multipliers.
// For experts_decode's hybrid (its w13 kernel, this w2 kernel). Same requirements as experts_direct. pdl:
// launched with programmatic dependent launch; the kernel then reads ids, multipliers and its first weights
// while the previous kernel still runs, and waits for it (griddepcontrol.wait) only before reading h. Only
// valid behind a kernel that triggers its dependents after ids and multipliers are final (experts_decode's
// w13 kernel does so right after its own wait for the router).
void w2_combine_direct_launch(const ExpertWeightsDevice& w, const bf16* d_h, const int* d_ids, const float* d_weights,
                              int T, int k, bf16* d_y, cudaStream_t s, bool pdl = false);

}  // namespace eplab::gpu
