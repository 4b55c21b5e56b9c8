#include "router.cuh"

#include "cuda_check.hpp"

namespace eplab::gpu {

void router_logits(cublasHandle_t h, const bf16* d_x, const bf16* d_gate, int T, int H, int E, float* d_logits,
                   cudaStream_t s) {
  require(T >= 0, "router_logits: tokens must be >= 0, got ", T);
  require(H >= 1 && E >= 1, "router_logits: hidden (", H, ") and experts (", E, ") must be >= 1");
  require(h != nullptr, "router_logits: cuBLAS handle is null (create one with cublasCreate)");
  if (T == 0) return;
  require(d_x && d_gate && d_logits, "router_logits: null device pointer");
  CUBLAS_CHECK(cublasSetStream(h, s));
  cublasPointerMode_t mode;
  CUBLAS_CHECK(cublasGetPointerMode(h, &mode));
  CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  const float alpha = 1.f, beta = 0.f;
  // Column-major view (see router.cuh): C[E, T] = op(A)[E, H] · B[H, T] with A = gate (ld H, transposed),
  // B = x (ld H), C = logits (ld E).
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/E, /*n=*/T, /*k=*/H, &alpha, d_gate, CUDA_R_16BF,
                            /*lda=*/H, d_x, CUDA_R_16BF, /*ldb=*/H, &beta, d_logits, CUDA_R_32F, /*ldc=*/E,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  CUBLAS_CHECK(cublasSetPointerMode(h, mode));
}

}  // namespace eplab::gpu
