// Decode-size experts (T*k <= 32 rows): GpuMoeLayer's token-direct chain with a w1|w3 kernel rebuilt for
// memory-level parallelism. Same contract as experts_direct (grouped_experts.cuh): x [T, H] and ids/weights
// [T, k] in, y [T, H] out, h [T*k, I] (bf16, per assignment) in the workspace, no host synchronisation.
//
// Two kernels: this file's w1|w3 + SwiGLU kernel, then experts_direct's w2 + weighted-combine kernel
// (w2_combine_direct_launch) launched with programmatic dependent launch, so its prologue and first weight
// loads overlap the w1|w3 kernel. Measured at T = 1 on an H200, whole layer: 0.0299-0.0308 ms, against
// 0.0356 with both of experts_direct's kernels and 0.0429 with a w2 kernel of this file's design (under ncu:
// this w1|w3 kernel 10.5-11.3 us against experts_direct's 12.5-13.1; that w2 kernel 23-24 us, 198 registers
// and one block per SM, against experts_direct's 13.7-14.6; it was deleted, chapter 02 README).
//
// What changed against experts_direct's w1|w3 kernel, and why (at T = 1 it read weights at ~1 TB/s):
//  * No shared-memory scan of ids before the first weight load. Every warp reads ids[0..rows) (one lane
//    each, one L2 round trip), finds its block's expert with a warp OR-reduction over expert bits, and
//    issues its weight loads right away.
//  * 8 warps per block, a warp pair per intermediate index i, each warp half of H: with H = 4096 a lane
//    holds 8 + 8 16-byte loads of w1[i] and w3[i], i.e. the whole 16 KB of the pair's rows is requested in
//    ONE round trip (64 KB per block, ~110 KB per SM at T = 1). x rows are staged in shared memory while the
//    weight loads are in flight.
//  * Launched with programmatic dependent launch (pdl.cuh) when `pdl` is true: its blocks are resident and
//    waiting when the router finishes, and it lets the w2 kernel launch right after its own wait for the
//    router. CUDA graphs keep these edges.
// Requires experts_decode_ok: 1 <= T*k <= 32, H % 8 == 0, I % 8 == 0 and I <= 512, 16-byte aligned x, y
// and weights, E >= 1, and what experts_direct_ok requires of the w2 kernel.
#pragma once
#include "grouped_experts.cuh"

namespace eplab::gpu {

constexpr int kDecodeMaxRows = 32;

bool experts_decode_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k);
// pdl = false: plain launches (a caller that records events between the kernels).
void experts_decode(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s, bool pdl = true);

}  // namespace eplab::gpu
