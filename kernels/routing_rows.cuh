// Device-side routing of ONE token by ONE full warp, shared by every kernel that routes
// (routing.cu: route_topk, router_route_fused; router_tiled.cu: router_route_tiled). Internal header:
// include it only from .cu files. The semantics (and why each comparison is written the way it is) are
// described in routing.cuh; keeping a single copy is what makes "identical logits -> identical ids and
// weights" hold across all routing kernels.
#pragma once
#include <cuda_runtime.h>

#include <climits>

namespace eplab::gpu::routing_detail {

constexpr unsigned kFullMask = 0xffffffffu;

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

}  // namespace eplab::gpu::routing_detail
