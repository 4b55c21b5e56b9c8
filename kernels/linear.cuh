// Dense projection with bias: y[T, N] = x[T, K] · W[N, K]^T + b[N] (q/k/v/o, lm_head), bf16 in, fp32
// accumulation (cuBLAS, CUBLAS_COMPUTE_32F), bf16 or fp32 out.
//
// What: the bias is folded into the GEMM instead of added afterwards. A small kernel first writes b into
// every row of y (broadcast), then cublasGemmEx runs with beta = 1: y = 1 · x W^T + 1 · y. cuBLAS forms
// alpha·acc + beta·C in fp32 and rounds once, so a bf16 output is bf16(fp32(x W^T) + b) -- one rounding,
// the same as a cuBLASLt BIAS epilogue, with only the plain cuBLAS API. (b is bf16 on disk, so writing it
// into a bf16 y loses nothing.) Without a bias: beta = 0 and no broadcast.
// Layout (as router.cuh explains): row-major [R, C] is column-major [C, R]; we ask for column-major
// y^T[N, T] = W[N, K] · x^T[K, T]: A = W (ld K, transposed), B = x (ld K), C = y (ld N); m = N, n = T, k = K.
// Thread mapping: the broadcast is one thread per output element (grid-stride); the GEMM is cuBLAS's.
// Why: the projections are plain GEMMs (cuBLAS is at the roofline for them); the broadcast costs one write
// of y, which for decode (T = 1) is a few KB.
// lm_head: use linear_f32 for fp32 logits (argmax and sampling compare them; bf16 logits would tie), and
// only on the rows whose logits are needed (the last position of each sequence when generating).
// Side effects: sets the handle's stream to `s`; restores its pointer mode. T = 0 is a no-op. y must not
// alias x.
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
