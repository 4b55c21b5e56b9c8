// The weighted-sum step every combine kernel shares: acc += g * row, fp32, for one 16-byte vector of 8 bf16
// (int4) or one bf16; then one rounding to bf16. Combines call accumulate() for j = 0..k-1 in order, so
// every combine (chapter 02's, the padded layout's, the EP engine's) gives the same bits for the same rows.
#pragma once
#include <cuda_bf16.h>

namespace eplab::gpu {

__device__ __forceinline__ void accumulate(const int4& q, float g, float* acc) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float2 f = __bfloat1622float2(p[c]);
    acc[2 * c] += g * f.x;
    acc[2 * c + 1] += g * f.y;
  }
}
__device__ __forceinline__ void accumulate(const __nv_bfloat16& q, float g, float* acc) {
  acc[0] += g * __bfloat162float(q);
}
__device__ __forceinline__ void store(int4& out, const float* acc) {
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int c = 0; c < 4; ++c) o[c] = __floats2bfloat162_rn(acc[2 * c], acc[2 * c + 1]);
}
__device__ __forceinline__ void store(__nv_bfloat16& out, const float* acc) { out = __float2bfloat16_rn(acc[0]); }

}  // namespace eplab::gpu
