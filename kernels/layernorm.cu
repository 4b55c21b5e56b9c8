#include "layernorm.cuh"

#include <cstdint>

#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxN = 8192;  // 32 KB of fp32 row in shared memory (under the 48 KB default)

__device__ __forceinline__ void ln_unpack8(const uint4& u, float f[8]) {
  const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = __uint_as_float(w[q] << 16);
    f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint4 ln_pack8(const float f[8]) {
  std::uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(f[2 * q], f[2 * q + 1]);
    w[q] = *reinterpret_cast<const std::uint32_t*>(&p);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Sum over the block; every thread gets the result. `slots` holds kWarps floats.
__device__ float ln_block_sum(float v, float* slots) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // slots may still be read from the previous reduction
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += slots[w];
  return t;
}

// r and sum may be null (plain LayerNorm). sum may alias x or r: each element is read before it is written,
// by the same thread.
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const bf16* x, const bf16* r, bf16* sum,
                                                              const bf16* __restrict__ w,
                                                              const bf16* __restrict__ b, int n, float eps,
                                                              bf16* __restrict__ y) {
  extern __shared__ float row[];  // [n]
  __shared__ float slots[kWarps];
  const std::size_t base = std::size_t(blockIdx.x) * n;
  const int nvec = n / 8;

  float local = 0.f;
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    float v[8];
    ln_unpack8(reinterpret_cast<const uint4*>(x + base)[i], v);
    if (r) {
      float rv[8];
      ln_unpack8(reinterpret_cast<const uint4*>(r + base)[i], rv);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(__float2bfloat16_rn(v[j] + rv[j]));  // stored stream
      reinterpret_cast<uint4*>(sum + base)[i] = ln_pack8(v);  // exact: v already holds bf16 values
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      row[8 * i + j] = v[j];
      local += v[j];
    }
  }
  const float mean = ln_block_sum(local, slots) / float(n);
  float sq = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float d = row[i] - mean;
    sq += d * d;
  }
  const float var = ln_block_sum(sq, slots) / float(n);  // biased, as torch
  const float inv = rsqrtf(var + eps);
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    float wv[8], bv[8], o[8];
    ln_unpack8(__ldg(reinterpret_cast<const uint4*>(w) + i), wv);
    ln_unpack8(__ldg(reinterpret_cast<const uint4*>(b) + i), bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = (row[8 * i + j] - mean) * inv * wv[j] + bv[j];
    reinterpret_cast<uint4*>(y + base)[i] = ln_pack8(o);
  }
}

void launch(const bf16* x, const bf16* r, bf16* sum, const bf16* w, const bf16* b, int rows, int n, float eps,
            bf16* y, cudaStream_t s, const char* who) {
  require(rows >= 0 && n >= 1, who, ": bad sizes rows ", rows, " n ", n);
  if (rows == 0) return;
  require(x && w && b && y && (!r || sum), who, ": null device pointer");
  require(n % 8 == 0 && n <= kMaxN, who, ": row length ", n, " must be a multiple of 8 and <= ", kMaxN);
  require(aligned16(x) && aligned16(w) && aligned16(b) && aligned16(y) && (!r || (aligned16(r) && aligned16(sum))),
          who, ": pointers must be 16-byte aligned");
  require(y != x && y != r && y != sum, who, ": the output y must not alias an input");
  eplab::require(eps > 0.f, who, ": eps must be > 0");
  layer_norm_kernel<<<rows, kThreads, std::size_t(n) * sizeof(float), s>>>(x, r, sum, w, b, n, eps, y);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void layer_norm(const bf16* d_x, const bf16* d_w, const bf16* d_b, int rows, int n, float eps, bf16* d_y,
                cudaStream_t s) {
  launch(d_x, nullptr, nullptr, d_w, d_b, rows, n, eps, d_y, s, "layer_norm");
}

void add_layer_norm(const bf16* d_x, const bf16* d_r, bf16* d_sum, const bf16* d_w, const bf16* d_b, int rows,
                    int n, float eps, bf16* d_y, cudaStream_t s) {
  require(d_r != nullptr && d_sum != nullptr, "add_layer_norm: residual and sum must not be null");
  launch(d_x, d_r, d_sum, d_w, d_b, rows, n, eps, d_y, s, "add_layer_norm");
}

}  // namespace eplab::gpu
