// LayerNorm with weight and bias (PhiMoE's norms: torch.nn.LayerNorm, biased variance, eps), optionally
// fused with the residual add that precedes it in a pre-norm decoder:
//     plain:  y = LN(x) * w + b
//     fused:  s = bf16(x + r);  sum_out = s;  y = LN(s) * w + b
// The fused form is what a pre-norm layer does at every norm after the first: the residual stream s is
// stored in bf16 (written to sum_out, which may alias x or r) and normalised from that stored value, so
// y is exactly LN of the residual stream the next layer sees.
//
// Precision: bf16 in/out, statistics in fp32 by two passes over the row held in shared memory (mean,
// then the mean of squared deviations: no E[x^2] - E[x]^2 cancellation), y rounded to bf16 once.
// Thread mapping: one block (128 threads) per row. Each thread loads 8 elements per 16-byte vector,
// consecutive threads consecutive vectors (coalesced), keeps them in shared memory as fp32 (n * 4 bytes,
// n <= 8192), block reductions by warp shuffles + one shared slot per warp.
// Why: a row of 4096 is 8 KB, one block per row keeps every row's three passes on-chip and the kernel
// bandwidth-bound (one read of x (and r), one write of y (and s)). Preconditions checked on the host:
// n % 8 == 0, 16-byte aligned pointers. A faster version for tiny batches would use one warp per row with
// the row in registers (fewer idle threads at T = 1), but at T = 1 this is a single ~2 us launch either way.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_x: [rows, n]; d_w, d_b: [n]; d_y: [rows, n] (must not alias d_x). rows = 0 is a no-op.
void layer_norm(const bf16* d_x, const bf16* d_w, const bf16* d_b, int rows, int n, float eps, bf16* d_y,
                cudaStream_t s);

// Fused residual: d_sum = bf16(d_x + d_r) (may alias d_x or d_r), d_y = LN(d_sum) * w + b (d_y must not
// alias d_x, d_r or d_sum).
void add_layer_norm(const bf16* d_x, const bf16* d_r, bf16* d_sum, const bf16* d_w, const bf16* d_b, int rows,
                    int n, float eps, bf16* d_y, cudaStream_t s);

}  // namespace eplab::gpu
