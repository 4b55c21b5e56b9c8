// sm_count (device_util.cuh).
#include "device_util.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "cuda_check.hpp"

namespace eplab::gpu {

int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not asked yet
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable)
    if (const int n = cached[dev].load(std::memory_order_relaxed)) return n;
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (cacheable) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace eplab::gpu
