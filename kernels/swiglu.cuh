// Fused SwiGLU: the activation between an expert's two GEMMs.
//
// What: gate_up [rows, 2I] row-major holds a = w1·x in columns [0, I) and b = w3·x in columns [I, 2I)
// (the layout the fused w1|w3 GEMM of grouped_experts writes). Output h [rows, I] bf16:
//     h = bf16( silu(a) * b ),   silu(a) = a / (1 + e^-a)
// SiLU is applied to the w1 branch ONLY (PhiMoE, Mixtral). Putting it on both branches is the classic
// mistake of the course's source documents; the CPU reference and this kernel both do it once.
// Math in fp32 whatever the input type; h is rounded to bf16 once, which is exactly what the reference
// models with round_h_to_bf16 = true.
//
// Thread mapping: one thread per 8 consecutive outputs of a row. It reads a[8] and b[8] with two
// 16-byte loads (bf16 input; four for fp32), writes h[8] with one 16-byte store. Consecutive threads
// take consecutive 8-wide vectors of a row, so every warp touches 512 contiguous bytes of a and of b:
// fully coalesced. Grid-stride loop over rows * I/8 vectors (64-bit indices). When I % 8 != 0 or a
// pointer is not 16-byte aligned, a scalar kernel does one element per thread instead.
// Why: SwiGLU moves 4 bytes in (bf16) and 2 out per output and does ~10 flops, so it is purely
// bandwidth-bound; the only thing that matters is wide, coalesced memory access and one launch.
//
// Two input types: bf16 (what cublasGemmGroupedBatchedEx can write: its bf16-input form only supports a
// bf16 C) and fp32 (for a GEMM that writes fp32, e.g. cublasGemmEx with Ctype = CUDA_R_32F; exercises).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace eplab::gpu {

using bf16 = __nv_bfloat16;

// h[r, i] = bf16(silu(gate_up[r, i]) * gate_up[r, I + i]) for r < rows, i < I. rows = 0 is a no-op.
void swiglu(const bf16* d_gate_up, int rows, int I, bf16* d_h, cudaStream_t s);
void swiglu(const float* d_gate_up, int rows, int I, bf16* d_h, cudaStream_t s);

#ifdef __CUDACC__
// Device helpers shared with the fused small-batch expert kernels (grouped_experts.cu). Names are
// prefixed so they cannot collide with other kernels' helpers in one translation unit.

__device__ __forceinline__ float swiglu_silu(float a) { return a / (1.f + __expf(-a)); }

// 8 bf16 packed in a uint4 (element 0 in the low half of .x) -> 8 floats. bf16 -> fp32 is exact: the
// bf16 bits are the top half of the float.
__device__ __forceinline__ void unpack_bf16x8(const uint4& u, float f[8]) {
  const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = __uint_as_float(w[q] << 16);
    f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
  }
}

// Two floats -> two bf16 (round to nearest even) packed low/high, as unpack_bf16x8 expects them.
__device__ __forceinline__ std::uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&p);
}

// Read-only 16-byte load through the non-coherent (texture) path.
__device__ __forceinline__ uint4 ldg_bf16x8(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
#endif

}  // namespace eplab::gpu
