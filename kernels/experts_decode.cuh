// Decode-size experts (T*k <= 32 rows): the token-direct chain of GpuMoeLayer rebuilt for memory-level
// parallelism. Same contract as experts_direct (grouped_experts.cuh): x [T, H] and ids/weights [T, k] in,
// y [T, H] out, h [T*k, I] (bf16, per assignment) in the workspace, no host synchronisation.
//
// GpuMoeLayer's default on that path is the HYBRID (DecodeKernels::Hybrid, direct_w2 below): this file's w13
// kernel, then experts_direct's w2 kernel launched with PDL. Measured at T = 1 on an H200, whole layer:
// hybrid 0.0299-0.0308 ms, experts_direct 0.0356, both kernels of this file 0.0429.
//
// What changed against experts_direct, and why (at T = 1 it read weights at ~1 TB/s):
//  * No shared-memory scan of ids before the first weight load. Every warp reads ids[0..rows) (one lane
//    each, one L2 round trip), finds its block's expert with a warp OR-reduction over expert bits, and
//    issues its weight loads right away.
//  * w13: 8 warps per block, a warp pair per intermediate index i, each warp half of H: with H = 4096 a lane
//    holds 8 + 8 16-byte loads of w1[i] and w3[i], i.e. the whole 16 KB of the pair's rows is requested in
//    ONE round trip (64 KB per block, ~110 KB per SM at T = 1). x rows are staged in shared memory while the
//    weight loads are in flight.
//  * w2 (+ weighted combine): a block owns 32 output features for all experts present; each warp issues
//    the loads of its first two (expert, 4-feature) items (8 lanes per 896-byte row) BEFORE waiting for the
//    w13 kernel (programmatic dependent launch), so the w2 weight stream overlaps the w13 kernel. Then h
//    (<= 28 KB) is staged in shared memory, dot products go to a per-(assignment, feature) table, and
//    y[t, o] = sum_j w[t, j] * dot[t k + j, o] in j order: deterministic, no atomics.
//  * Both kernels are launched with programmatic dependent launch (pdl.cuh) when `pdl` is true: the w13
//    kernel's blocks are resident and waiting when the router finishes, the w2 kernel's blocks as soon as
//    every w13 block runs. CUDA graphs keep these edges.
// Requires experts_decode_ok: 1 <= T*k <= 32, H % 8 == 0, I % 8 == 0 and I <= 512, 16-byte aligned x, y
// and weights, E >= 1.
#pragma once
#include "grouped_experts.cuh"

namespace eplab::gpu {

constexpr int kDecodeMaxRows = 32;

bool experts_decode_ok(const ExpertWeightsDevice& w, const bf16* d_x, const bf16* d_y, int T, int k);
// direct_w2: the w2 + combine step runs experts_direct's w2 kernel (w2_combine_direct_launch) instead of
// w2_combine_decode: under ncu at T = 1 (H200) the decode w13 kernel took 10.5-11.3 us against the direct one's
// 12.5-13.1, but w2_combine_decode 23-24 us (198 registers, one block per SM) against the direct 13.7-14.6.
void experts_decode(const ExpertWeightsDevice& w, const bf16* d_x, const int* d_ids, const float* d_weights, int T,
                    int k, bf16* d_y, GroupedWorkspace& ws, cudaStream_t s, bool pdl = true, bool direct_w2 = false);

}  // namespace eplab::gpu
