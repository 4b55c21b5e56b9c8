#include "rope.cuh"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_check.hpp"
#include "model/phimoe_cpu.hpp"

namespace eplab::gpu {
namespace {

__global__ void rope_kernel(bf16* __restrict__ q, int heads, bf16* __restrict__ k, int kv_heads, int T, int D,
                            int pos0, const int* __restrict__ row_pos, const float* __restrict__ cos_t,
                            const float* __restrict__ sin_t) {
  const int half = D / 2;
  const int all_heads = heads + kv_heads;
  const std::int64_t total = std::int64_t(T) * all_heads * half;
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const int i = int(idx % half);
    const int hh = int((idx / half) % all_heads);
    const int t = int(idx / (std::int64_t(half) * all_heads));
    bf16* v = hh < heads ? q + (std::int64_t(t) * heads + hh) * D
                         : k + (std::int64_t(t) * kv_heads + (hh - heads)) * D;
    const int pos = row_pos ? row_pos[t] : pos0 + t;  // batched rows carry their own position
    const std::int64_t p = std::int64_t(pos) * half + i;
    const float c = cos_t[p], s = sin_t[p];
    const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
    v[i] = __float2bfloat16_rn(a * c - b * s);
    v[i + half] = __float2bfloat16_rn(b * c + a * s);
  }
}

}  // namespace

RopeTable::RopeTable(int len, int head_dim, float theta) : len_(len), d_(head_dim) {
  require(len >= 1 && head_dim >= 2 && head_dim % 2 == 0, "RopeTable: need len >= 1 and an even head_dim, got ",
          len, " and ", head_dim);
  const int half = head_dim / 2;
  std::vector<float> c(std::size_t(len) * half), s(c.size()), cf(head_dim), sf(head_dim);
  for (int p = 0; p < len; ++p) {
    rope_cos_sin(p, head_dim, theta, cf.data(), sf.data());  // the CPU reference's tables, bit for bit
    for (int i = 0; i < half; ++i) {
      c[std::size_t(p) * half + i] = cf[i];
      s[std::size_t(p) * half + i] = sf[i];
    }
  }
  cos_ = DeviceBuffer<float>(c);
  sin_ = DeviceBuffer<float>(s);
}

void rope_inplace(bf16* d_q, int heads, bf16* d_k, int kv_heads, int T, int pos0, const RopeTable& table,
                  cudaStream_t s) {
  require(T >= 0 && heads >= 0 && kv_heads >= 0 && pos0 >= 0, "rope_inplace: bad sizes T ", T, " heads ", heads,
          " kv_heads ", kv_heads, " pos0 ", pos0);
  if (T == 0 || heads + kv_heads == 0) return;
  require((heads == 0 || d_q) && (kv_heads == 0 || d_k), "rope_inplace: null device pointer");
  require(pos0 + T <= table.len(), "rope_inplace: positions up to ", pos0 + T - 1, " but the RoPE table has ",
          table.len(), " (build it with the model's max_position_embeddings)");
  const int D = table.head_dim();
  const std::int64_t total = std::int64_t(T) * (heads + kv_heads) * (D / 2);
  const int threads = 256;
  const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 8192));
  rope_kernel<<<blocks, threads, 0, s>>>(d_q, heads, d_k, kv_heads, T, D, pos0, nullptr, table.cos(), table.sin());
  CUDA_CHECK_LAUNCH();
}

void rope_inplace_rows(bf16* d_q, int heads, bf16* d_k, int kv_heads, int T, const int* d_row_pos,
                       const RopeTable& table, cudaStream_t s) {
  require(T >= 0 && heads >= 0 && kv_heads >= 0, "rope_inplace_rows: bad sizes T ", T, " heads ", heads,
          " kv_heads ", kv_heads);
  if (T == 0 || heads + kv_heads == 0) return;
  require((heads == 0 || d_q) && (kv_heads == 0 || d_k) && d_row_pos, "rope_inplace_rows: null device pointer");
  const int D = table.head_dim();
  const std::int64_t total = std::int64_t(T) * (heads + kv_heads) * (D / 2);
  const int threads = 256;
  const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 8192));
  rope_kernel<<<blocks, threads, 0, s>>>(d_q, heads, d_k, kv_heads, T, D, 0, d_row_pos, table.cos(), table.sin());
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
