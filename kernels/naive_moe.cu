#include "naive_moe.cuh"


#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// Adds the 8 products of one 16-byte weight vector with 8 consecutive fp32 values of v.
__device__ __forceinline__ float dot8(const int4& q, const float* v) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&q);
  const float4 a = *reinterpret_cast<const float4*>(v);
  const float4 b = *reinterpret_cast<const float4*>(v + 4);
  const float2 f0 = __bfloat1622float2(p[0]), f1 = __bfloat1622float2(p[1]);
  const float2 f2 = __bfloat1622float2(p[2]), f3 = __bfloat1622float2(p[3]);
  return f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
}

// One warp: (ra · v, rb · v) over n elements (rb may be null: then only ra). Result valid in all lanes.
__device__ __forceinline__ float2 warp_dot2(const bf16* ra, const bf16* rb, const float* v, int n, bool vec) {
  const int lane = threadIdx.x & 31;
  float sa = 0.f, sb = 0.f;
  if (vec) {  // n % 8 == 0, rows 16-byte aligned, v 16-byte aligned
    for (int c = lane * 8; c < n; c += 32 * 8) {
      sa += dot8(*reinterpret_cast<const int4*>(ra + c), v + c);
      if (rb) sb += dot8(*reinterpret_cast<const int4*>(rb + c), v + c);
    }
  } else {
    for (int c = lane; c < n; c += 32) {
      sa += __bfloat162float(ra[c]) * v[c];
      if (rb) sb += __bfloat162float(rb[c]) * v[c];
    }
  }
  return make_float2(warp_sum(sa), warp_sum(sb));
}

// Shared memory layout (floats): h[I4] | x[H4] | y[H], I4/H4 = I/H rounded up to a multiple of 4 so every
// region starts 16-byte aligned.
__global__ void __launch_bounds__(kThreads) naive_moe_kernel(const bf16* __restrict__ x, const int* __restrict__ ids,
                                                             const float* __restrict__ weights, int k, int H, int I,
                                                             const bf16* __restrict__ w1, const bf16* __restrict__ w3,
                                                             const bf16* __restrict__ w2, bf16* __restrict__ y,
                                                             bool vec_h, bool vec_i) {
  extern __shared__ float4 smem4[];
  float* hs = reinterpret_cast<float*>(smem4);
  float* xs = hs + (I + 3) / 4 * 4;
  float* ys = xs + (H + 3) / 4 * 4;
  const int t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;

  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    xs[c] = __bfloat162float(x[size_t(t) * H + c]);
    ys[c] = 0.f;
  }
  __syncthreads();

  for (int j = 0; j < k; ++j) {
    const int e = ids[size_t(t) * k + j];
    const float g = weights[size_t(t) * k + j];
    const bf16* W1 = w1 + size_t(e) * I * H;
    const bf16* W3 = w3 + size_t(e) * I * H;
    const bf16* W2 = w2 + size_t(e) * H * I;
    for (int i = warp; i < I; i += nwarps) {
      const float2 ab = warp_dot2(W1 + size_t(i) * H, W3 + size_t(i) * H, xs, H, vec_h);
      if (lane == 0) hs[i] = __bfloat162float(__float2bfloat16_rn(silu(ab.x) * ab.y));
    }
    __syncthreads();
    for (int o = warp; o < H; o += nwarps) {
      const float d = warp_dot2(W2 + size_t(o) * I, nullptr, hs, I, vec_i).x;
      if (lane == 0) ys[o] += g * d;  // row o belongs to one warp for every j: no race
    }
    __syncthreads();  // h is rewritten by the next choice
  }
  for (int c = threadIdx.x; c < H; c += blockDim.x) y[size_t(t) * H + c] = __float2bfloat16_rn(ys[c]);
}

}  // namespace

void naive_moe(const bf16* d_x, const int* d_ids, const float* d_weights, int T, int k, int H, int I, const bf16* d_w1,
               const bf16* d_w3, const bf16* d_w2, bf16* d_y, cudaStream_t s) {
  require(T >= 0, "naive_moe: tokens must be >= 0, got ", T);
  require(k >= 1 && H >= 1 && I >= 1, "naive_moe: need k, hidden, intermediate >= 1 (got ", k, ", ", H, ", ", I, ")");
  // Check the shared memory need before anything else, so the error does not depend on T.
  const size_t smem = (size_t(I + 3) / 4 * 4 + size_t(H + 3) / 4 * 4 + size_t(H)) * sizeof(float);
  int dev = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  require(smem <= size_t(optin), "naive_moe: hidden ", H, " and intermediate ", I, " need ", smem / 1024,
          " KiB of shared memory per block, more than this GPU's ", optin / 1024,
          " KiB; use the grouped path (chapter 02) for this shape");
  if (T == 0) return;
  require(d_x && d_ids && d_weights && d_w1 && d_w3 && d_w2 && d_y, "naive_moe: null device pointer");
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(naive_moe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const bool vec_h = H % 8 == 0 && aligned16(d_w1) && aligned16(d_w3);
  const bool vec_i = I % 8 == 0 && aligned16(d_w2);
  naive_moe_kernel<<<unsigned(T), kThreads, smem, s>>>(d_x, d_ids, d_weights, k, H, I, d_w1, d_w3, d_w2, d_y, vec_h,
                                                        vec_i);
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
