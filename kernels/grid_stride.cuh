// A grid-stride loop that keeps several loads in flight per thread.
//
// The plain loop (load item i, store it, go to i + stride) has ONE load outstanding per thread: the
// next load is issued only after the store. A copy kernel then moves (threads per SM x 16 bytes) per
// memory latency, which with 1024 threads per SM is about half of what HBM needs to run at full speed
// (Little's law: bandwidth x latency = bytes that must be in flight). The EP engine's permute and combine
// kernels measured ~2 TB/s that way on an H200 (chapter 04 README, "bookkeeping kernels").
//
// grid_stride_unrolled<U> gives each thread U items per step: first all U loads (load(i, got)), then all
// U stores (finish(i, got)). Items keep their grid-stride positions (item base + u * stride), so a warp's
// accesses stay coalesced exactly as in the plain loop; only the order of issue changes.
#pragma once
#include <cstddef>

namespace eplab::gpu {

template <int U, typename Loaded, typename Load, typename Finish>
__device__ __forceinline__ void grid_stride_unrolled(std::size_t total, std::size_t first, std::size_t stride,
                                                     const Load& load, const Finish& finish) {
  for (std::size_t base = first; base < total; base += stride * U) {
    Loaded got[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (const std::size_t i = base + u * stride; i < total) load(i, got[u]);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (const std::size_t i = base + u * stride; i < total) finish(i, got[u]);
  }
}

// One vector copied from src (nullptr: a zero) to dst.
template <typename V>
struct CopyItem {
  V val;
  V* dst;
};

// The usual grid-stride position of this thread over the whole grid.
__device__ __forceinline__ std::size_t grid_first() { return std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ std::size_t grid_stride() { return std::size_t(gridDim.x) * blockDim.x; }

// Copies of `total` vectors: where(i, src, dst) names item i's source (nullptr: write a zero) and its
// destination. U copies in flight per thread.
template <int U, typename V, typename Where>
__device__ __forceinline__ void copy_unrolled(std::size_t total, const Where& where) {
  grid_stride_unrolled<U, CopyItem<V>>(
      total, grid_first(), grid_stride(),
      [&](std::size_t i, CopyItem<V>& c) {
        const V* src = nullptr;
        where(i, src, c.dst);
        c.val = src ? *src : V{};
      },
      [](std::size_t, const CopyItem<V>& c) { *c.dst = c.val; });
}

}  // namespace eplab::gpu
