// Naive MoE (chapter 01, the "before" picture): one thread block per token loops over its k experts.
//
// What, for token t and each of its choices j (expert e = ids[t, j], multiplier g = weights[t, j]):
//   h[i]  = silu(w1_e[i, :] · x_t) * (w3_e[i, :] · x_t)      i < I, rounded to bf16 (as the grouped path
//                                                             stores h) and kept in shared memory
//   y_t  += g * (w2_e[o, :] · h)                              o < H, fp32 accumulator in shared memory
// then y_t is rounded once to bf16. All dot products accumulate in fp32.
//
// Thread mapping: blockIdx.x = token, 256 threads = 8 warps. x_t is widened to fp32 into shared
// memory once. Each warp takes whole output rows (rows i, i+8, ... of w1/w3, then rows o, o+8, ... of
// w2): its 32 lanes stride along the row with 16-byte loads (8 bf16) when the row length is a multiple
// of 8 and the weights are 16-byte aligned (scalar loads otherwise), and a warp shuffle reduction
// finishes the dot product. w1 and w3 rows are read in the same pass (they share x).
// Why it is slow, on purpose: every token re-reads the full weights of its k experts (3*H*I bf16 each),
// so T tokens stream T*k expert matrices through L2 instead of each expert's weights once per batch;
// chapter 02's grouped GEMMs fix exactly that. It is still correct for any H and I.
// Shared memory: (I + H + H) floats (rounded up to multiples of 4), sized at launch; more than this
// GPU's per-block limit is a clear error (use the grouped path).
//
// ids must be valid expert ids (< the number of experts in w1/w3/w2); T = 0 is a no-op.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_x: [T, H], d_ids / d_weights: [T, k], d_w1 / d_w3: [E, I, H], d_w2: [E, H, I], d_y: [T, H].
void naive_moe(const bf16* d_x, const int* d_ids, const float* d_weights, int T, int k, int H, int I,
               const bf16* d_w1, const bf16* d_w3, const bf16* d_w2, bf16* d_y, cudaStream_t s);

}  // namespace eplab::gpu
