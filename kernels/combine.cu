// The combine of every MoE path (combine.cuh): one kernel family for chapter 02's layer and the EP engine.
#include "combine.cuh"

#include <algorithm>
#include <cstdint>

#include "bf16_accum.cuh"
#include "cuda_check.hpp"
#include "device_util.cuh"
#include "grid_stride.cuh"
#include "moe/ep_pieces.hpp"

namespace eplab::gpu {

namespace {

// Vectors in flight per thread (grid_stride.cuh): the k rows of 2 tokens.
constexpr int kCombineUnroll = 2;

// Vector v of token t's combined row, Σ_j w[t,j] · row(row_of[t*k+j]), in two phases so that a thread can
// have several tokens' loads in flight (kernels/grid_stride.cuh): combine_load reads the k rows and
// weights, combine_sum adds them in fp32 in the order j = 0..k-1 and rounds once. Rows in [lo, hi) are
// this rank's own (read from `own`), the others came back (`returned`); invalid rows add nothing.
// K = top-k when the host knows it at compile time (2 for Phi-tiny); K = 0 for any other k: then
// combine_load only notes (t, v) and combine_sum loads and adds one row after the other. Both do the same
// arithmetic in the same order, so every K gives the same bits.
struct CombineArgs {
  const int* row_of;
  const float* weights;
  int k, per_row, lo, hi, rows;
};

template <typename V, int K>
struct CombineLoads {
  V q[K > 0 ? K : 1];
  float w[K > 0 ? K : 1];
  unsigned valid;  // K > 0: bit j set when row j exists
  int t, v;        // K == 0: which vector combine_sum works on
};

template <typename V>
__device__ __forceinline__ bool combine_row(const V* __restrict__ own, const V* __restrict__ returned,
                                            const CombineArgs& a, int t, int v, int j, V& q, float& w) {
  const int r = a.row_of[std::size_t(t) * a.k + j];
  w = a.weights[std::size_t(t) * a.k + j];
  if (r < 0 || r >= a.rows) return false;
  q = (r >= a.lo && r < a.hi) ? own[std::size_t(r - a.lo) * a.per_row + v] : returned[std::size_t(r) * a.per_row + v];
  return true;
}

template <int K, typename V>
__device__ __forceinline__ void combine_load(const V* __restrict__ own, const V* __restrict__ returned,
                                             const CombineArgs& a, int t, int v, CombineLoads<V, K>& c) {
  c.t = t;
  c.v = v;
  c.valid = 0;
  if constexpr (K > 0) {
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (combine_row(own, returned, a, t, v, j, c.q[j], c.w[j])) c.valid |= 1u << j;
  }
}

template <int K, typename V, int kElems>
__device__ __forceinline__ V combine_sum(const V* __restrict__ own, const V* __restrict__ returned,
                                         const CombineArgs& a, const CombineLoads<V, K>& c) {
  float acc[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
  if constexpr (K > 0) {
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (c.valid >> j & 1u) accumulate(c.q[j], c.w[j], acc);
  } else {
    for (int j = 0; j < a.k; ++j) {
      V q;
      float w;
      if (combine_row(own, returned, a, c.t, c.v, j, q, w)) accumulate(q, w, acc);
    }
  }
  V out;
  store(out, acc);
  return out;
}

// y[t] = Σ_j w[t,j] · row(row_of[t*k+j]), fp32 in the order j = 0..k-1, one rounding: exactly
// unpermute_combine, except that a row r in [lo, hi) (this rank's own, never sent) is read from
// own[r - lo] and every other row from returned[r]. Two tokens' vectors in flight per thread.
template <int K, typename V, int kElems>
__global__ void combine_part_kernel(const V* __restrict__ own, const V* __restrict__ returned, CombineArgs a,
                                    const int* __restrict__ offsets, int lo_slot, int hi_slot, int T,
                                    V* __restrict__ y) {
  a.lo = offsets ? offsets[lo_slot] : 0;  // no offsets: no own rows (every row from `returned`)
  a.hi = offsets ? offsets[hi_slot] : 0;
  grid_stride_unrolled<kCombineUnroll, CombineLoads<V, K>>(
      std::size_t(T) * a.per_row, grid_first(), grid_stride(),
      [&](std::size_t i, CombineLoads<V, K>& c) {
        const int t = int(i / a.per_row), v = int(i - std::size_t(t) * a.per_row);
        combine_load<K>(own, returned, a, t, v, c);
      },
      [&](std::size_t i, const CombineLoads<V, K>& c) { y[i] = combine_sum<K, V, kElems>(own, returned, a, c); });
}

// The chunked pipeline's class of token t: -1 when none of its rows left this rank (own or invalid rows
// only: it needs nothing from the return exchange), else the last return piece it waits for: the largest
// piece_containing() over its rows that went to peers (a row r in peer p's block [a, a + cnt) of the send
// buffer, a = offsets[rank_slot[p]], comes back in piece piece_containing(cnt, r - a, C)).
__device__ __forceinline__ int combine_class(const CombineArgs& a, int t, const int* __restrict__ offsets,
                                             const int* __restrict__ rank_slot, int N, int C) {
  int last = -1;
  for (int j = 0; j < a.k; ++j) {
    const int r = a.row_of[std::size_t(t) * a.k + j];
    if (r < 0 || r >= a.rows || (r >= a.lo && r < a.hi)) continue;
    for (int p = 0; p < N; ++p) {
      const int b0 = offsets[rank_slot[p]], b1 = offsets[rank_slot[p + 1]];
      if (r < b0 || r >= b1) continue;  // (this rank's own block [lo, hi) was skipped above)
      last = max(last, piece_containing(b1 - b0, r - b0, C));
      break;
    }
  }
  return last;
}

// combine_part_kernel for one class of tokens (the chunked pipeline's combine, combine_class above):
// cls = -1, the tokens that need nothing from the return exchange (combined while it runs); cls = c, the
// tokens whose last remote row comes back in return piece c (combined while piece c + 1 travels). A block
// per token (grid-stride over tokens), its threads over the row's vectors, so the class test is a few
// reads per token. The per-element arithmetic is combine_part_kernel's (combine_load / combine_sum): the
// same bits.
template <int K, typename V, int kElems>
__global__ void combine_class_kernel(const V* __restrict__ own, const V* __restrict__ returned, CombineArgs a,
                                     const int* __restrict__ offsets, int lo_slot, int hi_slot, int T,
                                     const int* __restrict__ rank_slot, int N, int C, int cls,
                                     V* __restrict__ y) {
  a.lo = offsets ? offsets[lo_slot] : 0;  // no offsets: no own rows (every row from `returned`)
  a.hi = offsets ? offsets[hi_slot] : 0;
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    if (combine_class(a, t, offsets, rank_slot, N, C) != cls) continue;
    grid_stride_unrolled<kCombineUnroll, CombineLoads<V, K>>(
        std::size_t(a.per_row), threadIdx.x, blockDim.x,
        [&](std::size_t v, CombineLoads<V, K>& c) { combine_load<K>(own, returned, a, t, int(v), c); },
        [&](std::size_t v, const CombineLoads<V, K>& c) {
          y[std::size_t(t) * a.per_row + v] = combine_sum<K, V, kElems>(own, returned, a, c);
        });
  }
}

// Launches the family for one element type V (int4 = 8 bf16 when the rows allow it) and top-k K (2 compiled
// with its loads independent; 0 = any k, the same bits).
template <int K, typename V, int kElems>
void launch(const CombineSources& src, const CombineArgs& a, int T, const CombineClass* cls, bf16* d_y, cudaStream_t s,
            unsigned max_blocks) {
  const V* own = reinterpret_cast<const V*>(src.own ? src.own : src.returned);
  const V* returned = reinterpret_cast<const V*>(src.returned);
  V* y = reinterpret_cast<V*>(d_y);
  const unsigned cap = max_blocks ? max_blocks : (1u << 20);
  if (!cls) {
    const std::size_t work = (std::size_t(T) * a.per_row + kCombineUnroll - 1) / kCombineUnroll;
    const unsigned blocks = unsigned(std::max<std::size_t>(1, std::min<std::size_t>((work + 255) / 256, cap)));
    // without own rows there is no own range, whatever the offsets say (the kernel reads none then)
    combine_part_kernel<K, V, kElems><<<blocks, 256, 0, s>>>(own, returned, a, src.own ? src.d_offsets : nullptr,
                                                             src.lo_slot, src.hi_slot, T, y);
  } else {
    const unsigned blocks = unsigned(std::max<std::size_t>(1, std::min<std::size_t>(T, cap)));
    combine_class_kernel<K, V, kElems><<<blocks, 256, 0, s>>>(own, returned, a, src.d_offsets, src.lo_slot, src.hi_slot,
                                                              T, cls->d_rank_slot, cls->ranks, cls->pieces, cls->cls, y);
  }
}

void combine_any(const CombineSources& src, const int* d_row_of, const float* d_weights, int T, int k, int H,
                 bf16* d_y, const CombineClass* cls, cudaStream_t s, unsigned max_blocks) {
  require(T >= 0 && k >= 1 && H >= 1, "combine: need T >= 0, k >= 1, H >= 1 (got ", T, ", ", k, ", ", H, ")");
  require(std::int64_t(T) * k <= (std::int64_t(1) << 30), "combine: T*k too large");
  if (T == 0) return;
  require(src.returned && d_row_of && d_weights && d_y, "combine: null device pointer");
  require(src.own == nullptr || src.d_offsets != nullptr, "combine: own rows need the offsets that bound them");
  const bool vec = H % 8 == 0 && aligned16(d_y) && aligned16(src.returned) && (!src.own || aligned16(src.own));
  const CombineArgs a{d_row_of, d_weights, k, vec ? H / 8 : H, 0, 0, T * k};
  if (vec && k == 2) launch<2, int4, 8>(src, a, T, cls, d_y, s, max_blocks);
  else if (vec) launch<0, int4, 8>(src, a, T, cls, d_y, s, max_blocks);
  else if (k == 2) launch<2, bf16, 1>(src, a, T, cls, d_y, s, max_blocks);
  else launch<0, bf16, 1>(src, a, T, cls, d_y, s, max_blocks);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void combine_rows(const CombineSources& src, const int* d_row_of, const float* d_weights, int T, int k, int H,
                  bf16* d_y, cudaStream_t s, unsigned max_blocks) {
  combine_any(src, d_row_of, d_weights, T, k, H, d_y, nullptr, s, max_blocks);
}

void combine_rows_class(const CombineSources& src, const int* d_row_of, const float* d_weights, int T, int k, int H,
                        bf16* d_y, const CombineClass& cls, cudaStream_t s, unsigned max_blocks) {
  require(cls.d_rank_slot && src.d_offsets && src.own && cls.ranks >= 1 && cls.pieces >= 1,
          "combine_rows_class: the pipeline needs the rank blocks (rank_slot, offsets), own rows, ranks >= 1 and pieces >= 1");
  combine_any(src, d_row_of, d_weights, T, k, H, d_y, &cls, s, max_blocks);
}

void unpermute_combine(const bf16* d_yp, const int* d_row_of, const float* d_weights, int T, int k, int H, bf16* d_y,
                       cudaStream_t s) {
  combine_rows(CombineSources{d_yp}, d_row_of, d_weights, T, k, H, d_y, s);
}

}  // namespace eplab::gpu
