// The padded expert layout of the cublas-padded strategy (grouped_experts.cuh): data movement only.
//
// What: n experts with c_e rows each. The contiguous (permuted) layout of the dispatch plan keeps expert e's
// rows at [off[e], off[e+1]); the padded layout gives every expert the same number of slots,
//     expert e's row m  ->  padded row e * M_pad + m,   m < c_e;   rows e * M_pad + c_e .. (e+1) * M_pad - 1 are 0
//     M_pad = max_e c_e rounded up to kPadMultiple (64)
// so that ONE strided-batched GEMM (same m, n, k for every expert, pointers a fixed stride apart) runs all
// experts at once. The cost is the padding: sum_e (M_pad - c_e) rows of wasted GEMM work and traffic. With
// balanced routing that is the spread of the counts plus the rounding (Phi-tiny at T = 4096: ~512 rows per
// expert, M_pad ~576-640, ~12-25 %); with one expert taking most rows it is up to n x. So the layout has a
// cap: M_pad may be at most padded_capacity_per_expert(ratio, n, rows) = ratio x the mean rows per expert
// (rounded up to 64, at least 64), ratio = 2 by default; above it the callers fall back to contiguous rows
// and per-expert GEMMs (cublas-streams). Buffers for the padded layout hold n x capacity rows.
//
// Kernels (one thread per 16-byte vector of 8 bf16 when H % 8 == 0 and the pointers are 16-byte aligned,
// else one thread per element; grid-stride; consecutive threads take consecutive vectors of a row, so every
// row is read and written coalesced; the offsets live in shared memory, (n + 1) ints):
//   permute_rows_padded      x [T, H] -> padded rows, through the plan's assignment list: the layer's
//                            permute, so padding costs no extra pass. It runs BEFORE the host has the counts
//                            (the host waits for them behind it), so it computes M_pad itself from d_offsets,
//                            in every block, with the same integer formula as padded_rows_per_expert; when
//                            M_pad exceeds m_cap it writes the ordinary contiguous layout instead (what
//                            permute_rows writes), and the host, seeing the same offsets, knows which it got.
//   unpermute_combine_padded y[t] = sum_j w[t,j] * ypad[padded row of (t, j)] in fp32, j in order, one bf16
//                            rounding: the same arithmetic as unpermute_combine (combine.cuh), reading the
//                            padded layout (m_pad = 0: the contiguous one).
//   pad_rows / unpad_rows    contiguous <-> padded copies, for grouped_experts called on contiguous rows
//                            (tests, other callers): two extra passes over the rows that the layer avoids.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

constexpr int kPadMultiple = 64;

// M_pad for the counts in h_offsets [n+1]: max count rounded up to kPadMultiple (0 when every expert is empty).
int padded_rows_per_expert(const int* h_offsets, int n);
// The largest M_pad allowed for `rows` rows over n experts: ratio x rows / n, rounded up to kPadMultiple, at
// least kPadMultiple. ratio >= 1.
int padded_capacity_per_expert(float ratio, int n, int rows);

// d_x [T, H]; d_offsets [n+1], d_assignment [T*k] from build_dispatch_plan; writes d_xpad, which must hold
// max(T*k, n * m_cap) rows: padded with M_pad computed on the GPU when M_pad <= m_cap, else contiguous.
void permute_rows_padded(const bf16* d_x, const int* d_offsets, const int* d_assignment, int T, int k, int n,
                         int m_cap, int H, bf16* d_xpad, cudaStream_t s);

// d_ypad: padded rows (m_pad > 0; ypad_rows = n * m_pad) or contiguous ones (m_pad = 0; ypad_rows = T*k).
// d_ids [T, k], d_row_of [T*k] and d_offsets [n+1] from the plan, d_weights [T, k]. Writes d_y [T, H].
void unpermute_combine_padded(const bf16* d_ypad, int ypad_rows, const int* d_ids, const int* d_row_of,
                              const int* d_offsets, int m_pad, const float* d_weights, int T, int k, int n, int H,
                              bf16* d_y, cudaStream_t s);

// Contiguous d_xp [off[n], H] -> padded d_xpad [n * m_pad, H] (padding rows zero), and back: d_ypad ->
// d_yp [rows, H], rows = off[n]. m_pad >= every count (the caller checked).
void pad_rows(const bf16* d_xp, const int* d_offsets, int n, int m_pad, int H, bf16* d_xpad, cudaStream_t s);
void unpad_rows(const bf16* d_ypad, const int* d_offsets, int n, int m_pad, int rows, int H, bf16* d_yp,
                cudaStream_t s);

}  // namespace eplab::gpu
