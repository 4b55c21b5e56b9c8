// The padded expert layout (what and why: padded_layout.cuh).
#include "padded_layout.cuh"

#include <algorithm>
#include <cmath>

#include "bf16_accum.cuh"
#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSmemOffsets = 12288;  // (n + 1) ints in 48 KiB of dynamic shared memory

// Every block: offsets [n+1] into shared memory, and M_pad = max count rounded up to kPadMultiple (the same
// integer formula as padded_rows_per_expert on the host). blockDim.x a multiple of 32.
__device__ int load_offsets_and_mpad(const int* __restrict__ off, int n, int* s_off, int* s_red) {
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, nw = int(blockDim.x) >> 5;
  for (int e = tid; e <= n; e += int(blockDim.x)) s_off[e] = off[e];
  __syncthreads();
  int mx = 0;
  for (int e = tid; e < n; e += int(blockDim.x)) mx = max(mx, s_off[e + 1] - s_off[e]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  if (warp == 0) {
    int v = lane < nw ? s_red[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) s_red[32] = (v + kPadMultiple - 1) / kPadMultiple * kPadMultiple;
  }
  __syncthreads();
  return s_red[32];
}

template <typename V>
__global__ void permute_padded_kernel(const V* __restrict__ x, const int* __restrict__ off,
                                      const int* __restrict__ assignment, int rows, int k, int n, int m_cap,
                                      int per_row, V* __restrict__ xpad) {
  extern __shared__ int s_off[];  // [n + 1]
  __shared__ int s_red[33];
  int mp = load_offsets_and_mpad(off, n, s_off, s_red);
  if (mp > m_cap) mp = 0;  // does not fit: the contiguous layout, as permute_rows writes it
  const std::size_t out_rows = mp ? std::size_t(n) * mp : std::size_t(rows);
  const std::size_t total = out_rows * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t p = i / per_row;
    const int v = int(i - p * per_row);
    int src = int(p);  // contiguous row
    if (mp) {
      const int e = int(p / mp), m = int(p - std::size_t(e) * mp);
      src = m < s_off[e + 1] - s_off[e] ? s_off[e] + m : -1;
    }
    const int a = src >= 0 ? assignment[src] : -1;
    V val{};
    if (a >= 0 && a < rows) val = x[std::size_t(a / k) * per_row + v];
    xpad[i] = val;
  }
}

// The padded row of assignment a (or its contiguous row when m_pad == 0), -1 when it has none.
__device__ __forceinline__ int padded_row(const int* __restrict__ ids, const int* __restrict__ row_of,
                                          const int* __restrict__ off, int m_pad, int n, int ypad_rows,
                                          std::size_t a) {
  const int r = row_of[a];
  if (r < 0) return -1;
  int p = r;
  if (m_pad) {
    const int e = ids[a];
    if (e < 0 || e >= n) return -1;
    p = e * m_pad + (r - __ldg(&off[e]));
  }
  return p < ypad_rows ? p : -1;
}

__global__ void combine_padded_vec8_kernel(const int4* __restrict__ ypad, int ypad_rows, const int* __restrict__ ids,
                                           const int* __restrict__ row_of, const int* __restrict__ off, int m_pad,
                                           const float* __restrict__ weights, int T, int k, int n, int per_row,
                                           int4* __restrict__ y) {
  const std::size_t total = std::size_t(T) * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t t = i / per_row;
    const int v = int(i - t * per_row);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < k; ++j) {
      const std::size_t a = t * k + j;
      const int p = padded_row(ids, row_of, off, m_pad, n, ypad_rows, a);
      if (p < 0) continue;
      accumulate(ypad[std::size_t(p) * per_row + v], weights[a], acc);
    }
    int4 out;
    store(out, acc);
    y[i] = out;
  }
}

__global__ void combine_padded_scalar_kernel(const bf16* __restrict__ ypad, int ypad_rows, const int* __restrict__ ids,
                                             const int* __restrict__ row_of, const int* __restrict__ off, int m_pad,
                                             const float* __restrict__ weights, int T, int k, int n, int H,
                                             bf16* __restrict__ y) {
  const std::size_t total = std::size_t(T) * H;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t t = i / H;
    const int c = int(i - t * H);
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const std::size_t a = t * k + j;
      const int p = padded_row(ids, row_of, off, m_pad, n, ypad_rows, a);
      if (p < 0) continue;
      acc += weights[a] * __bfloat162float(ypad[std::size_t(p) * H + c]);
    }
    y[i] = __float2bfloat16_rn(acc);
  }
}

template <typename V>
__global__ void pad_kernel(const V* __restrict__ xp, const int* __restrict__ off, int n, int m_pad, int per_row,
                           V* __restrict__ xpad) {
  extern __shared__ int s_off[];  // [n + 1]
  for (int e = int(threadIdx.x); e <= n; e += int(blockDim.x)) s_off[e] = off[e];
  __syncthreads();
  const std::size_t total = std::size_t(n) * m_pad * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t p = i / per_row;
    const int v = int(i - p * per_row);
    const int e = int(p / m_pad), m = int(p - std::size_t(e) * m_pad);
    V val{};
    if (m < s_off[e + 1] - s_off[e]) val = xp[std::size_t(s_off[e] + m) * per_row + v];
    xpad[i] = val;
  }
}

template <typename V>
__global__ void unpad_kernel(const V* __restrict__ ypad, const int* __restrict__ off, int n, int m_pad, int rows,
                             int per_row, V* __restrict__ yp) {
  extern __shared__ int s_off[];  // [n + 1]
  for (int e = int(threadIdx.x); e <= n; e += int(blockDim.x)) s_off[e] = off[e];
  __syncthreads();
  const std::size_t total = std::size_t(rows) * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const int r = int(i / per_row);
    const int v = int(i - std::size_t(r) * per_row);
    // The expert that owns contiguous row r: the last e with off[e] <= r (empty experts share their offset
    // with the next one, and the search lands past them).
    int lo = 0, hi = n;  // invariant: off[lo] <= r < off[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (s_off[mid] <= r) lo = mid;
      else hi = mid;
    }
    yp[i] = ypad[(std::size_t(lo) * m_pad + (r - s_off[lo])) * per_row + v];
  }
}

// Grid-stride launches: enough blocks to fill the GPU a few times over, never more than the work needs.
unsigned grid_for(std::size_t work) {
  const std::size_t need = (work + kThreads - 1) / kThreads;
  return unsigned(std::clamp<std::size_t>(need, 1, std::size_t(sm_count()) * 16));
}

void check_n(const char* what, int n) {
  require(n >= 1 && n + 1 <= kMaxSmemOffsets, what, ": expert count ", n, " outside [1, ", kMaxSmemOffsets - 1, "]");
}

std::size_t smem_offsets(int n) { return std::size_t(n + 1) * sizeof(int); }

}  // namespace

int padded_rows_per_expert(const int* h_offsets, int n) {
  int mx = 0;
  for (int e = 0; e < n; ++e) mx = std::max(mx, h_offsets[e + 1] - h_offsets[e]);
  return (mx + kPadMultiple - 1) / kPadMultiple * kPadMultiple;
}

int padded_capacity_per_expert(float ratio, int n, int rows) {
  require(ratio >= 1.f, "padded_capacity_per_expert: ratio must be >= 1, got ", ratio);
  require(n >= 1 && rows >= 0, "padded_capacity_per_expert: need n >= 1 and rows >= 0, got ", n, " and ", rows);
  const long long want = static_cast<long long>(std::ceil(double(ratio) * double(rows) / double(n)));
  const long long m = (want + kPadMultiple - 1) / kPadMultiple * kPadMultiple;
  require(m * n < (1LL << 31), "padded_capacity_per_expert: ", n, " x ", m, " padded rows overflow int");
  return int(std::max<long long>(m, kPadMultiple));
}

void permute_rows_padded(const bf16* d_x, const int* d_offsets, const int* d_assignment, int T, int k, int n,
                         int m_cap, int H, bf16* d_xpad, cudaStream_t s) {
  require(T >= 0 && k >= 1 && H >= 1 && m_cap >= kPadMultiple, "permute_rows_padded: need T >= 0, k >= 1, H >= 1,",
          " m_cap >= ", kPadMultiple, " (got ", T, ", ", k, ", ", H, ", ", m_cap, ")");
  check_n("permute_rows_padded", n);
  const int rows = T * k;
  if (rows == 0) return;
  require(d_x && d_offsets && d_assignment && d_xpad, "permute_rows_padded: null device pointer");
  const std::size_t cap_rows = std::max<std::size_t>(std::size_t(rows), std::size_t(n) * m_cap);
  if (H % 8 == 0 && aligned16(d_x) && aligned16(d_xpad)) {
    const int per_row = H / 8;
    permute_padded_kernel<int4><<<grid_for(cap_rows * per_row), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const int4*>(d_x), d_offsets, d_assignment, rows, k, n, m_cap, per_row,
        reinterpret_cast<int4*>(d_xpad));
  } else {
    permute_padded_kernel<unsigned short><<<grid_for(cap_rows * H), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const unsigned short*>(d_x), d_offsets, d_assignment, rows, k, n, m_cap, H,
        reinterpret_cast<unsigned short*>(d_xpad));
  }
  CUDA_CHECK_LAUNCH();
}

void unpermute_combine_padded(const bf16* d_ypad, int ypad_rows, const int* d_ids, const int* d_row_of,
                              const int* d_offsets, int m_pad, const float* d_weights, int T, int k, int n, int H,
                              bf16* d_y, cudaStream_t s) {
  require(T >= 0 && k >= 1 && H >= 1 && n >= 1 && m_pad >= 0 && ypad_rows >= 0,
          "unpermute_combine_padded: bad arguments T=", T, " k=", k, " H=", H, " n=", n, " m_pad=", m_pad,
          " ypad_rows=", ypad_rows);
  if (T == 0) return;
  require(d_ypad && d_ids && d_row_of && d_offsets && d_weights && d_y, "unpermute_combine_padded: null device pointer");
  if (H % 8 == 0 && aligned16(d_ypad) && aligned16(d_y)) {
    const int per_row = H / 8;
    combine_padded_vec8_kernel<<<grid_for(std::size_t(T) * per_row), kThreads, 0, s>>>(
        reinterpret_cast<const int4*>(d_ypad), ypad_rows, d_ids, d_row_of, d_offsets, m_pad, d_weights, T, k, n,
        per_row, reinterpret_cast<int4*>(d_y));
  } else {
    combine_padded_scalar_kernel<<<grid_for(std::size_t(T) * H), kThreads, 0, s>>>(
        d_ypad, ypad_rows, d_ids, d_row_of, d_offsets, m_pad, d_weights, T, k, n, H, d_y);
  }
  CUDA_CHECK_LAUNCH();
}

void pad_rows(const bf16* d_xp, const int* d_offsets, int n, int m_pad, int H, bf16* d_xpad, cudaStream_t s) {
  check_n("pad_rows", n);
  require(m_pad >= 0 && H >= 1, "pad_rows: need m_pad >= 0 and H >= 1, got ", m_pad, " and ", H);
  if (m_pad == 0) return;
  require(d_xp && d_offsets && d_xpad, "pad_rows: null device pointer");
  const std::size_t prow = std::size_t(n) * m_pad;
  if (H % 8 == 0 && aligned16(d_xp) && aligned16(d_xpad)) {
    const int per_row = H / 8;
    pad_kernel<int4><<<grid_for(prow * per_row), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const int4*>(d_xp), d_offsets, n, m_pad, per_row, reinterpret_cast<int4*>(d_xpad));
  } else {
    pad_kernel<unsigned short><<<grid_for(prow * H), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const unsigned short*>(d_xp), d_offsets, n, m_pad, H,
        reinterpret_cast<unsigned short*>(d_xpad));
  }
  CUDA_CHECK_LAUNCH();
}

void unpad_rows(const bf16* d_ypad, const int* d_offsets, int n, int m_pad, int rows, int H, bf16* d_yp,
                cudaStream_t s) {
  check_n("unpad_rows", n);
  require(m_pad >= 0 && rows >= 0 && H >= 1, "unpad_rows: need m_pad >= 0, rows >= 0, H >= 1, got ", m_pad, ", ",
          rows, ", ", H);
  if (rows == 0) return;
  require(m_pad > 0, "unpad_rows: ", rows, " rows but m_pad = 0");
  require(d_ypad && d_offsets && d_yp, "unpad_rows: null device pointer");
  if (H % 8 == 0 && aligned16(d_ypad) && aligned16(d_yp)) {
    const int per_row = H / 8;
    unpad_kernel<int4><<<grid_for(std::size_t(rows) * per_row), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const int4*>(d_ypad), d_offsets, n, m_pad, rows, per_row, reinterpret_cast<int4*>(d_yp));
  } else {
    unpad_kernel<unsigned short><<<grid_for(std::size_t(rows) * H), kThreads, smem_offsets(n), s>>>(
        reinterpret_cast<const unsigned short*>(d_ypad), d_offsets, n, m_pad, rows, H,
        reinterpret_cast<unsigned short*>(d_yp));
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab::gpu
