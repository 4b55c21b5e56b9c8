// Router GEMM: logits[T, E] = x[T, H] · gate[E, H]^T, bf16 in, fp32 out, fp32 accumulation (cuBLAS).
//
// What: one cublasGemmEx call (A/B CUDA_R_16BF, C CUDA_R_32F, CUBLAS_COMPUTE_32F). The logits stay in
// fp32 because routing compares them: rounding them to bf16 (8 bits of mantissa) would turn many
// clear decisions into ties.
//
// Layout: every tensor is row-major as on disk. cuBLAS is column-major, and a row-major [R, C] matrix
// is the same bytes as a column-major [C, R] one. So we ask cuBLAS for the column-major [E, T] result
// logits^T = gate · x^T:
//   A = gate, seen column-major as [H, E] (ld = H), used transposed  -> op(A) = [E, H]
//   B = x,    seen column-major as [H, T] (ld = H), used as is        -> op(B) = [H, T]
//   C = logits, column-major [E, T] (ld = E)  ==  row-major [T, E], which is what we want.
// m = E, n = T, k = H. No copies, no explicit transposes.
//
// Thread mapping: cuBLAS's choice (the GEMM is tiny next to the experts: 2·T·H·E flops).
// Side effects: sets the handle's stream to `s` (and restores the handle's pointer mode after
// using host-side alpha/beta). T = 0 is a no-op.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_x: [T, H] bf16, d_gate: [E, H] bf16, d_logits: [T, E] fp32 (all row-major, device memory).
void router_logits(cublasHandle_t h, const bf16* d_x, const bf16* d_gate, int T, int H, int E, float* d_logits,
                   cudaStream_t s);

}  // namespace eplab::gpu
