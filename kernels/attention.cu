#include "attention.cuh"

#include <cmath>
#include <cstdint>

#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {
namespace {

constexpr int kMaxPerLane = 8;  // D <= 32 * 8 = 256
constexpr int kMaxD = 32 * kMaxPerLane;

// Warps per (token, head) block. Decode launches T * heads blocks only (16 for Phi-tiny at batch 1), so each
// block spreads its keys over 16 warps; prefill launches thousands, which fill the GPU anyway, and there 16
// warps per block only add merge work (measured on an H200, 2048-token prefill of chapter 05: 3777-4007
// tokens/s with 4 warps, 2974 with 16). The switch is by grid size: up to 4 blocks per SM get 16 warps.
// (Batch invariance: the same row gives the same bits only while the grid stays on the same side.)
int warps_for(std::int64_t blocks) {
  return blocks <= 4 * std::int64_t(sm_count()) ? 16 : 4;
}

template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const bf16* __restrict__ q, int heads, int kv_heads, int D, int pos0,
                     const int* __restrict__ row_seq, const int* __restrict__ row_pos, std::int64_t seq_stride,
                     const bf16* __restrict__ kc, const bf16* __restrict__ vc, int window, float scale,
                     bf16* __restrict__ out) {
  const int t = blockIdx.x / heads, h = blockIdx.x % heads;
  const int g = h / (heads / kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // One sequence: position pos0 + t in the one cache. Batched rows: each row names its sequence's cache
  // (seq_stride elements apart) and its position.
  const int p = row_pos ? row_pos[t] : pos0 + t;
  if (row_seq) {
    kc += row_seq[t] * seq_stride;
    vc += row_seq[t] * seq_stride;
  }
  const int lo = window > 0 ? max(0, p - window + 1) : 0;

  // This lane's slice of q (dims lane + 32 i), in fp32.
  const bf16* qr = q + (std::int64_t(t) * heads + h) * D;
  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < D ? __bfloat162float(qr[d]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const std::int64_t row_stride = std::int64_t(kv_heads) * D;
  for (int j = lo + warp; j <= p; j += kWarps) {
    const bf16* kr = kc + j * row_stride + std::int64_t(g) * D;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dot += qv[i] * __bfloat162float(kr[d]);
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float s = dot * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 for the first key (m = -inf)
    const float pj = expf(s - m_new);
    l = l * corr + pj;
    const bf16* vr = vc + j * row_stride + std::int64_t(g) * D;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) acc[i] = acc[i] * corr + pj * __bfloat162float(vr[d]);
    }
    m = m_new;
  }

  // Merge the warps: o = sum_w e^(m_w - M) acc_w / sum_w e^(m_w - M) l_w. A warp that saw no key has
  // m = -inf, l = 0, acc = 0 and drops out (e^-inf = 0); key p itself is always seen, so M is finite.
  __shared__ float sm_m[kWarps], sm_l[kWarps];
  __shared__ float sm_acc[kWarps][kMaxD];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) sm_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float M = sm_m[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) M = fmaxf(M, sm_m[w]);
  float L = 0.f, f[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    f[w] = expf(sm_m[w] - M);
    L += f[w] * sm_l[w];
  }
  const float inv = 1.f / L;
  bf16* orow = out + (std::int64_t(t) * heads + h) * D;
  for (int d = threadIdx.x; d < D; d += kWarps * 32) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += f[w] * sm_acc[w][d];
    orow[d] = __float2bfloat16_rn(o * inv);
  }
}

template <typename... Args>
void launch_attention(int blocks, cudaStream_t s, Args... args) {
  if (warps_for(blocks) == 16)
    attention_kernel<16><<<blocks, 16 * 32, 0, s>>>(args...);
  else
    attention_kernel<4><<<blocks, 4 * 32, 0, s>>>(args...);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void kv_append(const bf16* d_k, const bf16* d_v, int T, int kv_heads, int D, int pos0, bf16* d_k_cache,
               bf16* d_v_cache, int max_len, cudaStream_t s) {
  require(T >= 0 && kv_heads >= 1 && D >= 1 && pos0 >= 0, "kv_append: bad sizes T ", T, " kv_heads ", kv_heads,
          " D ", D, " pos0 ", pos0);
  if (T == 0) return;
  require(d_k && d_v && d_k_cache && d_v_cache, "kv_append: null device pointer");
  require(pos0 + T <= max_len, "kv_append: positions up to ", pos0 + T - 1, " do not fit a KV cache of ", max_len,
          " rows (the sequence is longer than the cache: allocate max_position_embeddings rows)");
  const std::size_t row = std::size_t(kv_heads) * D;
  const std::size_t bytes = std::size_t(T) * row * sizeof(bf16);
  CUDA_CHECK(cudaMemcpyAsync(d_k_cache + std::size_t(pos0) * row, d_k, bytes, cudaMemcpyDeviceToDevice, s));
  CUDA_CHECK(cudaMemcpyAsync(d_v_cache + std::size_t(pos0) * row, d_v, bytes, cudaMemcpyDeviceToDevice, s));
}

void attention(const bf16* d_q, int T, int heads, int kv_heads, int D, int pos0, const bf16* d_k_cache,
               const bf16* d_v_cache, int max_len, int window, bf16* d_out, cudaStream_t s) {
  require(T >= 0 && heads >= 1 && kv_heads >= 1 && pos0 >= 0, "attention: bad sizes T ", T, " heads ", heads,
          " kv_heads ", kv_heads, " pos0 ", pos0);
  if (T == 0) return;
  require(d_q && d_k_cache && d_v_cache && d_out, "attention: null device pointer");
  require(heads % kv_heads == 0, "attention: heads ", heads, " is not a multiple of kv_heads ", kv_heads);
  require(D >= 2 && D % 2 == 0 && D <= kMaxD, "attention: head_dim ", D, " must be even and <= ", kMaxD);
  require(pos0 + T <= max_len, "attention: positions up to ", pos0 + T - 1, " but the KV cache has ", max_len,
          " rows");
  require(std::int64_t(T) * heads < (std::int64_t(1) << 31), "attention: too many (token, head) pairs");
  const float scale = 1.0f / std::sqrt(float(D));  // as the CPU reference forms it
  launch_attention(T * heads, s, d_q, heads, kv_heads, D, pos0, nullptr, nullptr, 0, d_k_cache, d_v_cache, window,
                   scale, d_out);
}

namespace {
// row t of [T, kv_heads, D] -> row d_row_pos[t] of sequence d_row_seq[t]'s cache
__global__ void kv_append_rows_kernel(const bf16* __restrict__ k, const bf16* __restrict__ v, int T, int row_elems,
                                      const int* __restrict__ row_seq, const int* __restrict__ row_pos, int max_len,
                                      bf16* __restrict__ kc, bf16* __restrict__ vc) {
  const int t = blockIdx.x;
  const std::int64_t dst = (std::int64_t(row_seq[t]) * max_len + row_pos[t]) * row_elems;
  const std::int64_t src = std::int64_t(t) * row_elems;
  for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
    kc[dst + i] = k[src + i];
    vc[dst + i] = v[src + i];
  }
}
}  // namespace

void kv_append_rows(const bf16* d_k, const bf16* d_v, int T, int kv_heads, int D, const int* d_row_seq,
                    const int* d_row_pos, bf16* d_k_cache, bf16* d_v_cache, int max_len, cudaStream_t s) {
  require(T >= 0 && kv_heads >= 1 && D >= 1 && max_len >= 1, "kv_append_rows: bad sizes T ", T, " kv_heads ",
          kv_heads, " D ", D, " max_len ", max_len);
  if (T == 0) return;
  require(d_k && d_v && d_k_cache && d_v_cache && d_row_seq && d_row_pos, "kv_append_rows: null device pointer");
  kv_append_rows_kernel<<<T, 128, 0, s>>>(d_k, d_v, T, kv_heads * D, d_row_seq, d_row_pos, max_len, d_k_cache,
                                          d_v_cache);
  CUDA_CHECK_LAUNCH();
}

void attention_rows(const bf16* d_q, int T, int heads, int kv_heads, int D, const int* d_row_seq,
                    const int* d_row_pos, const bf16* d_k_cache, const bf16* d_v_cache, int max_len, int window,
                    bf16* d_out, cudaStream_t s) {
  require(T >= 0 && heads >= 1 && kv_heads >= 1 && max_len >= 1, "attention_rows: bad sizes T ", T, " heads ", heads,
          " kv_heads ", kv_heads, " max_len ", max_len);
  if (T == 0) return;
  require(d_q && d_k_cache && d_v_cache && d_out && d_row_seq && d_row_pos, "attention_rows: null device pointer");
  require(heads % kv_heads == 0, "attention_rows: heads ", heads, " is not a multiple of kv_heads ", kv_heads);
  require(D >= 2 && D % 2 == 0 && D <= kMaxD, "attention_rows: head_dim ", D, " must be even and <= ", kMaxD);
  require(std::int64_t(T) * heads < (std::int64_t(1) << 31), "attention_rows: too many (token, head) pairs");
  const float scale = 1.0f / std::sqrt(float(D));
  const std::int64_t seq_stride = std::int64_t(max_len) * kv_heads * D;
  launch_attention(T * heads, s, d_q, heads, kv_heads, D, 0, d_row_seq, d_row_pos, seq_stride, d_k_cache, d_v_cache,
                   window, scale, d_out);
}

}  // namespace eplab::gpu
