// Fused SwiGLU kernels; see swiglu.cuh for the what, the thread mapping and the why.
#include "swiglu.cuh"

#include <algorithm>

#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void load8(const bf16* p, float f[8]) { unpack_bf16x8(ldg_bf16x8(p), f); }
__device__ __forceinline__ void load8(const float* p, float f[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// One thread per 8 outputs. Requires I % 8 == 0 and 16-byte aligned gate_up and h.
template <typename In>
__global__ void __launch_bounds__(kThreads) swiglu_vec8(const In* __restrict__ gu, std::size_t rows, int I,
                                                         bf16* __restrict__ h) {
  const std::size_t per_row = std::size_t(I / 8);
  const std::size_t total = rows * per_row;
  for (std::size_t v = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; v < total;
       v += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = v / per_row, c = (v % per_row) * 8;
    const In* row = gu + r * 2 * std::size_t(I);
    float a[8], b[8];
    load8(row + c, a);
    load8(row + I + c, b);
    uint4 out;
    out.x = pack_bf16x2(swiglu_silu(a[0]) * b[0], swiglu_silu(a[1]) * b[1]);
    out.y = pack_bf16x2(swiglu_silu(a[2]) * b[2], swiglu_silu(a[3]) * b[3]);
    out.z = pack_bf16x2(swiglu_silu(a[4]) * b[4], swiglu_silu(a[5]) * b[5]);
    out.w = pack_bf16x2(swiglu_silu(a[6]) * b[6], swiglu_silu(a[7]) * b[7]);
    *reinterpret_cast<uint4*>(h + r * std::size_t(I) + c) = out;
  }
}

// Fallback: one thread per output, any I, any alignment.
template <typename In>
__global__ void __launch_bounds__(kThreads) swiglu_scalar(const In* __restrict__ gu, std::size_t rows, int I,
                                                           bf16* __restrict__ h) {
  const std::size_t total = rows * std::size_t(I);
  for (std::size_t v = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; v < total;
       v += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = v / std::size_t(I), c = v % std::size_t(I);
    const float a = to_float(gu[r * 2 * std::size_t(I) + c]);
    const float b = to_float(gu[r * 2 * std::size_t(I) + I + c]);
    h[v] = __float2bfloat16_rn(swiglu_silu(a) * b);
  }
}

// Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
unsigned grid_for(std::size_t work) {
  const std::size_t blocks = (work + kThreads - 1) / kThreads;
  return unsigned(std::min<std::size_t>(blocks, 132 * 32));
}

template <typename In>
void launch(const In* gu, int rows, int I, bf16* h, cudaStream_t s) {
  require(rows >= 0 && I > 0, "swiglu: bad shape rows=", rows, " I=", I);
  if (rows == 0) return;
  if (I % 8 == 0 && aligned16(gu) && aligned16(h)) {
    const std::size_t work = std::size_t(rows) * (I / 8);
    swiglu_vec8<In><<<grid_for(work), kThreads, 0, s>>>(gu, std::size_t(rows), I, h);
  } else {
    const std::size_t work = std::size_t(rows) * I;
    swiglu_scalar<In><<<grid_for(work), kThreads, 0, s>>>(gu, std::size_t(rows), I, h);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void swiglu(const bf16* d_gate_up, int rows, int I, bf16* d_h, cudaStream_t s) { launch(d_gate_up, rows, I, d_h, s); }
void swiglu(const float* d_gate_up, int rows, int I, bf16* d_h, cudaStream_t s) { launch(d_gate_up, rows, I, d_h, s); }

}  // namespace eplab::gpu
