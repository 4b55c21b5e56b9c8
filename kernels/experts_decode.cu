// Decode-size experts kernel; design in experts_decode.cuh.
#include "experts_decode.cuh"

#include <algorithm>

#include "cuda_check.hpp"
#include "device_util.cuh"
#include "pdl.cuh"
#include "swiglu.cuh"

namespace eplab::gpu {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPassRows = 8;  // rows of one expert per pass (fp32 accumulators per lane)

constexpr int k13Idx = 4;                // intermediate indices per block
constexpr int k13Threads = 2 * k13Idx * 32;  // warp pair per index: halves of H
constexpr int k13Unroll = 8;             // 16-byte loads per weight row per lane per batch (H = 4096: one batch)

constexpr int kMaxInter = 512;  // I per w1|w3 row pair: the limit of experts_decode_ok

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

std::size_t w13_smem(int T, int H) { return std::size_t(std::min(T, kPassRows)) * (H / 8) * sizeof(uint4); }
constexpr std::size_t kMaxDynSmem = 200 * 1024;

}  // namespace

bool experts_decode_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k) {
  const int rows = T * k;
  return rows >= 1 && rows <= kDecodeMaxRows && w.n >= 1 && w.H % 8 == 0 && w.I % 8 == 0 && w.I <= kMaxInter &&
         aligned16(d_x) && aligned16(d_y) && aligned16(w.w13) && aligned16(w.w2) &&
         w13_smem(T, w.H) <= kMaxDynSmem && experts_direct_ok(w, d_x, d_y, T, k);
}

void experts_decode(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s, bool pdl) {
  require(T >= 0 && k >= 1, "experts_decode: need T >= 0 and k >= 1, got ", T, " and ", k);
  if (T == 0) return;
  require(experts_decode_ok(w, d_x, d_y, T, k), "experts_decode: T*k = ", T * k, " rows (at most ", kDecodeMaxRows,
          "), H % 8, I % 8 (I <= ", kMaxInter, ") and 16-byte alignment are required; use experts_direct instead");
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
             dim3(k13Threads), smem13, s, w.w13, d_x, d_ids, rows, k, n, H, I, ws.h.get());
  // Its prologue and first weight loads overlap the w1|w3 kernel (PDL); it reads h only after that kernel.
  w2_combine_direct_launch(w, ws.h.get(), d_ids, d_weights, T, k, d_y, s, pdl);
}

}  // namespace eplab::gpu
