#include "permute.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSmemInts = 12288;      // 48 KiB: the default dynamic shared memory limit, no opt-in needed
constexpr int kSingleBlockMaxN = 16384;
constexpr int kMultiWarps = 8;        // warps (= chunks) per block in the multi-block path
constexpr int kMinChunk = 512;

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += o;
  }
  return v;
}

// The expert of assignment a, or -1 when a is past the chunk or the id is out of range.
__device__ __forceinline__ int load_expert(const int* ids, int a, int end, int E) {
  if (a >= end) return -1;
  const int e = ids[a];
  return (e >= 0 && e < E) ? e : -1;
}

// One warp adds the histogram of ids[begin, end) to cnt[0..E) (shared memory, private to this warp).
// Lanes with the same expert form one __match_any_sync group; its lowest lane adds the group size.
// Leaders of one round hold distinct experts, so there are no conflicting updates.
__device__ void warp_count(const int* ids, int begin, int end, int E, int* cnt, int lane) {
  for (int base = begin; base < end; base += 32) {  // base is warp-uniform: all lanes run every round
    const int e = load_expert(ids, base + lane, end, E);
    const unsigned grp = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(grp) - 1) cnt[e] += __popc(grp);
    __syncwarp();
  }
}

// One warp scatters ids[begin, end): cursor[e] (this warp's, shared memory) holds the next free row of
// expert e for this chunk. Rank inside a round = number of lower lanes in the same group, so rows follow
// increasing a (stable).
__device__ void warp_scatter(const int* ids, int begin, int end, int E, int* cursor, int* row_of, int* assignment,
                             int lane) {
  const unsigned below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    const int a = base + lane;
    const int e = load_expert(ids, a, end, E);
    const unsigned grp = __match_any_sync(kFullMask, e);
    if (a < end) {
      if (e >= 0) {
        const int row = cursor[e] + __popc(grp & below);
        row_of[a] = row;
        assignment[row] = a;
      } else {
        row_of[a] = -1;
      }
    }
    __syncwarp();  // every lane has read cursor[e] before the leader moves it
    if (e >= 0 && lane == __ffs(grp) - 1) cursor[e] += __popc(grp);
    __syncwarp();
  }
}

// a[0..E) counts -> a[0..E] exclusive prefix sums, a[E] = total. Whole block, blockDim.x a multiple of 32
// (<= 1024); warp_tot: 32 ints of shared memory. Each thread scans a contiguous segment of a.
__device__ void block_exclusive_scan(int* a, int E, int* warp_tot) {
  const int nt = blockDim.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
  const int per = (E + nt - 1) / nt;
  const int lo = min(E, tid * per), hi = min(E, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += a[i];
  const int incl = warp_inclusive_scan(sum, lane);
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int wt = lane < nw ? warp_tot[lane] : 0;
    const int wincl = warp_inclusive_scan(wt, lane);
    __syncwarp();
    if (lane < nw) warp_tot[lane] = wincl - wt;
  }
  __syncthreads();
  int run = warp_tot[warp] + incl - sum;
  for (int i = lo; i < hi; ++i) {
    const int c = a[i];
    a[i] = run;
    run += c;
  }
  if (tid == nt - 1) a[E] = run;  // the last thread's segment ends at E (possibly empty): run = total
  __syncthreads();
}

// Invalid ids are not given a row; the rows they would have taken stay at the end: mark them -1.
__device__ void fill_unused_tail(int* assignment, int total, int n) {
  for (int r = total + blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x) assignment[r] = -1;
}

// n <= kSingleBlockMaxN: the whole plan in one block. Shared: cnt[W][E], offs[E+1], warp_tot[32].
__global__ void plan_single_block_kernel(const int* __restrict__ ids, int n, int E, int* __restrict__ counts,
                                         int* __restrict__ offsets, int* __restrict__ row_of,
                                         int* __restrict__ assignment) {
  extern __shared__ int smem[];
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* cnt = smem;
  int* offs = cnt + W * E;
  int* warp_tot = offs + E + 1;
  const int chunk = (n + W - 1) / W;
  const int begin = min(n, warp * chunk), end = min(n, begin + chunk);
  int* mine = cnt + warp * E;

  for (int e = lane; e < E; e += 32) mine[e] = 0;
  __syncwarp();
  warp_count(ids, begin, end, E, mine, lane);
  __syncthreads();
  // Per expert: exclusive prefix over the chunks in order (in place), total = count.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < W; ++w) {
      const int c = cnt[w * E + e];
      cnt[w * E + e] = run;
      run += c;
    }
    counts[e] = run;
    offs[e] = run;
  }
  __syncthreads();
  block_exclusive_scan(offs, E, warp_tot);
  for (int i = threadIdx.x; i <= E; i += blockDim.x) offsets[i] = offs[i];
  for (int e = lane; e < E; e += 32) mine[e] += offs[e];  // this chunk's first row for each expert
  __syncwarp();
  warp_scatter(ids, begin, end, E, mine, row_of, assignment, lane);
  fill_unused_tail(assignment, offs[E], n);
}

// Multi-block path, chunk c = [c*C, c == nb-1 ? n : (c+1)*C). Its E counters live in row_of[c*C + e].
__device__ __forceinline__ void chunk_range(int c, int nb, int C, int n, int& begin, int& end) {
  begin = c * C;
  end = (c == nb - 1) ? n : begin + C;
}

// Phase 1: one warp per chunk writes the chunk's histogram into row_of[c*C, c*C + E).
__global__ void plan_chunk_count_kernel(const int* __restrict__ ids, int n, int E, int C, int nb,
                                        int* __restrict__ row_of) {
  extern __shared__ int smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = blockIdx.x * (blockDim.x >> 5) + warp;
  if (c >= nb) return;  // no block-wide barrier in this kernel
  int* cnt = smem + warp * E;
  for (int e = lane; e < E; e += 32) cnt[e] = 0;
  __syncwarp();
  int begin, end;
  chunk_range(c, nb, C, n, begin, end);
  warp_count(ids, begin, end, E, cnt, lane);
  for (int e = lane; e < E; e += 32) row_of[begin + e] = cnt[e];
}

// Phase 2: one warp per expert e turns column e of the chunk table into exclusive prefixes (in place)
// and writes counts[e].
__global__ void plan_chunk_scan_kernel(int E, int C, int nb, int* __restrict__ row_of, int* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (e >= E) return;
  int carry = 0;
  for (int b0 = 0; b0 < nb; b0 += 32) {
    const int b = b0 + lane;
    const int v = b < nb ? row_of[size_t(b) * C + e] : 0;
    const int incl = warp_inclusive_scan(v, lane);
    if (b < nb) row_of[size_t(b) * C + e] = carry + incl - v;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0) counts[e] = carry;
}

// Phase 3: offsets from counts (every block, E values), then one warp per chunk scatters it.
// Shared: offs[E+1], warp_tot[32], cursor[W][E].
__global__ void plan_chunk_scatter_kernel(const int* __restrict__ ids, int n, int E, int C, int nb,
                                          const int* __restrict__ counts, int* __restrict__ offsets,
                                          int* __restrict__ row_of, int* __restrict__ assignment) {
  extern __shared__ int smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* offs = smem;
  int* warp_tot = offs + E + 1;
  int* cursor = warp_tot + 32 + warp * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) offs[e] = counts[e];
  __syncthreads();
  block_exclusive_scan(offs, E, warp_tot);
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i <= E; i += blockDim.x) offsets[i] = offs[i];
  const int c = blockIdx.x * (blockDim.x >> 5) + warp;
  if (c < nb) {
    int begin, end;
    chunk_range(c, nb, C, n, begin, end);
    // This warp's own slice holds its chunk's prefixes (phase 2); read them all before overwriting.
    for (int e = lane; e < E; e += 32) cursor[e] = offs[e] + row_of[begin + e];
    __syncwarp();
    warp_scatter(ids, begin, end, E, cursor, row_of, assignment, lane);
  }
  fill_unused_tail(assignment, offs[E], n);
}

// Warps per block so that W*E + E + 33 ints fit in 48 KiB.
int warps_for(int E, int max_warps) { return std::clamp((kSmemInts - E - 33) / E, 1, max_warps); }

template <typename V>
__global__ void permute_rows_kernel(const V* __restrict__ x, const int* __restrict__ assignment, int rows, int k,
                                    int bound, int per_row, V* __restrict__ xp) {
  const size_t total = size_t(rows) * per_row;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int r = int(i / per_row);
    const int v = int(i - size_t(r) * per_row);
    const int a = assignment[r];
    V val{};
    if (a >= 0 && a < bound) val = x[size_t(a / k) * per_row + v];
    xp[i] = val;
  }
}

unsigned grid_for(size_t work, int threads) {
  return unsigned(std::min<size_t>((work + threads - 1) / threads, size_t(1) << 20));  // grid-stride beyond
}

}  // namespace

void build_dispatch_plan(const int* d_ids, int T, int k, int E, int* d_counts, int* d_offsets, int* d_row_of,
                         int* d_assignment, cudaStream_t s) {
  require(T >= 0, "build_dispatch_plan: tokens must be >= 0, got ", T);
  require(k >= 1, "build_dispatch_plan: top-k must be >= 1, got ", k);
  require(E >= 1 && E <= kMaxPlanExperts, "build_dispatch_plan: supports 1..", kMaxPlanExperts, " experts, got ", E);
  require(std::int64_t(T) * k <= (std::int64_t(1) << 30), "build_dispatch_plan: T*k = ", std::int64_t(T) * k,
          " assignments is too many (at most 2^30)");
  require(d_counts && d_offsets, "build_dispatch_plan: null device pointer");
  const int n = T * k;
  if (n > 0) require(d_ids && d_row_of && d_assignment, "build_dispatch_plan: null device pointer");
  const int C = std::max(kMinChunk, (E + 31) / 32 * 32);
  if (n <= kSingleBlockMaxN || n < C) {
    const int W = std::min(warps_for(E, 32), std::max(1, (n + 31) / 32));
    const size_t smem = (size_t(W) * E + E + 1 + 32) * sizeof(int);
    plan_single_block_kernel<<<1, W * 32, smem, s>>>(d_ids, n, E, d_counts, d_offsets, d_row_of, d_assignment);
    CUDA_CHECK_LAUNCH();
    return;
  }
  const int nb = n / C;  // >= 1; the last chunk takes the remainder, so every chunk has >= C >= E ids
  const int W = warps_for(E, kMultiWarps);
  const unsigned chunk_blocks = unsigned((nb + W - 1) / W);
  plan_chunk_count_kernel<<<chunk_blocks, W * 32, size_t(W) * E * sizeof(int), s>>>(d_ids, n, E, C, nb, d_row_of);
  CUDA_CHECK_LAUNCH();
  plan_chunk_scan_kernel<<<unsigned((E + 7) / 8), 256, 0, s>>>(E, C, nb, d_row_of, d_counts);
  CUDA_CHECK_LAUNCH();
  const size_t smem = (size_t(W) * E + E + 1 + 32) * sizeof(int);
  plan_chunk_scatter_kernel<<<chunk_blocks, W * 32, smem, s>>>(d_ids, n, E, C, nb, d_counts, d_offsets, d_row_of,
                                                               d_assignment);
  CUDA_CHECK_LAUNCH();
}

void permute_rows(const bf16* d_x, const int* d_assignment, int rows, int k, int H, bf16* d_xp, cudaStream_t s) {
  require(rows >= 0 && k >= 1 && H >= 1, "permute_rows: need rows >= 0, k >= 1, H >= 1 (got ", rows, ", ", k, ", ",
          H, ")");
  if (rows == 0) return;
  require(d_x && d_assignment && d_xp, "permute_rows: null device pointer");
  constexpr int threads = 256;
  if (H % 8 == 0 && aligned16(d_x) && aligned16(d_xp)) {
    const int per_row = H / 8;
    permute_rows_kernel<int4><<<grid_for(size_t(rows) * per_row, threads), threads, 0, s>>>(
        reinterpret_cast<const int4*>(d_x), d_assignment, rows, k, rows, per_row, reinterpret_cast<int4*>(d_xp));
  } else {
    // bf16 is copied as its raw 16 bits.
    permute_rows_kernel<unsigned short><<<grid_for(size_t(rows) * H, threads), threads, 0, s>>>(
        reinterpret_cast<const unsigned short*>(d_x), d_assignment, rows, k, rows, H,
        reinterpret_cast<unsigned short*>(d_xp));
  }
  CUDA_CHECK_LAUNCH();
}

void gather_rows(const bf16* d_src, int src_rows, const int* d_idx, int n, int H, bf16* d_dst, cudaStream_t s) {
  require(src_rows >= 0 && n >= 0 && H >= 1, "gather_rows: need src_rows >= 0, n >= 0, H >= 1 (got ", src_rows, ", ", n,
          ", ", H, ")");
  if (n == 0) return;
  require(d_src && d_idx && d_dst, "gather_rows: null device pointer");
  constexpr int threads = 256;
  if (H % 8 == 0 && aligned16(d_src) && aligned16(d_dst)) {
    const int per_row = H / 8;
    permute_rows_kernel<int4><<<grid_for(size_t(n) * per_row, threads), threads, 0, s>>>(
        reinterpret_cast<const int4*>(d_src), d_idx, n, 1, src_rows, per_row, reinterpret_cast<int4*>(d_dst));
  } else {
    permute_rows_kernel<unsigned short><<<grid_for(size_t(n) * H, threads), threads, 0, s>>>(
        reinterpret_cast<const unsigned short*>(d_src), d_idx, n, 1, src_rows, H,
        reinterpret_cast<unsigned short*>(d_dst));
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
