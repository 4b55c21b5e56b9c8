// The route stage every MoE layer runs, on one GPU or under EP: x [T, H] -> logits [T, E] (fp32), ids and
// multipliers [T, k]. One choice of kernel for every EP size, so a rank of the EP engine routes its rows
// with the same kernels as the single-GPU layer:
//   Tiled   router_route_tiled (router_tiled.cuh): 32-token tiles on tensor cores, routing in the epilogue;
//           wherever it can run the shape (E <= 64, H % 8 == 0, 16-byte aligned x and gate)
//   Fused   router_route_fused (routing.cuh): one block per token, up to kFusedRouterMaxT tokens
//   Cublas  router_logits (cuBLAS) + route_topk: everything else
// RouterImpl (moe_gpu.hpp) forces one (tests cover each kernel); Fused and Tiled fall back to Cublas where
// they cannot run the shape.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <functional>

#include "model/config.hpp"
#include "moe_gpu.hpp"
#include "router_tiled.cuh"

namespace eplab::gpu {

// RouterImpl::Auto where the tiled router cannot run: the fused per-token kernel up to this T, cuBLAS +
// route_topk above. Measured on an H200 (Phi-tiny gate, 16 x 4096), whole layer: T = 512 0.1435 ms fused vs
// 0.1486 ms with cuBLAS + route_topk; T = 4096 0.442 vs 0.383 ms (the fused kernel re-reads the 128 KB gate
// from L2 per token, 512 MB at T = 4096).
constexpr int kFusedRouterMaxT = 512;

// What `want` runs for this shape (never Auto).
RouterImpl resolve_router(RouterImpl want, const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E);

// Grows the tiled router's workspace for T tokens when the tiled router can run (outside captures).
void reserve_router(TiledRouterWorkspace& rws, const __nv_bfloat16* d_gate, int T, int H, int E);

// Enqueues the route stage on s; returns the kernel it ran. after_logits (if set) is called once the logits
// are enqueued: before route_topk on the cuBLAS path; the other kernels route in the same launch.
RouterImpl route_tokens(RouterImpl want, cublasHandle_t blas, const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate,
                        int T, int H, int E, int k, RouterKind kind, float eps, float* d_logits, int* d_ids,
                        float* d_weights, TiledRouterWorkspace& rws, cudaStream_t s,
                        const std::function<void()>& after_logits = {});

}  // namespace eplab::gpu
