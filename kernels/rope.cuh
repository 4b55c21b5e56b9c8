// Rotary position embedding (HF's default RoPE, rotate_half convention), in place on q and k.
//
// What: for a head vector v of length D at position p, with c_i = cos(p · f_i), s_i = sin(p · f_i),
// f_i = 1 / theta^(2i / D), i < D/2:
//     v[i]       <- v[i] c_i - v[i + D/2] s_i
//     v[i + D/2] <- v[i + D/2] c_i + v[i] s_i
// (dims i and i + D/2 form a pair: first half / second half, NOT interleaved pairs).
// cos/sin table: built on the host by eplab::rope_cos_sin -- the CPU reference's own function, fp32 angle
// pos · inv_freq exactly as HF forms it -- and uploaded once (RopeTable). So GPU and CPU rotate by
// bit-identical cos/sin; only the final bf16 rounding of q and k differs from the fp32 reference.
// Thread mapping: one thread per (token, head, pair i): it reads v[i] and v[i + D/2], writes both. Query
// and key heads share one launch (a flat index over T · (heads + kv_heads) · D/2). Positions are pos0 + t
// for one sequence, or a per-row position array on the GPU for a batch of sequences (rope_inplace_rows).
// Why: RoPE moves 4 bytes and does ~6 flops per pair; one launch, coalesced over i, is all there is to it
// (a faster model fuses it into the q/k projection epilogue or the attention kernel's q/k loads).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "device_buffer.hpp"

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// cos and sin for positions [0, len), D/2 entries each (entry i and i + D/2 share a frequency), on the GPU.
class RopeTable {
 public:
  RopeTable(int len, int head_dim, float theta);
  int len() const { return len_; }
  int head_dim() const { return d_; }
  const float* cos() const { return cos_.get(); }  // [len, D/2]
  const float* sin() const { return sin_.get(); }  // [len, D/2]

 private:
  int len_ = 0, d_ = 0;
  DeviceBuffer<float> cos_, sin_;
};

// d_q: [T, heads, D], d_k: [T, kv_heads, D] (either may be null with its head count 0), token t at position
// pos0 + t; requires pos0 + T <= table.len() and D == table.head_dim(). T = 0 is a no-op.
void rope_inplace(bf16* d_q, int heads, bf16* d_k, int kv_heads, int T, int pos0, const RopeTable& table,
                  cudaStream_t s);
// The same for rows of several sequences: row t is at position d_row_pos[t] (device array, [T]). The caller
// guarantees 0 <= d_row_pos[t] < table.len() (the positions live on the GPU, so they are not checked here).
void rope_inplace_rows(bf16* d_q, int heads, bf16* d_k, int kv_heads, int T, const int* d_row_pos,
                       const RopeTable& table, cudaStream_t s);

}  // namespace eplab::gpu
