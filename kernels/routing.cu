#include "routing.cuh"

#include <climits>

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

template <int VPL>
__global__ void softmax_topk_kernel(const float* __restrict__ logits, int T, int E, int k, int* __restrict__ ids,
                                    float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;  // t is uniform across the warp, so whole warps leave together
  float v[VPL];
  load_row<VPL>(logits + size_t(t) * E, E, lane, v);

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
  int* tid_ids = ids + size_t(t) * k;
  float* tid_w = weights + size_t(t) * k;
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
  for (int j = lane; j < k; j += 32) tid_w[j] = float(double(tid_w[j]) / kept);
}

template <int VPL>
__global__ void sparsemixer_kernel(const float* __restrict__ logits, int T, int E, float eps, int* __restrict__ ids,
                                   float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;
  float v[VPL];
  load_row<VPL>(logits + size_t(t) * E, E, lane, v);
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
    ids[size_t(t) * 2] = e1;
    ids[size_t(t) * 2 + 1] = e2;
    weights[size_t(t) * 2] = w1;
    weights[size_t(t) * 2 + 1] = w2;
  }
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

}  // namespace eplab::gpu
