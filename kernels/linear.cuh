// Dense projection with bias: y[T, N] = x[T, K] · W[N, K]^T + b[N] (q/k/v/o, lm_head), bf16 in, fp32
// accumulation (cuBLAS, CUBLAS_COMPUTE_32F), bf16 or fp32 out.
//
// What: with a bias and a bf16 output, cuBLASLt's BIAS epilogue adds b to the fp32 accumulator before the one
// rounding to bf16: y = bf16(fp32(x W^T) + b). (A first version broadcast b into y and ran cublasGemmEx with
// beta = 1; measured on an H200, cuBLAS rounds x W^T to bf16 before adding beta * C, an error of up to ~1.5 bf16
// ulps that tests/gpu/test_model_kernels.cu caught.) With an fp32 output the broadcast + beta = 1 form is
// kept: C is fp32 there, so the sum is exact to fp32. Without a bias: plain cublasGemmEx, beta = 0.
// The Lt descriptors and the heuristic's choice are cached per (T, K, N) and device, so a decode step costs
// no descriptor set-up after its first call (and the calls can be captured in a CUDA graph).
// Layout (as router.cuh explains): row-major [R, C] is column-major [C, R]; we ask for column-major
// y^T[N, T] = W[N, K] · x^T[K, T]: A = W (ld K, transposed), B = x (ld K), C = y (ld N); m = N, n = T, k = K.
// Thread mapping: the broadcast is one thread per output element (grid-stride); the GEMMs are cuBLAS's.
// Why: the projections are plain GEMMs (cuBLAS is at the roofline for them).
// lm_head: use linear_f32 for fp32 logits (argmax and sampling compare them; bf16 logits would tie), and
// only on the rows whose logits are needed (the last position of each sequence when generating).
// Side effects: sets the handle's stream to `s` when it is another one (which also resets the handle's
// workspace: set the stream first, then the workspace); restores its pointer mode. T = 0 is a no-op. y must
// not alias x. The cuBLASLt plans and workspace are per device and shared: one model per GPU at a time.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_x: [T, K] bf16, d_w: [N, K] bf16 (as on disk), d_b: [N] bf16 or null, d_y: [T, N].
void linear(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b, bf16* d_y,
            cudaStream_t s);
void linear_f32(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b,
                float* d_y, cudaStream_t s);

}  // namespace eplab::gpu
