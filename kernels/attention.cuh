// Causal sliding-window attention with GQA over one sequence's KV cache (prefill and decode alike).
//
// What: the cache holds post-RoPE keys and values, K/V [max_len, kv_heads, D] bf16, row p = position p.
// kv_append() copies the new tokens' k, v ([T, kv_heads, D]) into rows [pos0, pos0 + T). attention() then
// computes, for each new token t (position p = pos0 + t) and query head h, with g = h / (heads / kv_heads):
//     keys j with p - W < j <= p (W = window; W <= 0: no window, j <= p)
//     s_j = (q[t, h] · K[j, g]) / sqrt(D),  o[t, h] = sum_j softmax(s)_j V[j, g]
// which is the CPU reference's mask (a query sees at most W keys, itself included). Softmax in fp32 with
// max subtraction (online: running max m, running sum l, rescaled accumulator), output rounded to bf16.
// Prefill is attention() with T = prompt length, pos0 = 0; decode is T = 1, pos0 = tokens so far.
//
// Thread mapping (simple, correct): one block of W warps per (token t, query head h). Warp w takes keys
// lo + w, lo + w + W, ...; for each key, lane l holds dims l, l + 32, ... (D <= 256, so <= 8 per lane):
// a warp-shuffle reduction gives the score, then every lane updates its own slice of the accumulator with
// the online-softmax rescale. At the end the W warps' (m, l, acc) are merged through shared memory.
// W = 16 when the grid is small (at most 4 blocks per SM), else 4. Why: a decode step has only T * heads =
// 16 blocks (Phi-tiny), and each warp walks its keys one after the other (a shuffle reduction and an exp per
// key). Measured on an H200 (chapter 05 --bench): with 4 warps, batch-1 decode fell from 323 to 199 tokens/s
// between a 5- and a 128-token context; 16 warps gave 297 at 128. But in prefill, where 32768 blocks fill the
// GPU anyway, 16 warps cost the 2048-token prefill ~3800 -> 2974 tokens/s; hence the switch by grid size
// (its prefill gain is still to be measured).
// Rows of the cache outside [lo, p] are never read (the tests poison them with NaN to prove it).
//
// What a faster version changes: (1) one block per (token tile, kv head) so the heads/kv_heads query heads
// of a GQA group and several query tokens share each K/V tile loaded once into shared memory (16-byte
// loads) instead of every (t, h) block re-reading K/V from L2; (2) tensor-core MMA (bf16 mma.sync/wgmma)
// for q·K^T and P·V, flash-attention style; (3) for decode (T = 1, long contexts) split the keys across
// blocks (flash-decoding) and merge the partial (m, l, acc) in a second pass, since T · heads blocks alone
// cannot fill 132 SMs.
//
// Batches of sequences (kv_append_rows, attention_rows): the caches are [B, max_len, kv_heads, D] (sequence
// b's rows start at b · max_len), and each new row carries its sequence and position in two device arrays,
// so one launch serves a decode step of B sequences (or a mixed prefill), and a CUDA graph captured once
// serves every step (the positions are read on the GPU). Same kernel, same arithmetic as one sequence.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// Copies d_k, d_v [T, kv_heads, D] into rows [pos0, pos0 + T) of the caches [max_len, kv_heads, D].
void kv_append(const bf16* d_k, const bf16* d_v, int T, int kv_heads, int D, int pos0, bf16* d_k_cache,
               bf16* d_v_cache, int max_len, cudaStream_t s);

// d_q: [T, heads, D] (after RoPE), caches as above holding rows [0, pos0 + T), d_out: [T, heads, D] bf16.
// heads % kv_heads == 0, D even and <= 256, pos0 + T <= max_len. window <= 0: no sliding window.
void attention(const bf16* d_q, int T, int heads, int kv_heads, int D, int pos0, const bf16* d_k_cache,
               const bf16* d_v_cache, int max_len, int window, bf16* d_out, cudaStream_t s);

// Batched: row t belongs to sequence d_row_seq[t] at position d_row_pos[t] (device arrays, [T]); caches
// [B, max_len, kv_heads, D]. The caller guarantees 0 <= pos < max_len and seq < B (they live on the GPU and
// are not checked here), and, for attention_rows, that rows [0, pos] of the row's sequence are in the cache
// (kv_append_rows first).
void kv_append_rows(const bf16* d_k, const bf16* d_v, int T, int kv_heads, int D, const int* d_row_seq,
                    const int* d_row_pos, bf16* d_k_cache, bf16* d_v_cache, int max_len, cudaStream_t s);
void attention_rows(const bf16* d_q, int T, int heads, int kv_heads, int D, const int* d_row_seq,
                    const int* d_row_pos, const bf16* d_k_cache, const bf16* d_v_cache, int max_len, int window,
                    bf16* d_out, cudaStream_t s);

}  // namespace eplab::gpu
