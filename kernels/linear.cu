#include "linear.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda_check.hpp"

namespace eplab::gpu {
namespace {

template <typename Out>
__global__ void bias_broadcast_kernel(const bf16* __restrict__ b, std::int64_t total, int N, Out* __restrict__ y) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if constexpr (sizeof(Out) == 4)
      y[i] = __bfloat162float(b[i % N]);
    else
      y[i] = b[i % N];
  }
}

template <typename Out>
void run(cublasHandle_t h, const bf16* x, int T, int K, const bf16* w, int N, const bf16* b, Out* y,
         cudaStream_t s, cudaDataType_t ytype, const char* who) {
  require(T >= 0 && K >= 1 && N >= 1, who, ": bad sizes T ", T, " K ", K, " N ", N);
  require(h != nullptr, who, ": cuBLAS handle is null (create one with cublasCreate)");
  if (T == 0) return;
  require(x && w && y, who, ": null device pointer");
  require(static_cast<const void*>(x) != static_cast<const void*>(y), who, ": y must not alias x");
  if (b) {
    const std::int64_t total = std::int64_t(T) * N;
    const int threads = 256;
    const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 4096));
    bias_broadcast_kernel<Out><<<blocks, threads, 0, s>>>(b, total, N, y);
    CUDA_CHECK_LAUNCH();
  }
  CUBLAS_CHECK(cublasSetStream(h, s));
  cublasPointerMode_t mode;
  CUBLAS_CHECK(cublasGetPointerMode(h, &mode));
  CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  const float alpha = 1.f, beta = b ? 1.f : 0.f;
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/N, /*n=*/T, /*k=*/K, &alpha, w, CUDA_R_16BF,
                            /*lda=*/K, x, CUDA_R_16BF, /*ldb=*/K, &beta, y, ytype, /*ldc=*/N, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
  CUBLAS_CHECK(cublasSetPointerMode(h, mode));
}

}  // namespace

void linear(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b, bf16* d_y,
            cudaStream_t s) {
  run<bf16>(h, d_x, T, K, d_w, N, d_b, d_y, s, CUDA_R_16BF, "linear");
}

void linear_f32(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b,
                float* d_y, cudaStream_t s) {
  run<float>(h, d_x, T, K, d_w, N, d_b, d_y, s, CUDA_R_32F, "linear_f32");
}

}  // namespace eplab::gpu
