// Programmatic dependent launch (PDL, sm_90+): lets a kernel be scheduled while the kernel before it on
// the stream is still running, so its launch latency and its independent prologue (e.g. issuing
// weight loads) overlap the previous kernel. Internal header for .cu files.
//
//   device: pdl_wait()             blocks until every kernel this one depends on has COMPLETED and its
//                                  memory is visible (a no-op when the kernel was launched normally)
//           pdl_launch_dependents() lets the next PDL-launched kernel start once every block of this one
//                                  has called it (or exited); it does not publish memory, pdl_wait does.
//   host:   launch_pdl(pdl, kernel, grid, block, smem, stream, args...)   cudaLaunchKernelEx with the
//                                  programmatic-stream-serialization attribute when pdl is true.
// Stream capture records the programmatic edge into the CUDA graph (CUDA >= 12.3).
#pragma once
#include <cuda_runtime.h>

#include "cuda_check.hpp"

namespace eplab::gpu {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... KArgs, typename... Args>
void launch_pdl(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t s,
                Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...));
}

}  // namespace eplab::gpu
