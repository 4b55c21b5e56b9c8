// Token-tiled router: router GEMM on tensor cores + routing, one kernel, for any T.
//
// Why. logits[T, E] = x[T, H] · gate[E, H]^T with E = 16 is a skinny GEMM that cuBLAS runs poorly (71 us at
// T = 4096 on an H200, where reading x, 32 MB, takes ~8 us), and the one-block-per-token fused router
// (routing.cuh) re-reads the 128 KB gate from L2 for every token. Here a block owns a TILE of 32 tokens and
// a slice of H: x is streamed from HBM exactly once, the gate slice is reused by the 32 tokens, and the
// products run on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulation), so the kernel is bound by
// reading x.
//
// Thread mapping. Block = 4 warps, grid = (ceil(T / 32), splits). Block (tile, split) covers tokens
// [32 tile, 32 tile + 32) and the 32-wide H steps [split·steps/splits, (split+1)·steps/splits); its warps
// take those steps round robin (warp w: steps w, w+4, ...), 4 steps' loads in flight per lane. Per step a
// lane loads one 16-byte vector from each of 4 token rows (2 m-tiles x rows r, r+8) and one from each
// gate row it needs, and feeds them to mma without any shuffling: the K order inside an mma is a free
// permutation as long as A and B use the same one, so lane (g = lane/4, c = lane%4) simply owns h =
// 32 step + 8c .. +7 of its rows (documented at the mma call). Warps' partial tiles are summed in shared
// memory in warp order; with splits > 1 each block writes its partial tile to a workspace and the LAST
// block of a tile (atomic counter, reset by that block for the next launch) adds the splits in split
// order. Every sum has a fixed order: the logits are the same bits on every run.
//
// Epilogue: the tile's fp32 logits are written to d_logits and routed from shared memory by the SAME
// per-token warp code as route_topk (routing_rows.cuh), so ids and weights are exactly route_topk's on
// the same logits (tests check it). Logits differ from cuBLAS's only by fp32 summation order.
//
// splits: chosen so that the grid has ~3 blocks per SM, with at least 2 H steps per warp (T = 4096: 128 tiles
// x 4; T >= 16384: 1; T = 1: 16 blocks of 8 KB of gate each). Measured at T = 1 on an H200: the router kernel
// with 32 splits and a scalar split sum 12 us (ncu), 8 splits with the vectorised sum 8.7 us; one block of 16
// warps reading all 128 KB (no partials, fence or counter) 11.2 us: one SM cannot pull 128 KB fast enough;
// the 8 splits as one thread-block cluster summing through distributed shared memory: no faster (so not
// kept). Whole layer by split count: router_tiled.cu, router_tiled_auto_splits. Requires H % 8 == 0, 16-byte aligned x and gate, E <= 64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "device_buffer.hpp"
#include "model/config.hpp"

namespace eplab::gpu {

constexpr int kTiledRouterTokens = 32;    // tokens per tile
constexpr int kTiledRouterMaxExperts = 64;

// Partial-sum buffer and per-tile counters for splits > 1. Counters are zeroed when allocated and every
// launch leaves them zero, so a workspace can be reused (and captured into CUDA graphs) freely.
struct TiledRouterWorkspace {
  DeviceBuffer<float> partials;
  DeviceBuffer<int> counters;
  unsigned generation = 0;  // bumped on every reallocation (graphs must re-capture)
};

bool router_route_tiled_ok(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int H, int E);
// The split count router_route_tiled uses for T tokens (splits = 0 below): ~3 blocks per SM.
int router_tiled_auto_splits(int T, int H);
// Grows ws for (T, E, splits) (splits = 0: auto). Call it outside graph captures / timed loops.
void reserve_router_tiled(TiledRouterWorkspace& ws, int T, int H, int E, int splits = 0);

// x [T, H] bf16, gate [E, H] bf16 -> logits [T, E] fp32, ids/weights [T, k] (same arguments and rules as
// route_topk). splits = 0: auto; otherwise 1..ceil(H/32)/4 (clamped). T = 0 is a no-op.
void router_route_tiled(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E, int k,
                        RouterKind kind, float jitter_eps, float* d_logits, int* d_ids, float* d_weights,
                        TiledRouterWorkspace& ws, cudaStream_t s, int splits = 0);

}  // namespace eplab::gpu
