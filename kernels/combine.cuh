// The combine of every MoE path: y[t, :] = sum_j weights[t, j] * row(row_of[t*k + j]), one kernel family for
// chapter 02's layer (unpermute_combine) and the EP engine (combine_rows with two sources, combine_rows_class
// for the chunked pipeline). Weighted unpermute + combine: y[t, :] = sum_j weights[t, j] * yp[row_of[t*k + j], :].
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
// row_of and weights are read once per vector; they are tiny and stay in L1/L2. Each thread keeps the loads of
// 2 tokens in flight (grid_stride.cuh: one load at a time left HBM idle, ~2 TB/s). A negative row_of (an
// invalid id, see permute.cuh) contributes nothing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_yp: [T*k, H] bf16, d_row_of: [T*k], d_weights: [T, k] fp32, d_y: [T, H] bf16. T = 0 is a no-op.
void unpermute_combine(const bf16* d_yp, const int* d_row_of, const float* d_weights, int T, int k, int H, bf16* d_y,
                       cudaStream_t s);


// Where the rows come from. Row r is own[r - lo] when lo <= r < hi and returned[r] otherwise, with
// lo = d_offsets[lo_slot] and hi = d_offsets[hi_slot] read on the GPU (the EP engine: this rank's own rows
// never left it, and the host does not know their range yet when the combine is queued). own = nullptr:
// every row from `returned`.
struct CombineSources {
  const bf16* returned = nullptr;
  const bf16* own = nullptr;
  const int* d_offsets = nullptr;
  int lo_slot = 0, hi_slot = 0;
};
// max_blocks: a cap on the grid (the EP engine leaves SMs for NCCL's kernels); 0 = none.
void combine_rows(const CombineSources& src, const int* d_row_of, const float* d_weights, int T, int k, int H,
                  bf16* d_y, cudaStream_t s, unsigned max_blocks = 0);

// The chunked EP pipeline combines tokens in classes: cls = -1, the tokens none of whose rows left this rank;
// cls = c, the tokens whose last remote row comes back in return piece c (the rank's blocks in the send
// buffer start at d_offsets[d_rank_slot[p]]; piece c of a block of cnt rows is ep_pieces.hpp's). Only the
// tokens of that class are written; each with the same arithmetic as combine_rows (the same bits).
struct CombineClass {
  int cls = -1;
  const int* d_rank_slot = nullptr;  // [ranks + 1]
  int ranks = 1, pieces = 1;
};
void combine_rows_class(const CombineSources& src, const int* d_row_of, const float* d_weights, int T, int k, int H,
                        bf16* d_y, const CombineClass& cls, cudaStream_t s, unsigned max_blocks = 0);

}  // namespace eplab::gpu
