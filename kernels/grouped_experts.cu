// Grouped expert computation; the strategies, thread mappings and reasons are in grouped_experts.cuh.
//
// Kernel versions in this file:
//   w13_swiglu_stream  small rows: stream w1|w3 rows once, all of an expert's rows per pass, fused SwiGLU
//   w2_stream          small rows: stream w2 rows once, 8 lanes per output feature
//   fill_group_pointers  large rows: per-expert A/B/C pointers for cublasGemmGroupedBatchedEx, from d_offsets
// plus the cuBLAS drivers (grouped call, per-expert loop, per-expert loop over 4 streams, strided-batched
// over the padded layout; the padded layout's copy kernels are in padded_layout.cu).
#include "grouped_experts.cuh"

#include <algorithm>

#include "cuda_check.hpp"
#include "device_util.cuh"
#include "padded_layout.cuh"
#include "pdl.cuh"
#include "swiglu.cuh"

namespace eplab::gpu {

namespace {

// Rows of one expert handled per pass of the streaming kernels (fp32 accumulators per lane: 2 x 8 in the
// w13 kernel, 8 in the w2 kernel). An expert with more rows takes more passes; later passes re-read
// weights that the first pass just pulled into L2.
constexpr int kRowsPerPass = 8;

// w13 kernel: 4 warps per block, one intermediate index per warp, 8 16-byte loads per weight row in flight.
constexpr int k13Warps = 4;
constexpr int k13Unroll = 8;

// w2 kernel: 8 warps per block, 8 lanes per output feature -> 4 features per warp, 32 per block.
constexpr int k2Warps = 8;
constexpr int k2Lanes = 8;
constexpr int k2FeatPerWarp = 32 / k2Lanes;
constexpr int k2FeatPerBlock = k2Warps * k2FeatPerWarp;
constexpr int k2Unroll = 8;

constexpr int kMaxExperts = 8192;  // fill_group_pointers keeps the offsets in shared memory

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The global id of the slot-th expert (ascending ids) that has at least one row, or -1 when fewer experts
// have rows. Called by every full warp at kernel start (all lanes get the same answer). Lets the grid's y
// dimension be min(n, rows) instead of n: no block is launched for nothing at T = 1.
__device__ int nth_nonempty_expert(const int* __restrict__ off, int n, int slot) {
  const int lane = threadIdx.x & 31;
  int seen = 0;
  for (int base = 0; base < n; base += 32) {
    const int e = base + lane;
    const bool nonempty = e < n && off[e + 1] > off[e];
    unsigned m = __ballot_sync(0xffffffffu, nonempty);
    const int c = __popc(m);
    if (slot < seen + c) {
      for (int j = slot - seen; j > 0; --j) m &= m - 1;  // clear the lowest set bits before ours
      return base + __ffs(m) - 1;
    }
    seen += c;
  }
  return -1;
}

// h[row, i] = bf16(silu(w1_e[i]·x_row) * (w3_e[i]·x_row)) for every row of expert e.
// grid (ceil(I / k13Warps), min(n, rows)), block k13Warps * 32. Requires H % 8 == 0, 16-byte alignment.
__global__ void __launch_bounds__(k13Warps * 32)
    w13_swiglu_stream(const bf16* __restrict__ w13, const bf16* __restrict__ xp, const int* __restrict__ off, int n,
                      const int* __restrict__ gexp, int H, int I, bf16* __restrict__ h) {
  const int g = nth_nonempty_expert(off, n, int(blockIdx.y));  // group (= expert when gexp is null)
  if (g < 0) return;
  const int e = gexp ? gexp[g] : g;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int i = int(blockIdx.x) * k13Warps + warp;
  if (i >= I) return;  // whole warp leaves; no block-level synchronisation below
  const int beg = off[g], cnt = off[g + 1] - beg;
  const bf16* r1 = w13 + (std::size_t(e) * 2 * I + i) * H;  // row i of w1_e
  const bf16* r3 = r1 + std::size_t(I) * H;                  // row i of w3_e
  const int chunks = H / 8;                                   // 16-byte vectors per row

  for (int r0 = 0; r0 < cnt; r0 += kRowsPerPass) {
    const int R = min(kRowsPerPass, cnt - r0);
    const bf16* x0 = xp + std::size_t(beg + r0) * H;
    float a[kRowsPerPass], b[kRowsPerPass];
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) a[r] = b[r] = 0.f;

    for (int cb = lane; cb < chunks; cb += 32 * k13Unroll) {
      // Issue all weight loads of this batch first (2 x k13Unroll x 16 B per lane in flight) ...
      uint4 u1[k13Unroll], u3[k13Unroll];
#pragma unroll
      for (int u = 0; u < k13Unroll; ++u) {
        const int c = cb + 32 * u;
        if (c < chunks) {
          u1[u] = ldg_bf16x8(r1 + std::size_t(c) * 8);
          u3[u] = ldg_bf16x8(r3 + std::size_t(c) * 8);
        } else {
          u1[u] = u3[u] = make_uint4(0, 0, 0, 0);
        }
      }
      // ... then apply each weight vector to every row of this pass (x comes from L1/L2).
#pragma unroll
      for (int u = 0; u < k13Unroll; ++u) {
        const int c = cb + 32 * u;
        if (c < chunks) {
          float f1[8], f3[8];
          unpack_bf16x8(u1[u], f1);
          unpack_bf16x8(u3[u], f3);
#pragma unroll
          for (int r = 0; r < kRowsPerPass; ++r) {
            if (r < R) {
              float xv[8];
              unpack_bf16x8(ldg_bf16x8(x0 + std::size_t(r) * H + std::size_t(c) * 8), xv);
#pragma unroll
              for (int q = 0; q < 8; ++q) {
                a[r] = fmaf(f1[q], xv[q], a[r]);
                b[r] = fmaf(f3[q], xv[q], b[r]);
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      if (r < R) {  // warp-uniform
        const float va = warp_sum(a[r]), vb = warp_sum(b[r]);
        if (lane == 0) h[std::size_t(beg + r0 + r) * I + i] = __float2bfloat16_rn(swiglu_silu(va) * vb);
      }
    }
  }
}

// yp[row, o] = bf16(w2_e[o]·h_row) for every row of expert e.
// grid (ceil(H / k2FeatPerBlock), min(n, rows)), block k2Warps * 32. Requires I % 8 == 0, 16-byte alignment.
__global__ void __launch_bounds__(k2Warps * 32)
    w2_stream(const bf16* __restrict__ w2, const bf16* __restrict__ h, const int* __restrict__ off, int n,
              const int* __restrict__ gexp, int H, int I, bf16* __restrict__ yp) {
  const int grp = nth_nonempty_expert(off, n, int(blockIdx.y));  // group (= expert when gexp is null)
  if (grp < 0) return;
  const int e = gexp ? gexp[grp] : grp;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int g = lane % k2Lanes;  // position inside the 8-lane group of one feature
  const int o = int(blockIdx.x) * k2FeatPerBlock + warp * k2FeatPerWarp + lane / k2Lanes;
  const bool active = o < H;  // inactive lanes still take part in the shuffles, with zero weights
  const int beg = off[grp], cnt = off[grp + 1] - beg;
  const bf16* wrow = w2 + (std::size_t(e) * H + (active ? o : 0)) * I;
  const int chunks = I / 8;

  for (int r0 = 0; r0 < cnt; r0 += kRowsPerPass) {
    const int R = min(kRowsPerPass, cnt - r0);
    const bf16* h0 = h + std::size_t(beg + r0) * I;
    float acc[kRowsPerPass];
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) acc[r] = 0.f;

    for (int cb = g; cb < chunks; cb += k2Lanes * k2Unroll) {
      uint4 wv[k2Unroll];
#pragma unroll
      for (int u = 0; u < k2Unroll; ++u) {
        const int c = cb + k2Lanes * u;
        wv[u] = (active && c < chunks) ? ldg_bf16x8(wrow + std::size_t(c) * 8) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < k2Unroll; ++u) {
        const int c = cb + k2Lanes * u;
        if (c < chunks) {
          float fw[8];
          unpack_bf16x8(wv[u], fw);
#pragma unroll
          for (int r = 0; r < kRowsPerPass; ++r) {
            if (r < R) {
              float hv[8];
              unpack_bf16x8(ldg_bf16x8(h0 + std::size_t(r) * I + std::size_t(c) * 8), hv);
#pragma unroll
              for (int q = 0; q < 8; ++q) acc[r] = fmaf(fw[q], hv[q], acc[r]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      if (r < R) {  // warp-uniform
        float v = acc[r];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        if (g == 0 && active) yp[std::size_t(beg + r0 + r) * H + o] = __float2bfloat16_rn(v);
      }
    }
  }
}

// ---- token-direct small-batch kernels (GpuMoeLayer's decode path: no dispatch plan, no permute) ----

// h[a, i] = bf16(silu(w1_e[i]·x_{a/k}) * (w3_e[i]·x_{a/k})) for every assignment a = t*k + j routed to e.
// grid (ceil(I / k13Warps), min(n, rows)), block k13Warps * 32, dynamic smem (n + rows) ints. Each block
// finds its expert (the blockIdx.y-th expert that has rows) and that expert's assignments (in order)
// from d_ids itself, then streams the weight rows exactly like w13_swiglu_stream, reading x rows
// through the assignment list instead of a permuted copy.
__global__ void __launch_bounds__(k13Warps * 32)
    w13_swiglu_direct(const bf16* __restrict__ w13, const bf16* __restrict__ x, const int* __restrict__ ids, int rows,
                      int k, int n, int H, int I, bf16* __restrict__ h) {
  extern __shared__ int s_mem[];
  int* s_flag = s_mem;      // [n]: expert has rows
  int* s_list = s_mem + n;  // [rows]: this block's expert's assignments
  __shared__ int s_e, s_cnt;
  __shared__ uint4 s_x[kRowsPerPass][32 * k13Unroll];  // x slice of the pass's rows: 32 KB
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  for (int j = tid; j < n; j += int(blockDim.x)) s_flag[j] = 0;
  __syncthreads();
  for (int a = tid; a < rows; a += int(blockDim.x)) {
    const int e = ids[a];
    if (e >= 0 && e < n) s_flag[e] = 1;
  }
  __syncthreads();
  if (warp == 0) {
    const int slot = int(blockIdx.y);
    int e = -1, seen = 0;
    for (int base = 0; base < n; base += 32) {
      unsigned m = __ballot_sync(0xffffffffu, base + lane < n && s_flag[base + lane]);
      const int c = __popc(m);
      if (slot < seen + c) {
        for (int j = slot - seen; j > 0; --j) m &= m - 1;
        e = base + __ffs(m) - 1;
        break;
      }
      seen += c;
    }
    int cnt = 0;
    if (e >= 0)
      for (int base = 0; base < rows; base += 32) {
        const int a = base + lane;
        const bool mine = a < rows && ids[a] == e;
        const unsigned m = __ballot_sync(0xffffffffu, mine);
        if (mine) s_list[cnt + __popc(m & ((1u << lane) - 1u))] = a;
        cnt += __popc(m);
      }
    if (lane == 0) s_e = e, s_cnt = cnt;
  }
  __syncthreads();
  const int e = s_e, cnt = s_cnt;
  if (e < 0) return;  // block-uniform
  const int i = int(blockIdx.x) * k13Warps + warp;
  const bool active = i < I;  // inactive warps stay for the __syncthreads below
  const bf16* r1 = w13 + (std::size_t(e) * 2 * I + (active ? i : 0)) * H;
  const bf16* r3 = r1 + std::size_t(I) * H;
  const int chunks = H / 8;
  constexpr int kSlice = 32 * k13Unroll;  // 16-byte chunks of a row per batch (256: 2048 bf16)

  for (int r0 = 0; r0 < cnt; r0 += kRowsPerPass) {
    const int R = min(kRowsPerPass, cnt - r0);
    float a[kRowsPerPass], b[kRowsPerPass];
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) a[r] = b[r] = 0.f;
    for (int cb0 = 0; cb0 < chunks; cb0 += kSlice) {
      // Issue this warp's weight loads, then the block's x loads for the slice (all in flight together:
      // reading x inside the FMA loop made every row a dependent L2 round trip), then compute.
      uint4 u1[k13Unroll], u3[k13Unroll];
#pragma unroll
      for (int u = 0; u < k13Unroll; ++u) {
        const int c = cb0 + lane + 32 * u;
        if (active && c < chunks) {
          u1[u] = ldg_bf16x8(r1 + std::size_t(c) * 8);
          u3[u] = ldg_bf16x8(r3 + std::size_t(c) * 8);
        } else {
          u1[u] = u3[u] = make_uint4(0, 0, 0, 0);
        }
      }
      for (int j = tid; j < R * kSlice; j += int(blockDim.x)) {
        const int r = j / kSlice, cc = j - r * kSlice, c = cb0 + cc;
        s_x[r][cc] = c < chunks ? ldg_bf16x8(x + std::size_t(s_list[r0 + r] / k) * H + std::size_t(c) * 8)
                                : make_uint4(0, 0, 0, 0);
      }
      __syncthreads();
      if (active) {
#pragma unroll
        for (int u = 0; u < k13Unroll; ++u) {
          float f1[8], f3[8];
          unpack_bf16x8(u1[u], f1);
          unpack_bf16x8(u3[u], f3);
#pragma unroll
          for (int r = 0; r < kRowsPerPass; ++r) {
            if (r < R) {
              float xv[8];
              unpack_bf16x8(s_x[r][lane + 32 * u], xv);
#pragma unroll
              for (int q = 0; q < 8; ++q) {
                a[r] = fmaf(f1[q], xv[q], a[r]);
                b[r] = fmaf(f3[q], xv[q], b[r]);
              }
            }
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      if (r < R && active) {
        const float va = warp_sum(a[r]), vb = warp_sum(b[r]);
        if (lane == 0) h[std::size_t(s_list[r0 + r]) * I + i] = __float2bfloat16_rn(swiglu_silu(va) * vb);
      }
    }
  }
}

// w2 and the weighted combine in one kernel: y[t, o] = bf16(sum_j w[t,j] * (w2_{e_tj}[o] · h[t*k + j])).
// grid ceil(H / 4), block kD2Warps * 32: a block owns 4 output features (8 lanes per feature, as in
// w2_stream) for ALL tokens, and its warps split the experts that have rows (warp w takes the w-th,
// (w + kD2Warps)-th, ... of them), so every w2 byte is still read once and a warp has at most
// ceil(n / kD2Warps) load round trips in sequence (with one warp per block looping over all 16 experts
// the kernel was latency-bound at T = 64). Each warp keeps fp32 partial sums s_y[warp][t][f] in shared
// memory, touched only by the one lane that owns (warp, f): no atomics. At the end the block adds the
// warps' partials in warp order: a fixed order, so the result is the same bits on every run.
// Dynamic smem: (3n + 1 + rows) ints + kD2Warps * T * 4 floats + the warps' h slices.
// The block has min(kD2Warps, min(n, rows)) warps (blockDim): at T = 1 only 2 experts have rows, and 4 warps
// per block (2 idle) made the 1024 blocks need 1.3 waves (96 registers: 6 blocks per SM), i.e. a second full
// latency chain; with 2 warps they fit in one (H200, ncu).
constexpr int kD2Warps = 4;
constexpr int kD2Feat = k2FeatPerWarp;  // 4 features per block -> 1024 blocks at H = 4096

std::size_t w2_direct_smem(int n, int rows, int T, int I, int warps = kD2Warps) {
  std::size_t ints = std::size_t(3 * n + 1 + rows) * sizeof(int);
  ints = (ints + 15) / 16 * 16;  // s_y and the h slices start 16-byte aligned
  return ints + std::size_t(warps) * T * kD2Feat * sizeof(float) +
         std::size_t(warps) * kRowsPerPass * (I / 8) * sizeof(uint4);
}

__global__ void __launch_bounds__(kD2Warps * 32)
    w2_combine_direct(const bf16* __restrict__ w2, const bf16* __restrict__ h, const int* __restrict__ ids,
                      const float* __restrict__ wts, int T, int k, int n, int H, int I, bf16* __restrict__ y) {
  extern __shared__ int s_mem[];
  const int rows = T * k;
  int* s_off = s_mem;               // [n + 1]
  int* s_cur = s_mem + n + 1;       // [n]
  int* s_ne = s_mem + 2 * n + 1;    // [n]: experts with rows, ascending
  int* s_list = s_mem + 3 * n + 1;  // [rows], grouped by expert
  float* s_y = reinterpret_cast<float*>(s_mem + (3 * n + 1 + rows + 3) / 4 * 4);  // [nw][T][kD2Feat], then per warp h [8][I/8] uint4
  __shared__ int s_nne;
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31, nw = int(blockDim.x) >> 5;
  for (int j = tid; j < n; j += int(blockDim.x)) s_cur[j] = 0;
  for (int j = tid; j < nw * T * kD2Feat; j += int(blockDim.x)) s_y[j] = 0.f;
  __syncthreads();
  for (int a = tid; a < rows; a += int(blockDim.x)) {
    const int e = ids[a];
    if (e >= 0 && e < n) atomicAdd(&s_cur[e], 1);
  }
  __syncthreads();
  if (tid == 0) {  // exclusive scan of the counts and the list of non-empty experts (n is small)
    int acc = 0, nne = 0;
    for (int e = 0; e < n; ++e) {
      s_off[e] = acc;
      if (s_cur[e] > 0) s_ne[nne++] = e;
      acc += s_cur[e];
      s_cur[e] = s_off[e];
    }
    s_off[n] = acc;
    s_nne = nne;
  }
  __syncthreads();
  // Order inside an expert does not matter: each row's dot products are independent, and which partial
  // a row's product lands in is set by its expert alone.
  for (int a = tid; a < rows; a += int(blockDim.x)) {
    const int e = ids[a];
    if (e >= 0 && e < n) s_list[atomicAdd(&s_cur[e], 1)] = a;
  }
  __syncthreads();

  const int g = lane % k2Lanes;
  const int fl = lane / k2Lanes;  // feature inside the block
  const int o = int(blockIdx.x) * kD2Feat + fl;
  const bool active = o < H;
  const int chunks = I / 8;
  float* my_y = s_y + std::size_t(warp) * T * kD2Feat;
  uint4* my_h = reinterpret_cast<uint4*>(s_y + std::size_t(nw) * T * kD2Feat) + std::size_t(warp) * kRowsPerPass * chunks;
  for (int slot = warp; slot < s_nne; slot += nw) {
    const int e = s_ne[slot];
    const int beg = s_off[e], cnt = s_off[e + 1] - beg;
    const bf16* wrow = w2 + (std::size_t(e) * H + (active ? o : 0)) * I;
    auto load_w = [&](int cb, uint4 (&wv)[k2Unroll]) {
#pragma unroll
      for (int u = 0; u < k2Unroll; ++u) {
        const int c = cb + k2Lanes * u;
        wv[u] = (active && c < chunks) ? ldg_bf16x8(wrow + std::size_t(c) * 8) : make_uint4(0, 0, 0, 0);
      }
    };
    for (int r0 = 0; r0 < cnt; r0 += kRowsPerPass) {
      const int R = min(kRowsPerPass, cnt - r0);
      // The first batch of weight loads goes out before the h rows are staged: w2 comes from HBM, h from
      // L2, so the two round trips overlap instead of following each other (the weights do not depend on h).
      uint4 wv[k2Unroll];
      load_w(g, wv);
      // Launched with PDL (experts_decode's hybrid), everything above ran while the w13 kernel was still
      // running (ids and multipliers are the router's, complete before that kernel started); h is not: wait.
      pdl_wait();
      // The pass's h rows into this warp's shared slice, all loads in flight at once (reading h inside
      // the FMA loop made every row a dependent L2 round trip).
      __syncwarp();
      for (int j = lane; j < R * chunks; j += 32) {
        const int r = j / chunks, c = j - r * chunks;
        my_h[j] = ldg_bf16x8(h + std::size_t(s_list[beg + r0 + r]) * I + std::size_t(c) * 8);
      }
      __syncwarp();
      float acc[kRowsPerPass];
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) acc[r] = 0.f;
      for (int cb = g; cb < chunks; cb += k2Lanes * k2Unroll) {
        if (cb != g) load_w(cb, wv);  // I > 512: later batches
#pragma unroll
        for (int u = 0; u < k2Unroll; ++u) {
          const int c = cb + k2Lanes * u;
          if (c < chunks) {
            float fw[8];
            unpack_bf16x8(wv[u], fw);
#pragma unroll
            for (int r = 0; r < kRowsPerPass; ++r) {
              if (r < R) {
                float hv[8];
                unpack_bf16x8(my_h[r * chunks + c], hv);
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[r] = fmaf(fw[q], hv[q], acc[r]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r < R) {
          float v = acc[r];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          if (g == 0 && active) {
            const int a = s_list[beg + r0 + r];
            my_y[(a / k) * kD2Feat + fl] += wts[a] * v;
          }
        }
      }
    }
  }
  __syncthreads();
  const int o0 = int(blockIdx.x) * kD2Feat;
  for (int j = tid; j < T * kD2Feat; j += int(blockDim.x)) {
    const int t = j / kD2Feat, f = j - t * kD2Feat;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < nw; ++w) v += s_y[std::size_t(w) * T * kD2Feat + j];
    if (o0 + f < H) y[std::size_t(t) * H + o0 + f] = __float2bfloat16_rn(v);
  }
}

// For the grouped cuBLAS call: slot s = rank of group g among the non-empty groups (ascending, the same
// order the host builds its group arrays in). ptrs holds 6 arrays of n pointers:
// [A1 = w13_e, B1 = xp_g, C1 = gate_up_g, A2 = w2_e, B2 = h_g, C2 = yp_g], e = gexp[g] (g when gexp is
// null). One block.
__global__ void fill_group_pointers(const int* __restrict__ off, int n, const int* __restrict__ gexp, const bf16* w13,
                                    const bf16* w2, const bf16* xp, bf16* gate_up, bf16* h, bf16* yp, int H, int I,
                                    void** ptrs) {
  extern __shared__ int s_off[];  // [n + 1], allocated up to a multiple of 4 ints (see the launch)
  for (int j = int(threadIdx.x); j <= n; j += int(blockDim.x)) s_off[j] = off[j];
  __syncthreads();
  for (int g = int(threadIdx.x); g < n; g += int(blockDim.x)) {
    const int beg = s_off[g];
    if (s_off[g + 1] <= beg) continue;
    int slot = 0;
    for (int j = 0; j < g; ++j) slot += s_off[j + 1] > s_off[j];
    const int e = gexp ? gexp[g] : g;
    ptrs[0 * n + slot] = const_cast<bf16*>(w13 + std::size_t(e) * 2 * I * H);
    ptrs[1 * n + slot] = const_cast<bf16*>(xp + std::size_t(beg) * H);
    ptrs[2 * n + slot] = gate_up + std::size_t(beg) * 2 * I;
    ptrs[3 * n + slot] = const_cast<bf16*>(w2 + std::size_t(e) * H * I);
    ptrs[4 * n + slot] = h + std::size_t(beg) * I;
    ptrs[5 * n + slot] = yp + std::size_t(beg) * H;
  }
}

// Restores the handle's pointer mode on scope exit (we pass alpha/beta from the host).
struct HostPointerMode {
  cublasHandle_t h;
  cublasPointerMode_t old = CUBLAS_POINTER_MODE_HOST;
  explicit HostPointerMode(cublasHandle_t handle) : h(handle) {
    CUBLAS_CHECK(cublasGetPointerMode(h, &old));
    CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  }
  ~HostPointerMode() { cublasSetPointerMode(h, old); }
};

// gate_up_e[c, 2I] = xp_e[c, H] · w13_eᵀ   (column-major view: m = 2I, n = c, k = H, "TN"); e indexes the
// weights, rows [beg, beg + c) the buffers (a group of rows, not necessarily expert e's only rows).
void gemm_w13(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* xp, bf16* gate_up, int e, int beg,
              int c) {
  const float one = 1.f, zero = 0.f;
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, 2 * w.I, c, w.H, &one,
                            w.w13 + std::size_t(e) * 2 * w.I * w.H, CUDA_R_16BF, w.H, xp + std::size_t(beg) * w.H,
                            CUDA_R_16BF, w.H, &zero, gate_up + std::size_t(beg) * 2 * w.I, CUDA_R_16BF, 2 * w.I,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// yp_e[c, H] = h_e[c, I] · w2_eᵀ   (column-major view: m = H, n = c, k = I, "TN")
void gemm_w2(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* h, bf16* yp, int e, int beg, int c) {
  const float one = 1.f, zero = 0.f;
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, w.H, c, w.I, &one, w.w2 + std::size_t(e) * w.H * w.I,
                            CUDA_R_16BF, w.I, h + std::size_t(beg) * w.I, CUDA_R_16BF, w.I, &zero,
                            yp + std::size_t(beg) * w.H, CUDA_R_16BF, w.H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Grows b to `need` elements when it holds fewer (need = 0 allocates nothing); a reallocation bumps the
// workspace's generation.
template <typename T>
void device_grow(DeviceBuffer<T>& b, std::size_t need, unsigned& generation) {
  if (need > b.size() && b.grow(need)) ++generation;
}

}  // namespace

// Extra streams, handles (default host pointer mode) and events for CublasStreams (created on first use).
struct GroupedWorkspace::Aux {
  static constexpr int kStreams = 4;  // measured: 8 no faster (grouped_experts.cuh)
  cudaStream_t stream[kStreams] = {};
  cublasHandle_t handle[kStreams] = {};
  cudaEvent_t fork = nullptr, join[kStreams] = {};
  std::vector<int> order, stream_of;
  Aux() {
    CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int i = 0; i < kStreams; ++i) {
      CUDA_CHECK(cudaStreamCreateWithFlags(&stream[i], cudaStreamNonBlocking));
      CUBLAS_CHECK(cublasCreate(&handle[i]));
      CUBLAS_CHECK(cublasSetStream(handle[i], stream[i]));
      CUDA_CHECK(cudaEventCreateWithFlags(&join[i], cudaEventDisableTiming));
    }
  }
  ~Aux() {
    for (int i = 0; i < kStreams; ++i) {
      if (handle[i]) cublasDestroy(handle[i]);
      if (stream[i]) cudaStreamDestroy(stream[i]);
      if (join[i]) cudaEventDestroy(join[i]);
    }
    if (fork) cudaEventDestroy(fork);
  }
  // The first `used` aux streams wait for the work enqueued so far on s.
  void fork_from(cudaStream_t s, int used) {
    CUDA_CHECK(cudaEventRecord(fork, s));
    for (int i = 0; i < used; ++i) CUDA_CHECK(cudaStreamWaitEvent(stream[i], fork, 0));
  }
  // s waits for everything enqueued on the first `used` aux streams.
  void join_into(cudaStream_t s, int used) {
    for (int i = 0; i < used; ++i) {
      CUDA_CHECK(cudaEventRecord(join[i], stream[i]));
      CUDA_CHECK(cudaStreamWaitEvent(s, join[i], 0));
    }
  }
};

GroupedWorkspace::GroupedWorkspace() = default;

GroupedWorkspace::~GroupedWorkspace() {
  // Destructors must not throw: errors here (e.g. a dead context at exit) are ignored.
  delete aux;
}

const char* grouped_strategy_name(GroupedStrategy s) {
  switch (s) {
    case GroupedStrategy::Auto: return "auto";
    case GroupedStrategy::WeightStream: return "weight-stream";
    case GroupedStrategy::CublasGrouped: return "cublas-grouped";
    case GroupedStrategy::CublasLoop: return "cublas-loop";
    case GroupedStrategy::CublasStreams: return "cublas-streams";
    case GroupedStrategy::CublasPadded: return "cublas-padded";
  }
  return "?";
}

GroupedStrategy choose_grouped_strategy(const GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows,
                                        const bf16* d_xp, const bf16* d_yp) {
  // The custom kernels and the grouped API both want every row 16-byte aligned.
  const bool vec_ok = w.H % 8 == 0 && w.I % 8 == 0 && aligned16(d_xp) && aligned16(d_yp) && aligned16(w.w13) &&
                      aligned16(w.w2);
  GroupedStrategy st = ws.strategy;
  if (st == GroupedStrategy::Auto)
    st = rows <= ws.small_rows_max    ? GroupedStrategy::WeightStream
         : ws.auto_padded             ? GroupedStrategy::CublasPadded
         : rows < ws.streams_min_rows ? GroupedStrategy::CublasGrouped
                                      : GroupedStrategy::CublasStreams;
#if CUBLAS_VERSION < 120500
  if (st == GroupedStrategy::CublasGrouped) st = GroupedStrategy::CublasStreams;  // no grouped API before 12.5
#endif
  if ((st == GroupedStrategy::WeightStream || st == GroupedStrategy::CublasGrouped) && !vec_ok)
    st = GroupedStrategy::CublasLoop;
  return st;
}

bool grouped_strategy_needs_host_offsets(GroupedStrategy s) {
  return s == GroupedStrategy::CublasGrouped || s == GroupedStrategy::CublasLoop ||
         s == GroupedStrategy::CublasStreams || s == GroupedStrategy::CublasPadded;
}

namespace {

// Buffers for `rows` rows cut into `groups` groups (the pointer and argument arrays are per group).
void reserve_groups(GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows, int groups) {
  require(rows >= 0, "grouped_experts: rows must be >= 0, got ", rows);
  require(w.n >= 1 && w.n <= kMaxExperts, "grouped_experts: expert count ", w.n, " outside [1, ", kMaxExperts, "]");
  require(groups >= 1 && groups <= kMaxExperts, "grouped_experts: group count ", groups, " outside [1, ", kMaxExperts,
          "]");
  // CublasPadded runs its SwiGLU over n * M_pad rows (M_pad <= the cap; above it, streams on `rows` rows).
  // The row buffers' alignment (nullptr here) never changes whether the padded strategy is chosen.
  std::size_t act_rows = std::size_t(rows);
  const bool padded = choose_grouped_strategy(ws, w, rows, nullptr, nullptr) == GroupedStrategy::CublasPadded;
  if (padded && rows > 0)
    act_rows = std::max(act_rows, std::size_t(w.n) * padded_capacity_per_expert(ws.padded_max_ratio, w.n, rows));
  device_grow(ws.gate_up, act_rows * 2 * w.I, ws.generation);
  device_grow(ws.h, act_rows * w.I, ws.generation);
  device_grow(ws.ptrs, std::size_t(groups) * 6, ws.generation);
  if (ws.h_offsets.size() < std::size_t(groups) + 1) ws.h_offsets.grow(std::size_t(groups) + 1);
  const std::size_t n = std::size_t(groups);
  for (auto* v : {&ws.m1, &ws.n1, &ws.k1, &ws.lda1, &ws.ldb1, &ws.ldc1, &ws.m2, &ws.k2, &ws.lda2, &ws.ldb2, &ws.ldc2,
                  &ws.group_size})
    if (v->size() < n) v->resize(n);
  if (ws.alpha.size() < n) ws.alpha.assign(n, 1.f);
  if (ws.beta.size() < n) ws.beta.assign(n, 0.f);
  if (ws.opT.size() < n) ws.opT.assign(n, CUBLAS_OP_T);
  if (ws.opN.size() < n) ws.opN.assign(n, CUBLAS_OP_N);
}

}  // namespace

void reserve_grouped_workspace(GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows) {
  reserve_groups(ws, w, rows, w.n);
}

void reserve_grouped_workspace(GroupedWorkspace& ws, const ExpertWeightsDevice& w, int rows, int groups) {
  reserve_groups(ws, w, rows, groups);
}

void grouped_experts_padded(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xpad,
                            const int* h_offsets, int m_pad, bf16* d_ypad, GroupedWorkspace& ws, cudaStream_t s) {
  const int n = w.n, H = w.H, I = w.I;
  require(h_offsets && m_pad >= 0 && m_pad % kPadMultiple == 0, "grouped_experts_padded: m_pad ", m_pad,
          " must be a multiple of ", kPadMultiple, " with host offsets given");
  ws.last_used = GroupedStrategy::CublasPadded;
  int e_lo = n, e_hi = -1;  // the range of non-empty experts: the batch
  for (int e = 0; e < n; ++e) {
    const int c = h_offsets[e + 1] - h_offsets[e];
    require(c >= 0 && c <= m_pad, "grouped_experts_padded: expert ", e, " has ", c, " rows, more than m_pad = ", m_pad);
    if (c > 0) e_lo = std::min(e_lo, e), e_hi = e;
  }
  if (e_hi < 0) return;
  const int B = e_hi - e_lo + 1;
  const std::size_t prow = std::size_t(B) * m_pad;
  device_grow(ws.gate_up, prow * 2 * I, ws.generation);  // no-op after reserve_grouped_workspace
  device_grow(ws.h, prow * I, ws.generation);
  CUBLAS_CHECK(cublasSetStream(handle, s));
  const HostPointerMode mode(handle);
  const float one = 1.f, zero = 0.f;
  using ll = long long;
  // gate_up[b] [M_pad, 2I] = xpad[e_lo + b] · w13[e_lo + b]ᵀ  (column-major: m = 2I, n = M_pad, k = H, "TN")
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, 2 * I, m_pad, H, &one, w.w13 + std::size_t(e_lo) * 2 * I * H, CUDA_R_16BF, H,
      ll(2) * I * H, d_xpad + std::size_t(e_lo) * m_pad * H, CUDA_R_16BF, H, ll(m_pad) * H, &zero, ws.gate_up.get(),
      CUDA_R_16BF, 2 * I, ll(m_pad) * 2 * I, B, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  swiglu(ws.gate_up.get(), int(prow), I, ws.h.get(), s);
  // ypad[e_lo + b] [M_pad, H] = h[b] · w2[e_lo + b]ᵀ  (m = H, n = M_pad, k = I)
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, H, m_pad, I, &one, w.w2 + std::size_t(e_lo) * H * I, CUDA_R_16BF, I,
      ll(H) * I, ws.h.get(), CUDA_R_16BF, I, ll(m_pad) * I, &zero, d_ypad + std::size_t(e_lo) * m_pad * H,
      CUDA_R_16BF, H, ll(m_pad) * H, B, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void grouped_experts(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xp, const int* d_offsets,
                     const int* h_offsets, int rows, bf16* d_yp, GroupedWorkspace& ws, cudaStream_t s) {
  grouped_experts_segments(handle, w, d_xp, w.n, d_offsets, h_offsets, nullptr, nullptr, rows, d_yp, ws, s);
}

void grouped_experts_segments(cublasHandle_t handle, const ExpertWeightsDevice& w, const bf16* d_xp, int G,
                              const int* d_offsets, const int* h_offsets, const int* d_expert_of,
                              const int* h_expert_of, int rows, bf16* d_yp, GroupedWorkspace& ws, cudaStream_t s) {
  require(w.H > 0 && w.I > 0, "grouped_experts: bad expert shape H=", w.H, " I=", w.I);
  require(rows >= 0, "grouped_experts: rows must be >= 0, got ", rows);
  require((d_expert_of == nullptr) == (h_expert_of == nullptr),
          "grouped_experts: pass the group->expert map on both the device and the host, or on neither");
  require(d_expert_of || G == w.n, "grouped_experts: ", G, " groups but ", w.n,
          " experts and no group->expert map (without a map, group g is expert g)");
  if (h_expert_of)
    for (int g = 0; g < G; ++g)
      require(h_expert_of[g] >= 0 && h_expert_of[g] < w.n, "grouped_experts: group ", g, " names expert ",
              h_expert_of[g], " but only ", w.n, " are loaded");
  const GroupedStrategy st = choose_grouped_strategy(ws, w, rows, d_xp, d_yp);
  ws.last_used = st;
  if (rows == 0) return;
  reserve_groups(ws, w, rows, G);
  const int n = G, H = w.H, I = w.I;
  auto expert = [&](int g) { return h_expert_of ? h_expert_of[g] : g; };

  if (st == GroupedStrategy::WeightStream) {
    const unsigned ny = unsigned(std::min(n, rows));  // at most `rows` groups can have rows
    const dim3 g13(unsigned((I + k13Warps - 1) / k13Warps), ny);
    w13_swiglu_stream<<<g13, k13Warps * 32, 0, s>>>(w.w13, d_xp, d_offsets, n, d_expert_of, H, I, ws.h.get());
    CUDA_CHECK_LAUNCH();
    const dim3 g2(unsigned((H + k2FeatPerBlock - 1) / k2FeatPerBlock), ny);
    w2_stream<<<g2, k2Warps * 32, 0, s>>>(w.w2, ws.h.get(), d_offsets, n, d_expert_of, H, I, d_yp);
    CUDA_CHECK_LAUNCH();
    return;
  }

  // cuBLAS strategies: GEMM sizes come from the host.
  if (!h_offsets) {
    CUDA_CHECK(
        cudaMemcpyAsync(ws.h_offsets.get(), d_offsets, std::size_t(n + 1) * sizeof(int), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    h_offsets = ws.h_offsets.get();
  }
  require(h_offsets[0] == 0 && h_offsets[n] == rows, "grouped_experts: offsets [0]=", h_offsets[0], " [n]=",
          h_offsets[n], " disagree with rows=", rows, " (the dispatch plan and the row count must match)");
  for (int e = 0; e < n; ++e)
    require(h_offsets[e + 1] >= h_offsets[e], "grouped_experts: offsets decrease at group ", e);

  CUBLAS_CHECK(cublasSetStream(handle, s));
  const HostPointerMode mode(handle);

  if (st == GroupedStrategy::CublasGrouped) {
#if CUBLAS_VERSION >= 120500
    int Gn = 0;
    for (int e = 0; e < n; ++e) {
      const int c = h_offsets[e + 1] - h_offsets[e];
      if (c == 0) continue;
      ws.m1[Gn] = 2 * I, ws.n1[Gn] = c, ws.k1[Gn] = H, ws.lda1[Gn] = H, ws.ldb1[Gn] = H, ws.ldc1[Gn] = 2 * I;
      ws.m2[Gn] = H, ws.k2[Gn] = I, ws.lda2[Gn] = I, ws.ldb2[Gn] = I, ws.ldc2[Gn] = H;
      ws.group_size[Gn] = 1;
      ++Gn;
    }
    // Shared memory for n + 1 offsets, rounded up to whole 16-byte vectors: the compiler reads s_off in
    // int4 loads, so the last vector may reach past n + 1 ints (memcheck caught it at n = 18 groups).
    const std::size_t smem = (std::size_t(n + 1) + 3) / 4 * 4 * sizeof(int);
    fill_group_pointers<<<1, 256, smem, s>>>(d_offsets, n, d_expert_of, w.w13, w.w2, d_xp, ws.gate_up.get(), ws.h.get(),
                                             d_yp, H, I, ws.ptrs.get());
    CUDA_CHECK_LAUNCH();
    void** P = ws.ptrs.get();
    auto cptr = [&](int j) { return const_cast<const void* const*>(P + std::size_t(j) * n); };
    // w13 GEMMs of all non-empty groups: each its own cuBLAS group (n = rows of that group).
    CUBLAS_CHECK(cublasGemmGroupedBatchedEx(handle, ws.opT.data(), ws.opN.data(), ws.m1.data(), ws.n1.data(),
                                            ws.k1.data(), ws.alpha.data(), cptr(0), CUDA_R_16BF, ws.lda1.data(),
                                            cptr(1), CUDA_R_16BF, ws.ldb1.data(), ws.beta.data(), P + 2 * n,
                                            CUDA_R_16BF, ws.ldc1.data(), Gn, ws.group_size.data(), CUBLAS_COMPUTE_32F));
    swiglu(ws.gate_up.get(), rows, I, ws.h.get(), s);
    // w2 GEMMs: same groups, n = rows of that group again.
    CUBLAS_CHECK(cublasGemmGroupedBatchedEx(handle, ws.opT.data(), ws.opN.data(), ws.m2.data(), ws.n1.data(),
                                            ws.k2.data(), ws.alpha.data(), cptr(3), CUDA_R_16BF, ws.lda2.data(),
                                            cptr(4), CUDA_R_16BF, ws.ldb2.data(), ws.beta.data(), P + 5 * n,
                                            CUDA_R_16BF, ws.ldc2.data(), Gn, ws.group_size.data(), CUBLAS_COMPUTE_32F));
    return;
#endif
  }

  GroupedStrategy run = st;
  if (st == GroupedStrategy::CublasPadded) {
    // Contiguous rows in, contiguous rows out: pad, the batched GEMMs, unpad. Above the cap, or with a
    // group->expert map (weights not a fixed stride apart), cublas-streams.
    const int m_pad = padded_rows_per_expert(h_offsets, n);
    if (!d_expert_of && m_pad > 0 && m_pad <= padded_capacity_per_expert(ws.padded_max_ratio, n, rows)) {
      const std::size_t pelems = std::size_t(n) * m_pad * H;
      device_grow(ws.xpad, pelems, ws.generation);
      device_grow(ws.ypad, pelems, ws.generation);
      pad_rows(d_xp, d_offsets, n, m_pad, H, ws.xpad.get(), s);
      grouped_experts_padded(handle, w, ws.xpad.get(), h_offsets, m_pad, ws.ypad.get(), ws, s);
      unpad_rows(ws.ypad.get(), d_offsets, n, m_pad, rows, H, d_yp, s);
      return;
    }
    run = GroupedStrategy::CublasStreams;
    ws.last_used = run;
  }

  if (run == GroupedStrategy::CublasStreams) {
    if (!ws.aux) ws.aux = new GroupedWorkspace::Aux();
    auto& A = *ws.aux;
    constexpr int S = GroupedWorkspace::Aux::kStreams;
    // Largest groups first, each onto the stream with the fewest rows so far.
    A.order.clear();
    for (int e = 0; e < n; ++e)
      if (h_offsets[e + 1] > h_offsets[e]) A.order.push_back(e);
    std::stable_sort(A.order.begin(), A.order.end(), [&](int a, int b) {
      return h_offsets[a + 1] - h_offsets[a] > h_offsets[b + 1] - h_offsets[b];
    });
    A.stream_of.assign(std::size_t(n), 0);
    long long load[GroupedWorkspace::Aux::kStreams] = {};
    for (int e : A.order) {
      const int i = int(std::min_element(load, load + S) - load);
      A.stream_of[std::size_t(e)] = i;
      load[i] += h_offsets[e + 1] - h_offsets[e];
    }
    // Two phases with one SwiGLU launch between them. (Chaining each expert's w13 GEMM, its own SwiGLU
    // and its w2 GEMM on its stream, without the barrier, measured slower on an H200: 0.353 vs 0.284 ms
    // at 8192 rows; the host enqueues 16 more launches and is the bottleneck at these GEMM sizes.)
    A.fork_from(s, S);
    for (int e : A.order)
      gemm_w13(A.handle[A.stream_of[std::size_t(e)]], w, d_xp, ws.gate_up.get(), expert(e), h_offsets[e],
               h_offsets[e + 1] - h_offsets[e]);
    A.join_into(s, S);
    swiglu(ws.gate_up.get(), rows, I, ws.h.get(), s);
    A.fork_from(s, S);
    for (int e : A.order)
      gemm_w2(A.handle[A.stream_of[std::size_t(e)]], w, ws.h.get(), d_yp, expert(e), h_offsets[e],
              h_offsets[e + 1] - h_offsets[e]);
    A.join_into(s, S);
    return;
  }

  // CublasLoop (and CublasGrouped without the grouped API): per-group GEMMs on s.
  for (int e = 0; e < n; ++e) {
    const int c = h_offsets[e + 1] - h_offsets[e];
    if (c > 0) gemm_w13(handle, w, d_xp, ws.gate_up.get(), expert(e), h_offsets[e], c);
  }
  swiglu(ws.gate_up.get(), rows, I, ws.h.get(), s);
  for (int e = 0; e < n; ++e) {
    const int c = h_offsets[e + 1] - h_offsets[e];
    if (c > 0) gemm_w2(handle, w, ws.h.get(), d_yp, expert(e), h_offsets[e], c);
  }
}

bool experts_direct_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k) {
  const int rows = T * k;
  return rows >= 1 && rows <= kDirectMaxRows && w.H % 8 == 0 && w.I % 8 == 0 && aligned16(d_x) && aligned16(d_y) &&
         aligned16(w.w13) && aligned16(w.w2) && w2_direct_smem(w.n, rows, T, w.I) <= 48 * 1024 &&
         std::size_t(w.n + rows) * sizeof(int) + 32 * 1024 + 64 <= 48 * 1024;
}

void experts_direct(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s) {
  require(T >= 0 && k >= 1, "experts_direct: need T >= 0 and k >= 1, got ", T, " and ", k);
  if (T == 0) return;
  require(experts_direct_ok(w, d_x, d_y, T, k), "experts_direct: T*k = ", T * k, " rows (at most ", kDirectMaxRows,
          "), H % 8, I % 8 and 16-byte alignment are required; use the dispatch-plan path instead");
  const int rows = T * k, n = w.n, H = w.H, I = w.I;
  reserve_grouped_workspace(ws, w, rows);  // h [rows, I], indexed by assignment
  ws.last_used = GroupedStrategy::WeightStream;
  const dim3 g13(unsigned((I + k13Warps - 1) / k13Warps), unsigned(std::min(n, rows)));
  w13_swiglu_direct<<<g13, k13Warps * 32, std::size_t(n + rows) * sizeof(int), s>>>(w.w13, d_x, d_ids, rows, k, n, H,
                                                                                      I, ws.h.get());
  CUDA_CHECK_LAUNCH();
  w2_combine_direct_launch(w, ws.h.get(), d_ids, d_weights, T, k, d_y, s);
}

void w2_combine_direct_launch(const ExpertWeightsDevice& w, const bf16* d_h, const int* d_ids, const float* d_weights,
                              int T, int k, bf16* d_y, cudaStream_t s, bool pdl) {
  const int rows = T * k, n = w.n, H = w.H, I = w.I;
  const int w2_warps = std::clamp(std::min(n, rows), 1, kD2Warps);  // at most one warp per expert with rows
  launch_pdl(pdl, w2_combine_direct, dim3(unsigned((H + kD2Feat - 1) / kD2Feat)), dim3(unsigned(w2_warps * 32)),
             w2_direct_smem(n, rows, T, I, w2_warps), s, w.w2, d_h, d_ids, d_weights, T, k, n, H, I, d_y);
}

}  // namespace eplab::gpu
