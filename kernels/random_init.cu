// Hash-based random init on the GPU; see random_init.cuh.
#include "random_init.cuh"

#include <algorithm>

#include "cuda_check.hpp"

namespace eplab::gpu {

namespace {

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__global__ void fill_random_bf16_kernel(__nv_bfloat16* d, std::size_t n, float scale, unsigned long long seed) {
  const unsigned long long key = splitmix64(seed);
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const unsigned long long r = splitmix64(key ^ (0xD1B54A32D192ED03ull * (i + 1)));
    const float u = float(r >> 40) * (2.f / 16777216.f) - 1.f;  // 24 random bits -> [-1, 1)
    d[i] = __float2bfloat16_rn(scale * u);
  }
}

}  // namespace

void fill_random_bf16(__nv_bfloat16* d, std::size_t n, float stddev, unsigned long long seed, cudaStream_t s) {
  if (n == 0) return;
  constexpr int kThreads = 256;
  const std::size_t blocks = std::min<std::size_t>((n + kThreads - 1) / kThreads, 65536);
  fill_random_bf16_kernel<<<unsigned(blocks), kThreads, 0, s>>>(d, n, stddev * 1.7320508f, seed);
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
