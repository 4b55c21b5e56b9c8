// Token-tiled router GEMM (tensor cores) + routing in one kernel; design in router_tiled.cuh.
#include "router_tiled.cuh"

#include <algorithm>

#include "cuda_check.hpp"
#include "device_util.cuh"
#include "pdl.cuh"
#include "routing.cuh"
#include "routing_rows.cuh"

namespace eplab::gpu {

namespace {

constexpr int kWarps = 4;
constexpr int kTile = kTiledRouterTokens;  // 2 m-tiles of 16 tokens
constexpr int kStepH = 32;                 // H per step: 4 lanes x 8 bf16 per row

// D += A · B for one m16n8k16 tile, bf16 inputs, fp32 accumulators (PTX fragment layout:
// a0 = (row g, k 2c..2c+1), a1 = (row g+8, same k), a2 = (row g, k 2c+8..2c+9), a3 = (row g+8, same k);
// b0 = (k 2c..2c+1, col g), b1 = (k 2c+8..2c+9, col g); g = lane / 4, c = lane % 4).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16-byte read-only load as a volatile asm, so that in program order all loads of a batch come before the
// first mma (also volatile). ptxas may still interleave them (64 registers for E = 16); occupancy (up to 8
// blocks of 4 warps per SM) then keeps the bytes in flight.
__device__ __forceinline__ uint4 ldg_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// NT: n-tiles of 8 experts (E <= 8 NT); U: H steps whose loads are in flight together per lane.
template <int NT, int U>
__global__ void __launch_bounds__(kWarps * 32)
    router_tiled_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ gate, int T, int H,
                        int E, int k, RouterKind kind, float eps, int splits, float* __restrict__ logits,
                        int* __restrict__ ids, float* __restrict__ weights, float* __restrict__ partials,
                        int* __restrict__ counters) {
  constexpr int EC = NT * 8;  // padded expert columns
  constexpr int VPL = EC <= 32 ? 1 : 2;
  __shared__ float s_part[kWarps][kTile][EC];
  __shared__ float s_logit[kTile][EC];
  __shared__ int s_is_last;
  pdl_launch_dependents();  // a PDL-launched successor may get scheduled now; it waits for our completion itself

  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int tile = int(blockIdx.x), split = int(blockIdx.y);
  const int t0 = tile * kTile;
  const int steps = (H + kStepH - 1) / kStepH;
  const int s_beg = int((long long)split * steps / splits), s_end = int((long long)(split + 1) * steps / splits);

  // This lane's rows: token t0 + 16 mt + g (+8), gate rows 8 nt + g. Invalid rows read as zeros.
  const __nv_bfloat16* xrow[2][2];
  bool xok[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int t = t0 + 16 * mt + g + 8 * hf;
      xok[mt][hf] = t < T;
      xrow[mt][hf] = x + std::size_t(xok[mt][hf] ? t : 0) * H;
    }
  const __nv_bfloat16* grow[NT];
  bool gok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int e = 8 * nt + g;
    gok[nt] = e < E;
    grow[nt] = gate + std::size_t(gok[nt] ? e : 0) * H;
  }

  float acc[2][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int s0 = s_beg + warp; s0 < s_end; s0 += kWarps * U) {
    uint4 xa[U][2][2], ga[U][NT];
    // All loads of U steps first (16 B each: U x (4 token rows + NT gate rows) per lane) ...
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int st = s0 + kWarps * u;
      const int h = st * kStepH + 8 * c;
      const bool ok = st < s_end && h < H;  // H % 8 == 0: a vector is wholly inside or outside
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          xa[u][mt][hf] = ok && xok[mt][hf] ? ldg_v4(xrow[mt][hf] + h) : zero;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        ga[u][nt] = ok && gok[nt] ? ldg_v4(grow[nt] + h) : zero;
    }
    // ... then the mmas. The lane's 8 consecutive h of a row feed two mmas: words (x, y) are the mma's
    // k = (2c, 2c+1) and (2c+8, 2c+9) in the first, words (z, w) in the second. A and B use the same
    // h -> k assignment, so each mma still sums over 16 distinct h, each once.
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma_bf16_16816(acc[mt][nt], xa[u][mt][0].x, xa[u][mt][1].x, xa[u][mt][0].y, xa[u][mt][1].y, ga[u][nt].x,
                         ga[u][nt].y);
          mma_bf16_16816(acc[mt][nt], xa[u][mt][0].z, xa[u][mt][1].z, xa[u][mt][0].w, xa[u][mt][1].w, ga[u][nt].z,
                         ga[u][nt].w);
        }
  }

  // Accumulator fragments -> this warp's partial tile (c0, c1: row g, cols 2c, 2c+1; c2, c3: row g+8).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = 16 * mt + g, col = 8 * nt + 2 * c;
      s_part[warp][r][col] = acc[mt][nt][0];
      s_part[warp][r][col + 1] = acc[mt][nt][1];
      s_part[warp][r + 8][col] = acc[mt][nt][2];
      s_part[warp][r + 8][col + 1] = acc[mt][nt][3];
    }
  __syncthreads();
  float* flat = &s_logit[0][0];
  for (int i = tid; i < kTile * EC; i += kWarps * 32) {
    float v = s_part[0][0][i];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v += (&s_part[w][0][0])[i];  // warp order: fixed
    flat[i] = v;
  }

  if (splits > 1) {
    // Publish this split's partial tile; the last block of the tile adds all splits in split order.
    float* mine = partials + (std::size_t(tile) * splits + split) * kTile * EC;
    for (int i = tid; i < kTile * EC; i += kWarps * 32) mine[i] = flat[i];
    __threadfence();
    __syncthreads();
    if (tid == 0) s_is_last = atomicAdd(&counters[tile], 1) == splits - 1;
    __syncthreads();
    if (!s_is_last) return;  // block-uniform
    __threadfence();
    // Sum the splits in split order, 4 logits per thread-step and kBatch splits' loads in flight at once:
    // a load-add-load chain here made every split an L2 round trip in sequence (~12 us at T = 1, 32 splits).
    constexpr int kQuads = kTile * EC / 4, kBatch = 8;
    const float4* all = reinterpret_cast<const float4*>(partials + std::size_t(tile) * splits * kTile * EC);
    for (int q = tid; q < kQuads; q += kWarps * 32) {
      float4 v = __ldcg(all + q);
      for (int sp0 = 1; sp0 < splits; sp0 += kBatch) {
        float4 p[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
          p[j] = sp0 + j < splits ? __ldcg(all + std::size_t(sp0 + j) * kQuads + q) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
          if (sp0 + j < splits) v.x += p[j].x, v.y += p[j].y, v.z += p[j].z, v.w += p[j].w;
      }
      flat[4 * q] = v.x, flat[4 * q + 1] = v.y, flat[4 * q + 2] = v.z, flat[4 * q + 3] = v.w;
    }
    if (tid == 0) counters[tile] = 0;  // ready for the next launch (graph replays included)
  }
  __syncthreads();

  for (int i = tid; i < kTile * E; i += kWarps * 32) {
    const int r = i / E, e = i - r * E, t = t0 + r;
    if (t < T) logits[std::size_t(t) * E + e] = s_logit[r][e];
  }
  for (int r = warp; r < kTile; r += kWarps) {
    const int t = t0 + r;
    if (t >= T) break;  // warp-uniform
    if (kind == RouterKind::SparseMixer)
      routing_detail::sparsemixer_row<VPL>(&s_logit[r][0], E, eps, ids + std::size_t(t) * 2,
                                           weights + std::size_t(t) * 2, lane);
    else
      routing_detail::softmax_topk_row<VPL>(&s_logit[r][0], E, k, ids + std::size_t(t) * k,
                                            weights + std::size_t(t) * k, lane);
  }
}

int padded_experts(int E) { return E <= 8 ? 8 : E <= 16 ? 16 : E <= 32 ? 32 : 64; }

int max_splits(int H) { return std::max(1, ((H + kStepH - 1) / kStepH) / kWarps); }

int resolve_splits(int T, int H, int splits) {
  return splits <= 0 ? router_tiled_auto_splits(T, H) : std::clamp(splits, 1, max_splits(H));
}

template <int NT>
void launch_tiled(const __nv_bfloat16* x, const __nv_bfloat16* gate, int T, int H, int E, int k, RouterKind kind,
                  float eps, int splits, float* logits, int* ids, float* w, TiledRouterWorkspace& ws, cudaStream_t s) {
  constexpr int U = NT >= 4 ? 2 : 4;
  const dim3 grid(unsigned((T + kTile - 1) / kTile), unsigned(splits));
  router_tiled_kernel<NT, U><<<grid, kWarps * 32, 0, s>>>(x, gate, T, H, E, k, kind, eps, splits, logits, ids, w,
                                                          ws.partials.get(), ws.counters.get());
  CUDA_CHECK_LAUNCH();
}

}  // namespace

bool router_route_tiled_ok(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int H, int E) {
  return H >= 8 && H % 8 == 0 && E >= 1 && E <= kTiledRouterMaxExperts && aligned16(d_x) && aligned16(d_gate);
}

int router_tiled_auto_splits(int T, int H) {
  if (T <= 0) return 1;
  // ~3 blocks per SM, but every warp keeps at least kAutoMinSteps steps: more, thinner splits only add partial
  // tiles to the last block's sum. Measured at T = 1, H = 4096 on an H200 (whole layer, splits forced):
  // 4 splits 0.0335 ms, 8 0.0308-0.0312, 16 0.0302, 32 0.0308.
  constexpr int kAutoMinSteps = 2;
  const long long tiles = (T + kTile - 1) / kTile, want = 3LL * sm_count();
  const int cap = std::max(1, ((H + kStepH - 1) / kStepH) / (kWarps * kAutoMinSteps));
  return int(std::clamp<long long>((want + tiles - 1) / tiles, 1, std::min(cap, max_splits(H))));
}

void reserve_router_tiled(TiledRouterWorkspace& ws, int T, int H, int E, int splits) {
  require(T >= 0 && H >= 1 && E >= 1, "reserve_router_tiled: bad shape T=", T, " H=", H, " E=", E);
  splits = resolve_splits(T, H, splits);
  if (T == 0 || splits == 1) return;
  const std::size_t tiles = std::size_t((T + kTile - 1) / kTile);
  const std::size_t need_p = tiles * splits * kTile * padded_experts(E);
  if (need_p > ws.partials.size()) {
    ws.partials.grow(need_p);
    ++ws.generation;
  }
  if (tiles > ws.counters.size()) {
    ws.counters.grow(tiles);
    CUDA_CHECK(cudaMemset(ws.counters.get(), 0, ws.counters.bytes()));  // synchronous w.r.t. later kernels
    ++ws.generation;
  }
}

void router_route_tiled(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E, int k,
                        RouterKind kind, float jitter_eps, float* d_logits, int* d_ids, float* d_weights,
                        TiledRouterWorkspace& ws, cudaStream_t s, int splits) {
  require(T >= 0, "router_route_tiled: tokens must be >= 0, got ", T);
  require(E >= 1 && E <= kTiledRouterMaxExperts, "router_route_tiled: supports 1..", kTiledRouterMaxExperts,
          " experts, got ", E, " (use router_logits + route_topk)");
  if (kind == RouterKind::SparseMixer)
    require(k == 2 && E >= 2, "router_route_tiled: sparsemixer needs top-k = 2 and >= 2 experts");
  else
    require(k >= 1 && k <= E, "router_route_tiled: top-k (", k, ") must be between 1 and the experts (", E, ")");
  if (T == 0) return;
  require(d_x && d_gate && d_logits && d_ids && d_weights, "router_route_tiled: null device pointer");
  require(router_route_tiled_ok(d_x, d_gate, H, E),
          "router_route_tiled: needs H % 8 == 0 and 16-byte aligned x and gate (use router_logits + route_topk)");
  splits = resolve_splits(T, H, splits);
  if (splits > 1) reserve_router_tiled(ws, T, H, E, splits);
  switch (padded_experts(E)) {
    case 8: launch_tiled<1>(d_x, d_gate, T, H, E, k, kind, jitter_eps, splits, d_logits, d_ids, d_weights, ws, s); break;
    case 16: launch_tiled<2>(d_x, d_gate, T, H, E, k, kind, jitter_eps, splits, d_logits, d_ids, d_weights, ws, s); break;
    case 32: launch_tiled<4>(d_x, d_gate, T, H, E, k, kind, jitter_eps, splits, d_logits, d_ids, d_weights, ws, s); break;
    default: launch_tiled<8>(d_x, d_gate, T, H, E, k, kind, jitter_eps, splits, d_logits, d_ids, d_weights, ws, s); break;
  }
}

}  // namespace eplab::gpu
