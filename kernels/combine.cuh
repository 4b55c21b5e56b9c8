// Weighted unpermute + combine: y[t, :] = sum_j weights[t, j] * yp[row_of[t*k + j], :].
//
// What: the last step of the grouped path. The experts wrote their outputs in expert-grouped order
// (yp, [T*k, H]); each token gathers its k rows back, scales them by its routing multipliers and sums,
// in fp32, in the order j = 0..k-1, then rounds once to bf16.
//
// Thread mapping: one thread per 16-byte vector (8 bf16) of the OUTPUT y when H % 8 == 0 and the
// pointers are 16-byte aligned (else one thread per element), grid-stride. Consecutive threads cover
// consecutive vectors of a token row, so each of the k gathered rows is read coalesced. Why a gather
// and not a scatter-add from yp: every output element is written by exactly one thread, so no atomics,
// no zero-fill pass, and the fp32 summation order is fixed -> deterministic bits run to run.
// row_of and weights are read once per vector; they are tiny and stay in L1/L2.
// A negative row_of (an invalid id, see permute.cuh) contributes nothing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_yp: [T*k, H] bf16, d_row_of: [T*k], d_weights: [T, k] fp32, d_y: [T, H] bf16. T = 0 is a no-op.
void unpermute_combine(const bf16* d_yp, const int* d_row_of, const float* d_weights, int T, int k, int H, bf16* d_y,
                       cudaStream_t s);

}  // namespace eplab::gpu
