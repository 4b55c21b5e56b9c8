// Token embedding: out[t, :] = table[ids[t], :], a row gather from embed_tokens [V, H] bf16.
//
// What: a pure copy, no arithmetic, so the output is bit-identical to the table rows.
// Thread mapping: one block per token row; its threads copy the row as 16-byte vectors (8 bf16 each),
// consecutive threads on consecutive vectors (coalesced). H % 8 == 0 and 16-byte aligned pointers are
// preconditions checked on the host (PhiMoE: H = 4096; the HF fixture: 64).
// Why this shape: the gather is bandwidth-bound (T * H * 2 bytes each way) and rows are independent.
//
// Bad ids: the ids live on the device (they may come from a GPU argmax), so the host cannot check them
// before the launch. A row whose id is outside [0, V) is written as zeros and its index is recorded in
// *d_error (the first such row + 1; 0 = all good; atomicCAS, so the flag keeps one offender). The caller
// zeroes d_error once and calls embedding_check_error() after the launch (or once per step) to turn it into
// a one-line eplab::Error. d_error may be null when the ids were already checked on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// d_table: [V, H] bf16, d_ids: [T] int, d_out: [T, H] bf16, d_error: one int (or null). T = 0 is a no-op.
void embedding(const bf16* d_table, int V, int H, const int* d_ids, int T, bf16* d_out, int* d_error,
               cudaStream_t s);

// Synchronises `s`, reads *d_error and throws "embedding: token row r has an id outside [0, V)" when set
// (and resets it to 0 so the buffer can be reused).
void embedding_check_error(int* d_error, int V, cudaStream_t s);

}  // namespace eplab::gpu
