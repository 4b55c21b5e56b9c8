#include "routing.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_check.hpp"

namespace eplab::gpu {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;

// (v, id) beats (bv, bid): larger value, or the same value and a lower id. This is the host's rule
// "first index of the maximum" (argmax) and "stable sort, descending" (softmax top-k).
__device__ __forceinline__ bool beats(float v, int id, float bv, int bid) {
  return v > bv || (v == bv && id < bid);
}

// Butterfly: afterwards every lane holds the warp's best (value, id).
__device__ __forceinline__ void warp_argmax(float& v, int& id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, off);
    const int oid = __shfl_xor_sync(kFullMask, id, off);
    if (beats(ov, oid, v, id)) {
      v = ov;
      id = oid;
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// std::max(a, b) as the host evaluates it: (a < b) ? b : a.
__device__ __forceinline__ float host_max(float a, float b) { return (a < b) ? b : a; }

// The sparsemixer mask of the host, bit for bit: (top - s) / max(|s|, top) > thr, each op IEEE-rounded.
__device__ __forceinline__ bool sm_masked(float top, float s, float thr) {
  return __fdiv_rn(__fsub_rn(top, s), host_max(fabsf(s), top)) > thr;
}

// Loads token t's logits into registers: v[i] = s[lane + 32 i], -inf where lane + 32 i >= E (such slots
// are also excluded explicitly by every loop below, so a real -inf logit is never confused with one).
template <int VPL>
__device__ __forceinline__ void load_row(const float* s, int E, int lane, float (&v)[VPL]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < E ? s[e] : -INFINITY;
  }
}

// One token's softmax top-k by one full warp. row: its E logits (global or shared memory); writes
// tid_ids[0..k) and tid_w[0..k).
template <int VPL>
__device__ void softmax_topk_row(const float* row, int E, int k, int* tid_ids, float* tid_w, int lane) {
  float v[VPL];
  load_row<VPL>(row, E, lane, v);

  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPL; ++i)
    if (lane + 32 * i < E) mx = fmaxf(mx, v[i]);
  mx = warp_max(mx);
  double sum = 0.0;
#pragma unroll
  for (int i = 0; i < VPL; ++i)
    if (lane + 32 * i < E) sum += exp(double(v[i]) - double(mx));
  sum = warp_sum(sum);

  // k rounds of argmax over the not-yet-taken logits. Round j's winner is written by lane j % 32 (its
  // provisional weight p is renormalised by the same lane below, so no cross-lane memory traffic).
  unsigned taken = 0;  // bit i: slot lane + 32 i already chosen
  double kept = 0.0;
  for (int j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int bid = INT_MAX;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !((taken >> i) & 1u) && beats(v[i], e, bv, bid)) {
        bv = v[i];
        bid = e;
      }
    }
    warp_argmax(bv, bid);
    if ((bid & 31) == lane) taken |= 1u << (bid >> 5);
    const float p = float(exp(double(bv) - double(mx)) / sum);  // the host's p[e], rounded to float
    kept += double(p);
    if (lane == (j & 31)) {
      tid_ids[j] = bid;
      tid_w[j] = p;
    }
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) tid_w[j] = float(double(tid_w[j]) / kept);
}

template <int VPL>
__global__ void softmax_topk_kernel(const float* __restrict__ logits, int T, int E, int k, int* __restrict__ ids,
                                    float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;  // t is uniform across the warp, so whole warps leave together
  softmax_topk_row<VPL>(logits + size_t(t) * E, E, k, ids + size_t(t) * k, weights + size_t(t) * k, lane);
}

// One token's sparsemixer by one full warp; writes ids[0..2) and weights[0..2).
template <int VPL>
__device__ void sparsemixer_row(const float* row, int E, float eps, int* ids, float* weights, int lane) {
  float v[VPL];
  load_row<VPL>(row, E, lane, v);
  const float thr = __fmul_rn(2.f, eps);

  // First expert: argmax of s.
  float top1 = -INFINITY;
  int e1 = INT_MAX;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E && beats(v[i], e, top1, e1)) {
      top1 = v[i];
      e1 = e;
    }
  }
  warp_argmax(top1, e1);
  double d1 = 0.0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E && !(isinf(v[i]) && v[i] < 0.f) && !sm_masked(top1, v[i], thr))
      d1 += exp(double(v[i]) - double(top1));
  }
  d1 = warp_sum(d1);
  const float w1 = float(exp(double(top1) - double(top1)) / d1);

  // Second expert: argmax of s with s[e1] = -inf. e1 itself stays a candidate (at -inf) exactly as in the
  // host's argmax over the masked copy, so even degenerate rows pick the same id.
  float m[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) m[i] = (lane + 32 * i == e1) ? -INFINITY : v[i];
  float top2 = -INFINITY;
  int e2 = INT_MAX;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E && beats(m[i], e, top2, e2)) {
      top2 = m[i];
      e2 = e;
    }
  }
  warp_argmax(top2, e2);
  double d2 = 0.0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    // The softmax runs over the masked copy m, the mask's factor uses the original logit v.
    if (e < E && !(isinf(m[i]) && m[i] < 0.f) && !sm_masked(top2, v[i], thr))
      d2 += exp(double(m[i]) - double(top2));
  }
  d2 = warp_sum(d2);
  const float w2 = float(exp(double(top2) - double(top2)) / d2);

  if (lane == 0) {
    ids[0] = e1;
    ids[1] = e2;
    weights[0] = w1;
    weights[1] = w2;
  }
}

template <int VPL>
__global__ void sparsemixer_kernel(const float* __restrict__ logits, int T, int E, float eps, int* __restrict__ ids,
                                   float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;
  sparsemixer_row<VPL>(logits + size_t(t) * E, E, eps, ids + size_t(t) * 2, weights + size_t(t) * 2, lane);
}

// Small batches: router GEMM and routing in ONE kernel, one block per token (kFusedThreads threads).
// Warp w computes the logits of experts w, w + 32, ... as dot products of x_t with gate rows (16-byte
// loads, all of a lane's loads of a row issued before use), writes them to d_logits and shared memory;
// after one __syncthreads warp 0 routes the token from shared memory. Saves the cuBLAS launch, the
// routing launch and the logits round trip through memory; for T <= ~256 the gate (E*H bf16, 128 KB at
// Phi-tiny) is re-read from L2 by every block, which is cheap next to the expert weights.
constexpr int kFusedThreads = 512;  // up to 16 warps; __launch_bounds__ then allows 128 registers per thread
constexpr int kFusedUnroll = 8;     // 2 x 8 16-byte loads in flight per lane; H = 4096 takes two batches

template <int VPL>
__global__ void __launch_bounds__(kFusedThreads)
    router_route_fused_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ gate, int H,
                              int E, int k, RouterKind kind, float eps, float* __restrict__ logits,
                              int* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float s_logit[];  // [E]
  const int t = int(blockIdx.x);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31, nwarps = int(blockDim.x) >> 5;
  const uint4* xr = reinterpret_cast<const uint4*>(x + size_t(t) * H);
  const int chunks = H / 8;
  for (int e = warp; e < E; e += nwarps) {
    const uint4* gr = reinterpret_cast<const uint4*>(gate + size_t(e) * H);
    float acc = 0.f;
    for (int cb = lane; cb < chunks; cb += 32 * kFusedUnroll) {
      uint4 g[kFusedUnroll], xv[kFusedUnroll];
#pragma unroll
      for (int u = 0; u < kFusedUnroll; ++u) {
        const int c = cb + 32 * u;
        g[u] = c < chunks ? __ldg(gr + c) : make_uint4(0, 0, 0, 0);
        xv[u] = c < chunks ? __ldg(xr + c) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kFusedUnroll; ++u) {
        const unsigned gw[4] = {g[u].x, g[u].y, g[u].z, g[u].w}, xw[4] = {xv[u].x, xv[u].y, xv[u].z, xv[u].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc = fmaf(__uint_as_float(gw[q] << 16), __uint_as_float(xw[q] << 16), acc);
          acc = fmaf(__uint_as_float(gw[q] & 0xffff0000u), __uint_as_float(xw[q] & 0xffff0000u), acc);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) {
      s_logit[e] = acc;
      logits[size_t(t) * E + e] = acc;
    }
  }
  __syncthreads();
  if (warp != 0) return;
  if (kind == RouterKind::SparseMixer)
    sparsemixer_row<VPL>(s_logit, E, eps, ids + size_t(t) * 2, weights + size_t(t) * 2, lane);
  else
    softmax_topk_row<VPL>(s_logit, E, k, ids + size_t(t) * k, weights + size_t(t) * k, lane);
}

template <int VPL>
void launch_fused(const __nv_bfloat16* x, const __nv_bfloat16* gate, int T, int H, int E, int k, RouterKind kind,
                  float eps, float* logits, int* ids, float* w, cudaStream_t s) {
  const int threads = std::clamp(E * 32, 32, kFusedThreads);  // one warp per expert up to 16 experts
  router_route_fused_kernel<VPL><<<unsigned(T), unsigned(threads), size_t(E) * sizeof(float), s>>>(
      x, gate, H, E, k, kind, eps, logits, ids, w);
  CUDA_CHECK_LAUNCH();
}

template <int VPL>
void launch(const float* d_logits, int T, int E, int k, RouterKind kind, float eps, int* d_ids, float* d_w,
            cudaStream_t s) {
  const unsigned blocks = unsigned((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (kind == RouterKind::SparseMixer)
    sparsemixer_kernel<VPL><<<blocks, kWarpsPerBlock * 32, 0, s>>>(d_logits, T, E, eps, d_ids, d_w);
  else
    softmax_topk_kernel<VPL><<<blocks, kWarpsPerBlock * 32, 0, s>>>(d_logits, T, E, k, d_ids, d_w);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void route_topk(const float* d_logits, int T, int E, int k, RouterKind kind, float jitter_eps, int* d_ids,
                float* d_weights, cudaStream_t s) {
  require(T >= 0, "route_topk: tokens must be >= 0, got ", T);
  require(E >= 1 && E <= kMaxRoutingExperts, "route_topk: the routing kernel supports 1..", kMaxRoutingExperts,
          " experts (one warp per token, 8 logits per lane), got ", E);
  if (kind == RouterKind::SparseMixer) {
    require(k == 2, "route_topk: sparsemixer routing needs top-k = 2, got ", k);
    require(E >= 2, "route_topk: sparsemixer needs at least 2 experts, got ", E);
  } else {
    require(k >= 1 && k <= E, "route_topk: top-k (", k, ") must be between 1 and the number of experts (", E, ")");
  }
  if (T == 0) return;
  require(d_logits && d_ids && d_weights, "route_topk: null device pointer");
  if (E <= 32) launch<1>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else if (E <= 64) launch<2>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else if (E <= 128) launch<4>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else launch<8>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
}

bool router_route_fused_ok(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int H) {
  auto a16 = [](const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; };
  return H % 8 == 0 && a16(d_x) && a16(d_gate);
}

void router_route_fused(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E, int k,
                        RouterKind kind, float jitter_eps, float* d_logits, int* d_ids, float* d_weights,
                        cudaStream_t s) {
  require(T >= 0, "router_route_fused: tokens must be >= 0, got ", T);
  require(E >= 1 && E <= kMaxRoutingExperts, "router_route_fused: supports 1..", kMaxRoutingExperts,
          " experts, got ", E);
  if (kind == RouterKind::SparseMixer)
    require(k == 2 && E >= 2, "router_route_fused: sparsemixer needs top-k = 2 and >= 2 experts");
  else
    require(k >= 1 && k <= E, "router_route_fused: top-k (", k, ") must be between 1 and the experts (", E, ")");
  if (T == 0) return;
  require(d_x && d_gate && d_logits && d_ids && d_weights, "router_route_fused: null device pointer");
  require(router_route_fused_ok(d_x, d_gate, H),
          "router_route_fused: needs H % 8 == 0 and 16-byte aligned x and gate (use router_logits + route_topk)");
  if (E <= 32) launch_fused<1>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else if (E <= 64) launch_fused<2>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else if (E <= 128) launch_fused<4>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else launch_fused<8>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
}

}  // namespace eplab::gpu
