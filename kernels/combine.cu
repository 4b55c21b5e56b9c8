#include "combine.cuh"

#include <algorithm>
#include <cstdint>

#include "bf16_accum.cuh"
#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {

namespace {

// 8 bf16 per thread, loaded and stored as one 16-byte int4.
__global__ void combine_vec8_kernel(const int4* __restrict__ yp, const int* __restrict__ row_of,
                                    const float* __restrict__ weights, int T, int k, int per_row,
                                    int4* __restrict__ y) {
  const int rows = T * k;
  const size_t total = size_t(T) * per_row;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / per_row);
    const int v = int(i - size_t(t) * per_row);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < k; ++j) {
      const int r = row_of[size_t(t) * k + j];
      if (r < 0 || r >= rows) continue;
      accumulate(yp[size_t(r) * per_row + v], weights[size_t(t) * k + j], acc);
    }
    int4 out;
    store(out, acc);
    y[i] = out;
  }
}

// Any H, any alignment: one element per thread.
__global__ void combine_scalar_kernel(const bf16* __restrict__ yp, const int* __restrict__ row_of,
                                      const float* __restrict__ weights, int T, int k, int H, bf16* __restrict__ y) {
  const int rows = T * k;
  const size_t total = size_t(T) * H;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / H);
    const int c = int(i - size_t(t) * H);
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const int r = row_of[size_t(t) * k + j];
      if (r < 0 || r >= rows) continue;
      acc += weights[size_t(t) * k + j] * __bfloat162float(yp[size_t(r) * H + c]);
    }
    y[i] = __float2bfloat16_rn(acc);
  }
}

unsigned grid_for(size_t work, int threads) {
  return unsigned(std::min<size_t>((work + threads - 1) / threads, size_t(1) << 20));
}

}  // namespace

void unpermute_combine(const bf16* d_yp, const int* d_row_of, const float* d_weights, int T, int k, int H, bf16* d_y,
                       cudaStream_t s) {
  require(T >= 0 && k >= 1 && H >= 1, "unpermute_combine: need T >= 0, k >= 1, H >= 1 (got ", T, ", ", k, ", ", H,
          ")");
  require(std::int64_t(T) * k <= (std::int64_t(1) << 30), "unpermute_combine: T*k too large");
  if (T == 0) return;
  require(d_yp && d_row_of && d_weights && d_y, "unpermute_combine: null device pointer");
  constexpr int threads = 256;
  if (H % 8 == 0 && aligned16(d_yp) && aligned16(d_y)) {
    const int per_row = H / 8;
    combine_vec8_kernel<<<grid_for(size_t(T) * per_row, threads), threads, 0, s>>>(
        reinterpret_cast<const int4*>(d_yp), d_row_of, d_weights, T, k, per_row, reinterpret_cast<int4*>(d_y));
  } else {
    combine_scalar_kernel<<<grid_for(size_t(T) * H, threads), threads, 0, s>>>(d_yp, d_row_of, d_weights, T, k, H,
                                                                                d_y);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
