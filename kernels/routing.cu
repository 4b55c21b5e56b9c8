#include "routing.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_check.hpp"
#include "routing_rows.cuh"

namespace eplab::gpu {

namespace {

using namespace routing_detail;
constexpr int kWarpsPerBlock = 8;

template <int VPL>
__global__ void softmax_topk_kernel(const float* __restrict__ logits, int T, int E, int k, int* __restrict__ ids,
                                    float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;  // t is uniform across the warp, so whole warps leave together
  softmax_topk_row<VPL>(logits + size_t(t) * E, E, k, ids + size_t(t) * k, weights + size_t(t) * k, lane);
}

template <int VPL>
__global__ void sparsemixer_kernel(const float* __restrict__ logits, int T, int E, float eps, int* __restrict__ ids,
                                   float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;
  sparsemixer_row<VPL>(logits + size_t(t) * E, E, eps, ids + size_t(t) * 2, weights + size_t(t) * 2, lane);
}

// Small batches: router GEMM and routing in ONE kernel, one block per token (kFusedThreads threads).
// Warp w computes the logits of experts w, w + 32, ... as dot products of x_t with gate rows (16-byte
// loads, all of a lane's loads of a row issued before use), writes them to d_logits and shared memory;
// after one __syncthreads warp 0 routes the token from shared memory. Saves the cuBLAS launch, the
// routing launch and the logits round trip through memory; for T <= ~256 the gate (E*H bf16, 128 KB at
// Phi-tiny) is re-read from L2 by every block, which is cheap next to the expert weights.
constexpr int kFusedThreads = 512;  // up to 16 warps; __launch_bounds__ then allows 128 registers per thread
constexpr int kFusedUnroll = 8;     // 2 x 8 16-byte loads in flight per lane; H = 4096 takes two batches

template <int VPL>
__global__ void __launch_bounds__(kFusedThreads)
    router_route_fused_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ gate, int H,
                              int E, int k, RouterKind kind, float eps, float* __restrict__ logits,
                              int* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float s_logit[];  // [E]
  const int t = int(blockIdx.x);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31, nwarps = int(blockDim.x) >> 5;
  const uint4* xr = reinterpret_cast<const uint4*>(x + size_t(t) * H);
  const int chunks = H / 8;
  for (int e = warp; e < E; e += nwarps) {
    const uint4* gr = reinterpret_cast<const uint4*>(gate + size_t(e) * H);
    float acc = 0.f;
    for (int cb = lane; cb < chunks; cb += 32 * kFusedUnroll) {
      uint4 g[kFusedUnroll], xv[kFusedUnroll];
#pragma unroll
      for (int u = 0; u < kFusedUnroll; ++u) {
        const int c = cb + 32 * u;
        g[u] = c < chunks ? __ldg(gr + c) : make_uint4(0, 0, 0, 0);
        xv[u] = c < chunks ? __ldg(xr + c) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kFusedUnroll; ++u) {
        const unsigned gw[4] = {g[u].x, g[u].y, g[u].z, g[u].w}, xw[4] = {xv[u].x, xv[u].y, xv[u].z, xv[u].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc = fmaf(__uint_as_float(gw[q] << 16), __uint_as_float(xw[q] << 16), acc);
          acc = fmaf(__uint_as_float(gw[q] & 0xffff0000u), __uint_as_float(xw[q] & 0xffff0000u), acc);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) {
      s_logit[e] = acc;
      logits[size_t(t) * E + e] = acc;
    }
  }
  __syncthreads();
  if (warp != 0) return;
  if (kind == RouterKind::SparseMixer)
    sparsemixer_row<VPL>(s_logit, E, eps, ids + size_t(t) * 2, weights + size_t(t) * 2, lane);
  else
    softmax_topk_row<VPL>(s_logit, E, k, ids + size_t(t) * k, weights + size_t(t) * k, lane);
}

template <int VPL>
void launch_fused(const __nv_bfloat16* x, const __nv_bfloat16* gate, int T, int H, int E, int k, RouterKind kind,
                  float eps, float* logits, int* ids, float* w, cudaStream_t s) {
  const int threads = std::clamp(E * 32, 32, kFusedThreads);  // one warp per expert up to 16 experts
  router_route_fused_kernel<VPL><<<unsigned(T), unsigned(threads), size_t(E) * sizeof(float), s>>>(
      x, gate, H, E, k, kind, eps, logits, ids, w);
  CUDA_CHECK_LAUNCH();
}

template <int VPL>
void launch(const float* d_logits, int T, int E, int k, RouterKind kind, float eps, int* d_ids, float* d_w,
            cudaStream_t s) {
  const unsigned blocks = unsigned((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (kind == RouterKind::SparseMixer)
    sparsemixer_kernel<VPL><<<blocks, kWarpsPerBlock * 32, 0, s>>>(d_logits, T, E, eps, d_ids, d_w);
  else
    softmax_topk_kernel<VPL><<<blocks, kWarpsPerBlock * 32, 0, s>>>(d_logits, T, E, k, d_ids, d_w);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void route_topk(const float* d_logits, int T, int E, int k, RouterKind kind, float jitter_eps, int* d_ids,
                float* d_weights, cudaStream_t s) {
  require(T >= 0, "route_topk: tokens must be >= 0, got ", T);
  require(E >= 1 && E <= kMaxRoutingExperts, "route_topk: the routing kernel supports 1..", kMaxRoutingExperts,
          " experts (one warp per token, 8 logits per lane), got ", E);
  if (kind == RouterKind::SparseMixer) {
    require(k == 2, "route_topk: sparsemixer routing needs top-k = 2, got ", k);
    require(E >= 2, "route_topk: sparsemixer needs at least 2 experts, got ", E);
  } else {
    require(k >= 1 && k <= E, "route_topk: top-k (", k, ") must be between 1 and the number of experts (", E, ")");
  }
  if (T == 0) return;
  require(d_logits && d_ids && d_weights, "route_topk: null device pointer");
  if (E <= 32) launch<1>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else if (E <= 64) launch<2>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else if (E <= 128) launch<4>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
  else launch<8>(d_logits, T, E, k, kind, jitter_eps, d_ids, d_weights, s);
}

bool router_route_fused_ok(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int H) {
  auto a16 = [](const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; };
  return H % 8 == 0 && a16(d_x) && a16(d_gate);
}

void router_route_fused(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E, int k,
                        RouterKind kind, float jitter_eps, float* d_logits, int* d_ids, float* d_weights,
                        cudaStream_t s) {
  require(T >= 0, "router_route_fused: tokens must be >= 0, got ", T);
  require(E >= 1 && E <= kMaxRoutingExperts, "router_route_fused: supports 1..", kMaxRoutingExperts,
          " experts, got ", E);
  if (kind == RouterKind::SparseMixer)
    require(k == 2 && E >= 2, "router_route_fused: sparsemixer needs top-k = 2 and >= 2 experts");
  else
    require(k >= 1 && k <= E, "router_route_fused: top-k (", k, ") must be between 1 and the experts (", E, ")");
  if (T == 0) return;
  require(d_x && d_gate && d_logits && d_ids && d_weights, "router_route_fused: null device pointer");
  require(router_route_fused_ok(d_x, d_gate, H),
          "router_route_fused: needs H % 8 == 0 and 16-byte aligned x and gate (use router_logits + route_topk)");
  if (E <= 32) launch_fused<1>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else if (E <= 64) launch_fused<2>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else if (E <= 128) launch_fused<4>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
  else launch_fused<8>(d_x, d_gate, T, H, E, k, kind, jitter_eps, d_logits, d_ids, d_weights, s);
}

}  // namespace eplab::gpu
