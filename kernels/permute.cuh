// Dispatch plan and permute on the GPU: group the T*k (token, choice) assignments by expert.
//
// build_dispatch_plan produces EXACTLY the CPU plan of common/moe/dispatch_plan.cpp:
//   counts[e]      assignments routed to expert e                      [E]
//   offsets[e]     exclusive prefix sum of counts, offsets[E] = T*k     [E+1]
//   row_of[a]      row of assignment a = t*k + j in the permuted buffer [T*k]
//   assignment[r]  inverse of row_of                                    [T*k]
// Stable: inside expert e, rows are in increasing a, so row_of[a] = offsets[e] + #{a' < a : id[a'] = e}.
// Integer counting only, no atomics: the plan is the same bits on every run.
//
// Thread mapping and why. The assignment list is cut into chunks, ONE WARP PER CHUNK. A warp walks its
// chunk 32 ids at a time; __match_any_sync groups the lanes that hold the same expert, the group's
// lowest lane updates that expert's counter by the group size, and each lane's rank inside the group is
// popc(group & lanes-below-me). That gives stable ranks with no atomics and no block-wide scan per tile.
//   * n = T*k <= 16384: ONE block (up to 32 warps, one chunk each), three phases separated by
//     __syncthreads: per-chunk histograms in shared memory -> per-expert scan over the chunks and a
//     block scan over experts (offsets) -> stable scatter. One launch: this is the latency case
//     (decode, small batches), where launch count matters more than parallelism.
//   * n > 16384: chunks of C = max(512, E rounded up to 32) ids, 8 warps per block, three launches:
//     (1) per-chunk histograms, (2) one warp per expert scans its column of the chunk table (prefix of
//     the expert inside the chunk order) and writes counts, (3) every block re-derives offsets from
//     counts (E values, cheap) and each warp scatters its chunk. The chunk table (chunks x E ints) is
//     kept in row_of itself: chunk c's E counters live in row_of[c*C, c*C + E), inside the chunk's own
//     slice (C >= E, and the last chunk absorbs the remainder, so it is >= C long), and in phase 3 the
//     same warp reads them before it overwrites that slice. So no workspace argument and no host
//     synchronisation are needed. For 32768 tokens x top-8 that is 512 chunks -> 64 blocks.
//   We chose chunk histograms over one-block-per-expert ranking because the latter reads all T*k ids
//   once per expert (E times the traffic, and only E SMs busy).
// Supports E <= 4096. An id outside [0, E) is a caller bug that cannot throw from the GPU: it gets
// row_of = -1, is not counted, and the unused tail of assignment (offsets[E] .. T*k) is set to -1.
//
// permute_rows: xp[r, :] = x[assignment[r] / k, :] for r < rows (= T*k). One thread per 16-byte vector
// (8 bf16) of the output when H % 8 == 0 and both pointers are 16-byte aligned, otherwise one thread
// per element; grid-stride, consecutive threads take consecutive vectors of a row, so reads and writes
// are coalesced (one row is H*2 contiguous bytes). A pure copy: bandwidth-bound, bit-exact.
// A row whose assignment is negative (see above) is written as zeros.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

constexpr int kMaxPlanExperts = 4096;

// d_ids: [T, k] expert ids. Outputs as above. No host synchronisation; T = 0 writes zero counts/offsets.
void build_dispatch_plan(const int* d_ids, int T, int k, int E, int* d_counts /*[E]*/, int* d_offsets /*[E+1]*/,
                         int* d_row_of /*[T*k]*/, int* d_assignment /*[T*k]*/, cudaStream_t s);

// d_x: [T, H], d_xp: [rows, H], rows = T*k, d_assignment: [rows] from build_dispatch_plan.
void permute_rows(const bf16* d_x, const int* d_assignment, int rows, int k, int H, bf16* d_xp, cudaStream_t s);

// A plain row gather: dst[i, :] = src[idx[i], :] for i < n, src having src_rows rows. (permute_rows bounds an
// assignment by ITS row count T*k, so it cannot gather n rows out of more than n; this can.) An index outside
// [0, src_rows) gives a zero row, as in permute_rows.
void gather_rows(const bf16* d_src, int src_rows, const int* d_idx, int n, int H, bf16* d_dst, cudaStream_t s);

}  // namespace eplab::gpu
