// The route stage shared by every MoE layer (moe_router.cuh).
#include "moe_router.cuh"

#include "router.cuh"
#include "routing.cuh"

namespace eplab::gpu {

RouterImpl resolve_router(RouterImpl want, const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E) {
  const bool tiled_ok = router_route_tiled_ok(d_x, d_gate, H, E);
  const bool fused_ok = router_route_fused_ok(d_x, d_gate, H);
  switch (want) {
    case RouterImpl::Cublas: return RouterImpl::Cublas;
    case RouterImpl::Fused: return fused_ok ? RouterImpl::Fused : RouterImpl::Cublas;
    case RouterImpl::Tiled: return tiled_ok ? RouterImpl::Tiled : RouterImpl::Cublas;
    case RouterImpl::Auto: break;
  }
  if (tiled_ok) return RouterImpl::Tiled;
  return fused_ok && T <= kFusedRouterMaxT ? RouterImpl::Fused : RouterImpl::Cublas;
}

void reserve_router(TiledRouterWorkspace& rws, const __nv_bfloat16* d_gate, int T, int H, int E) {
  if (router_route_tiled_ok(d_gate, d_gate, H, E)) reserve_router_tiled(rws, T, H, E);
}

RouterImpl route_tokens(RouterImpl want, cublasHandle_t blas, const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate,
                        int T, int H, int E, int k, RouterKind kind, float eps, float* d_logits, int* d_ids,
                        float* d_weights, TiledRouterWorkspace& rws, cudaStream_t s,
                        const std::function<void()>& after_logits) {
  const RouterImpl impl = resolve_router(want, d_x, d_gate, T, H, E);
  switch (impl) {
    case RouterImpl::Tiled:
      router_route_tiled(d_x, d_gate, T, H, E, k, kind, eps, d_logits, d_ids, d_weights, rws, s);
      if (after_logits) after_logits();
      break;
    case RouterImpl::Fused:
      router_route_fused(d_x, d_gate, T, H, E, k, kind, eps, d_logits, d_ids, d_weights, s);
      if (after_logits) after_logits();
      break;
    default:
      router_logits(blas, d_x, d_gate, T, H, E, d_logits, s);
      if (after_logits) after_logits();
      route_topk(d_logits, T, E, k, kind, eps, d_ids, d_weights, s);
  }
  return impl;
}

}  // namespace eplab::gpu
