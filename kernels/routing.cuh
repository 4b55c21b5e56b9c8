// Routing on the GPU: router logits [T, E] -> for each token k expert ids and k multipliers.
//
// What: the same two routers as the CPU reference (common/moe/routing.{hpp,cpp}), with the same
// semantics decision for decision, so that on identical logits the ids are identical:
//  * SoftmaxTopK (Mixtral): p = softmax(s); the k largest logits (ties -> lowest id) in descending
//    order; weights p_j / sum of the k kept p (renormalised).
//  * SparseMixer (PhiMoE inference, k = 2): e1 = argmax s; w1 = softmax over the logits j that are not
//    masked by (s[e1] - s[j]) / max(|s[j]|, s[e1]) > 2*eps, taken at e1; then s[e1] := -inf,
//    e2 = argmax, w2 = masked softmax of the remaining logits at e2 (the mask again uses the ORIGINAL
//    s[j] in the factor). w1 + w2 != 1 in general.
//  The mask test is computed with explicitly IEEE-rounded fp32 ops (__fsub_rn, __fdiv_rn), exactly as
//  the host computes it, so it cannot flip between CPU and GPU even under --use_fast_math. Sums and
//  exponentials are in double, like the reference, so the weights agree to ~1e-7.
//  Logits are assumed finite (an all -inf row gives NaN weights, as on the CPU).
//
// Thread mapping: one warp per token, 8 tokens per 256-thread block. Lane l holds logits l, l+32,
// l+64, ... in registers (up to 8 each, so E <= 256; larger E is rejected with an error). Every
// argmax is a warp butterfly reduction on (value, id) pairs ordered by "larger value, then lower id",
// which is exactly the host's first-maximum rule. Why: E is 8..256 in practice, so a token's logits fit
// one warp's registers and the whole routing of a token needs no shared memory and no __syncthreads;
// the kernel reads T*E floats once and is latency-bound for small T and bandwidth-bound for large T.
//
// Outputs: d_ids [T, k] int, d_weights [T, k] float (row-major). T = 0 is a no-op.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "model/config.hpp"

namespace eplab::gpu {

constexpr int kMaxRoutingExperts = 256;

// kind SparseMixer requires k = 2 and E >= 2; SoftmaxTopK requires 1 <= k <= E. E <= 256.
// jitter_eps is only used by SparseMixer. Bad arguments throw eplab::Error before anything is launched.
void route_topk(const float* d_logits, int T, int E, int k, RouterKind kind, float jitter_eps, int* d_ids,
                float* d_weights, cudaStream_t s);

// Small batches (decode): router GEMM and routing fused into one kernel, one block per token, logits in
// fp32 (also written to d_logits [T, E]), then the same routing code as route_topk. x [T, H] and
// gate [E, H] bf16. Needs router_route_fused_ok (H % 8 == 0, 16-byte aligned x and gate). Every block
// re-reads the whole gate (from L2), so use it for small T only; GpuMoeLayer does so on its
// weight-stream path.
bool router_route_fused_ok(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int H);
void router_route_fused(const __nv_bfloat16* d_x, const __nv_bfloat16* d_gate, int T, int H, int E, int k,
                        RouterKind kind, float jitter_eps, float* d_logits, int* d_ids, float* d_weights,
                        cudaStream_t s);

}  // namespace eplab::gpu
