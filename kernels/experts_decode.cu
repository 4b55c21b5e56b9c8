// Decode-size experts kernels; design in experts_decode.cuh.
#include "experts_decode.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda_check.hpp"
#include "pdl.cuh"
#include "swiglu.cuh"

namespace eplab::gpu {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPassRows = 8;  // rows of one expert per pass (fp32 accumulators per lane)

constexpr int k13Idx = 4;                // intermediate indices per block
constexpr int k13Threads = 2 * k13Idx * 32;  // warp pair per index: halves of H
constexpr int k13Unroll = 8;             // 16-byte loads per weight row per lane per batch (H = 4096: one batch)

constexpr int k2Threads = 256;  // 8 warps
constexpr int k2Warps = k2Threads / 32;
constexpr int k2Feat = 32;      // output features per block
constexpr int k2Quads = k2Feat / 4;  // items per expert: 4 features each (8 lanes per feature)
constexpr int k2Unroll = 8;     // 8 lanes x 8 x 16 B = one w2 row of up to I = 512

__device__ __forceinline__ int nth_set_bit(unsigned m, int j) {
  for (; j > 0; --j) m &= m - 1;
  return __ffs(m) - 1;
}

// Lane l holds id (or -1). The slot-th smallest distinct id over the warp, or -1 if fewer exist.
__device__ __forceinline__ int distinct_expert(int id, int n, int slot) {
  int seen = 0;
  for (int base = 0; base < n; base += 32) {
    const unsigned bit = (id >= base && id < base + 32) ? 1u << (id - base) : 0u;
    const unsigned m = __reduce_or_sync(kFull, bit);
    const int c = __popc(m);
    if (slot < seen + c) return base + nth_set_bit(m, slot - seen);
    seen += c;
  }
  return -1;
}

__device__ __forceinline__ int count_distinct(int id, int n) {
  int c = 0;
  for (int base = 0; base < n; base += 32)
    c += __popc(__reduce_or_sync(kFull, (id >= base && id < base + 32) ? 1u << (id - base) : 0u));
  return c;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Rows i of w1_e and w3_e, 16-byte vectors c0 + lane + 32 u (u < k13Unroll) below ce; zeros elsewhere.
__device__ __forceinline__ void load_w13(const bf16* r1, const bf16* r3, int c0, int ce, int lane, bool active,
                                         uint4 (&u1)[k13Unroll], uint4 (&u3)[k13Unroll]) {
#pragma unroll
  for (int u = 0; u < k13Unroll; ++u) {
    const int c = c0 + lane + 32 * u;
    const bool ok = active && c < ce;
    u1[u] = ok ? ldg_bf16x8(r1 + std::size_t(c) * 8) : make_uint4(0, 0, 0, 0);
    u3[u] = ok ? ldg_bf16x8(r3 + std::size_t(c) * 8) : make_uint4(0, 0, 0, 0);
  }
}

// h[a, i] = bf16(silu(w1_e[i]·x_{a/k}) * (w3_e[i]·x_{a/k})) for the assignments a of expert e.
// grid (ceil(I / 4), min(n, rows)), block 256: warps w and w + 4 own index 4 blockIdx.x + w, halves 0 / 1
// of H. Dynamic smem: min(T, 8) rows of x.
__global__ void __launch_bounds__(k13Threads, 2)  // 2 blocks per SM: T = 1 (224 blocks) in one wave
    w13_swiglu_decode(const bf16* __restrict__ w13, const bf16* __restrict__ x, const int* __restrict__ ids, int rows,
                      int k, int n, int H, int I, bf16* __restrict__ h) {
  extern __shared__ uint4 s_x[];  // [kPassRows][H / 8]
  __shared__ float s_ab[k13Idx][kPassRows][2];
  pdl_wait();  // the router's ids
  pdl_launch_dependents();
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int my_id = lane < rows ? __ldcg(ids + lane) : -1;
  const int e = distinct_expert(my_id, n, int(blockIdx.y));
  if (e < 0) return;  // block-uniform: every warp computed the same e
  const unsigned mine = __ballot_sync(kFull, my_id == e);
  const int cnt = __popc(mine);
  const int iw = warp % k13Idx, half = warp / k13Idx;
  const int i = int(blockIdx.x) * k13Idx + iw;
  const bool active = i < I;
  const int chunks = H / 8, hc = (chunks + 1) / 2, cb = half * hc, ce = min(chunks, cb + hc);
  const bf16* r1 = w13 + (std::size_t(e) * 2 * I + (active ? i : 0)) * H;
  const bf16* r3 = r1 + std::size_t(I) * H;

  for (int r0 = 0; r0 < cnt; r0 += kPassRows) {
    const int R = min(kPassRows, cnt - r0);
    uint4 u1[k13Unroll], u3[k13Unroll];
    load_w13(r1, r3, cb, ce, lane, active, u1, u3);  // the weight loads go out first ...
    for (int j = tid; j < R * chunks; j += k13Threads) {  // ... then x rows of this pass, while they fly
      const int r = j / chunks, c = j - r * chunks;
      const int a = nth_set_bit(mine, r0 + r);
      s_x[j] = ldg_bf16x8(x + std::size_t(a / k) * H + std::size_t(c) * 8);
    }
    __syncthreads();
    float a[kPassRows], b[kPassRows];
#pragma unroll
    for (int r = 0; r < kPassRows; ++r) a[r] = b[r] = 0.f;
    for (int c0 = cb;;) {
#pragma unroll
      for (int u = 0; u < k13Unroll; ++u) {
        const int c = c0 + lane + 32 * u;
        if (c < ce) {
          float f1[8], f3[8];
          unpack_bf16x8(u1[u], f1);
          unpack_bf16x8(u3[u], f3);
#pragma unroll
          for (int r = 0; r < kPassRows; ++r) {
            if (r < R) {
              float xv[8];
              unpack_bf16x8(s_x[r * chunks + c], xv);
#pragma unroll
              for (int q = 0; q < 8; ++q) {
                a[r] = fmaf(f1[q], xv[q], a[r]);
                b[r] = fmaf(f3[q], xv[q], b[r]);
              }
            }
          }
        }
      }
      c0 += 32 * k13Unroll;
      if (c0 >= ce) break;
      load_w13(r1, r3, c0, ce, lane, active, u1, u3);
    }
#pragma unroll
    for (int r = 0; r < kPassRows; ++r) {
      a[r] = warp_sum(a[r]);
      b[r] = warp_sum(b[r]);
    }
    if (half == 1 && lane == 0)
#pragma unroll
      for (int r = 0; r < kPassRows; ++r) s_ab[iw][r][0] = a[r], s_ab[iw][r][1] = b[r];
    __syncthreads();
    if (half == 0 && lane == 0 && active)
#pragma unroll
      for (int r = 0; r < kPassRows; ++r) {
        if (r >= R) break;
        const float va = a[r] + s_ab[iw][r][0], vb = b[r] + s_ab[iw][r][1];  // half 0 + half 1: fixed order
        h[std::size_t(nth_set_bit(mine, r0 + r)) * I + i] = __float2bfloat16_rn(swiglu_silu(va) * vb);
      }
    __syncthreads();  // s_x and s_ab are reused by the next pass
  }
}

// y[t, o] = bf16(sum_j w[t, j] * (w2_{e_tj}[o] · h[t k + j])) for the block's 32 features o.
// grid ceil(H / 32), block 256. Item = (expert slot, 4 features); warp w takes items w, w + 8, ... two
// at a time. Dynamic smem: rows x I/8 uint4 (h).
__global__ void __launch_bounds__(k2Threads)
    w2_combine_decode(const bf16* __restrict__ w2, const bf16* __restrict__ h, const int* __restrict__ ids,
                      const float* __restrict__ wts, int T, int k, int n, int H, int I, bf16* __restrict__ y) {
  extern __shared__ uint4 s_h[];  // [rows][I / 8]
  __shared__ float s_dot[kDecodeMaxRows][k2Feat];
  const int rows = T * k;
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane & 7, fl = lane >> 3;
  const int chunks = I / 8;
  // ids and weights are the router's: it completed before the w13 kernel (our PDL primary) passed its own
  // pdl_wait, and only then could this grid launch. h is the w13 kernel's: read after pdl_wait below.
  const int my_id = lane < rows ? __ldcg(ids + lane) : -1;
  const int items = count_distinct(my_id, n) * k2Quads;

  struct Item {
    int e, o;
    bool active;
  };
  auto item_of = [&](int it) {
    Item r;
    r.e = distinct_expert(my_id, n, it / k2Quads);
    r.o = int(blockIdx.x) * k2Feat + (it % k2Quads) * 4 + fl;
    r.active = r.o < H;
    return r;
  };
  uint4 wv[2][k2Unroll];
  auto load = [&](int it, uint4 (&dst)[k2Unroll]) {
    const Item m = it < items ? item_of(it) : Item{0, 0, false};
    const bf16* row = w2 + (std::size_t(m.e) * H + (m.active ? m.o : 0)) * I;
#pragma unroll
    for (int u = 0; u < k2Unroll; ++u) {
      const int c = g + 8 * u;
      dst[u] = (it < items && m.active && c < chunks) ? ldg_bf16x8(row + std::size_t(c) * 8) : make_uint4(0, 0, 0, 0);
    }
  };
  load(warp, wv[0]);
  load(warp + k2Warps, wv[1]);

  pdl_wait();  // h complete and visible
  pdl_launch_dependents();
  for (int j = tid; j < rows * chunks; j += k2Threads)
    s_h[j] = __ldcg(reinterpret_cast<const uint4*>(h) + std::size_t(j / chunks) * (I / 8) + (j % chunks));
  for (int j = tid; j < kDecodeMaxRows * k2Feat; j += k2Threads) (&s_dot[0][0])[j] = 0.f;
  __syncthreads();

  for (int it0 = warp; it0 < items; it0 += 2 * k2Warps) {
    if (it0 != warp) {
      load(it0, wv[0]);
      load(it0 + k2Warps, wv[1]);
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int it = it0 + p * k2Warps;
      if (it >= items) break;  // warp-uniform
      const Item m = item_of(it);
      const unsigned mine = __ballot_sync(kFull, my_id == m.e);
      const int cnt = __popc(mine);
      for (int r0 = 0; r0 < cnt; r0 += kPassRows) {
        const int R = min(kPassRows, cnt - r0);
        int arow[kPassRows];
#pragma unroll
        for (int r = 0; r < kPassRows; ++r) arow[r] = r < R ? nth_set_bit(mine, r0 + r) : 0;
        float acc[kPassRows];
#pragma unroll
        for (int r = 0; r < kPassRows; ++r) acc[r] = 0.f;
#pragma unroll
        for (int u = 0; u < k2Unroll; ++u) {
          const int c = g + 8 * u;
          if (c < chunks) {
            float fw[8];
            unpack_bf16x8(wv[p][u], fw);
#pragma unroll
            for (int r = 0; r < kPassRows; ++r) {
              if (r < R) {
                float hv[8];
                unpack_bf16x8(s_h[arow[r] * chunks + c], hv);
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[r] = fmaf(fw[q], hv[q], acc[r]);
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kPassRows; ++r) {
          float v = acc[r];
          v += __shfl_xor_sync(kFull, v, 4);
          v += __shfl_xor_sync(kFull, v, 2);
          v += __shfl_xor_sync(kFull, v, 1);
          if (r < R && g == 0 && m.active) s_dot[arow[r]][(it % k2Quads) * 4 + fl] = v;
        }
      }
    }
  }
  __syncthreads();
  const int o0 = int(blockIdx.x) * k2Feat;
  for (int j = tid; j < T * k2Feat; j += k2Threads) {
    const int t = j / k2Feat, f = j - t * k2Feat;
    if (o0 + f >= H) continue;
    float v = 0.f;
    for (int jj = 0; jj < k; ++jj) v += __ldcg(wts + t * k + jj) * s_dot[t * k + jj][f];
    y[std::size_t(t) * H + o0 + f] = __float2bfloat16_rn(v);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

std::size_t w13_smem(int T, int H) { return std::size_t(std::min(T, kPassRows)) * (H / 8) * sizeof(uint4); }
std::size_t w2_smem(int rows, int I) { return std::size_t(rows) * (I / 8) * sizeof(uint4); }
constexpr std::size_t kMaxDynSmem = 200 * 1024;

}  // namespace

bool experts_decode_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k) {
  const int rows = T * k;
  return rows >= 1 && rows <= kDecodeMaxRows && w.n >= 1 && w.H % 8 == 0 && w.I % 8 == 0 && w.I <= 8 * 8 * k2Unroll &&
         aligned16(d_x) && aligned16(d_y) && aligned16(w.w13) && aligned16(w.w2) &&
         w13_smem(T, w.H) <= kMaxDynSmem && w2_smem(rows, w.I) <= 40 * 1024;
}

void experts_decode(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s, bool pdl, bool direct_w2) {
  require(T >= 0 && k >= 1, "experts_decode: need T >= 0 and k >= 1, got ", T, " and ", k);
  if (T == 0) return;
  require(experts_decode_ok(w, d_x, d_y, T, k), "experts_decode: T*k = ", T * k, " rows (at most ", kDecodeMaxRows,
          "), H % 8, I % 8 (I <= 512) and 16-byte alignment are required; use experts_direct instead");
  const int rows = T * k, n = w.n, H = w.H, I = w.I;
  reserve_grouped_workspace(ws, w, rows);  // h [rows, I], indexed by assignment
  ws.last_used = GroupedStrategy::WeightStream;
  const std::size_t smem13 = w13_smem(T, H);
  static std::size_t smem13_set = 48 * 1024;  // raised once, before any graph capture (first call is eager)
  if (smem13 > smem13_set) {
    CUDA_CHECK(cudaFuncSetAttribute(w13_swiglu_decode, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxDynSmem)));
    smem13_set = kMaxDynSmem;
  }
  launch_pdl(pdl, w13_swiglu_decode, dim3(unsigned((I + k13Idx - 1) / k13Idx), unsigned(std::min(n, rows))),
             dim3(k13Threads), smem13, s, w.w13, d_x, d_ids, rows, k, n, H, I, ws.h);
  if (direct_w2) {  // its prologue and first weight loads overlap the w13 kernel (PDL), h is read after it
    require(experts_direct_ok(w, d_x, d_y, T, k), "experts_decode: the direct w2 kernel cannot run this shape");
    w2_combine_direct_launch(w, ws.h, d_ids, d_weights, T, k, d_y, s, pdl);
    return;
  }
  launch_pdl(pdl, w2_combine_decode, dim3(unsigned((H + k2Feat - 1) / k2Feat)), dim3(k2Threads), w2_smem(rows, I), s,
             w.w2, ws.h, d_ids, d_weights, T, k, n, H, I, d_y);
}

}  // namespace eplab::gpu
