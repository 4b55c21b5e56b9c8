// Benchmark support (API in moe_gpu.hpp): a GPU busy-wait and the two kinds of L2 flush.
//
// gpu_busy_wait: one thread reads %globaltimer (ns, the same clock on every SM, independent of the SM clock
//   that boosts and throttles) until `us` have passed. It touches no memory, so an L2 flushed before it stays
//   flushed. Used by GpuMoeLayer::time_stages_queued: while the GPU spins, the host enqueues the whole forward
//   and the events between its stages, so each stage is then timed as the GPU runs it, not at the pace at
//   which the host launches kernels (at T = 1 the host takes longer to launch a kernel than the GPU takes to
//   run it, and an eager split then times the host).
//
// L2Flusher, read kind: grid-stride 16-byte loads over 2 x L2, xor-folded per thread, one atomicXor per warp
//   into a sink (so the loads are live). Plain loads (allocate in L2, no streaming hint): the point is that the
//   buffer's lines replace whatever was there, and they are clean, so evicting them later costs no write-back.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.hpp"
#include "moe_gpu.hpp"
#include "util/check.hpp"

namespace eplab {

namespace {

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void busy_wait_kernel(unsigned long long ns) {
  const unsigned long long t0 = global_ns();
  while (global_ns() - t0 < ns) {
  }
}

__global__ void read_flush_kernel(const uint4* __restrict__ p, std::size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) atomicXor(sink, acc);
}

}  // namespace

void gpu_busy_wait(cudaStream_t s, double us) {
  require(us >= 0 && us <= 1e6, "gpu_busy_wait: ", us, " us is outside [0, 1 s]");
  busy_wait_kernel<<<1, 1, 0, s>>>(static_cast<unsigned long long>(us * 1e3));
  CUDA_CHECK_LAUNCH();
}

const char* l2_flush_name(L2FlushKind k) {
  return k == L2FlushKind::Write ? "write" : k == L2FlushKind::Read ? "read" : "none";
}

L2FlushKind parse_l2_flush(const std::string& name) {
  for (L2FlushKind k : {L2FlushKind::Write, L2FlushKind::Read, L2FlushKind::None})
    if (name == l2_flush_name(k)) return k;
  fail("unknown L2 flush kind '", name, "': use write, read or none");
}

L2Flusher::L2Flusher(L2FlushKind kind) : kind_(kind) {
  int dev = 0, l2 = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  bytes_ = std::size_t(std::max(l2, 1 << 20)) * 2;
  bytes_ = (bytes_ + 15) / 16 * 16;
  CUDA_CHECK(cudaMalloc(&buf_, bytes_));
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&sink_), sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(buf_, 0x5a, bytes_));  // defined contents for the read flush
  CUDA_CHECK(cudaMemset(sink_, 0, sizeof(unsigned)));
  CUDA_CHECK(cudaDeviceSynchronize());
}

L2Flusher::~L2Flusher() {
  if (buf_) cudaFree(buf_);
  if (sink_) cudaFree(sink_);
}

void L2Flusher::flush(cudaStream_t s, int salt) {
  if (kind_ == L2FlushKind::None) return;
  if (kind_ == L2FlushKind::Write) {
    CUDA_CHECK(cudaMemsetAsync(buf_, salt & 0xff, bytes_, s));
    return;
  }
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  read_flush_kernel<<<unsigned(std::max(sms, 1) * 8), 256, 0, s>>>(static_cast<const uint4*>(buf_), bytes_ / 16,
                                                                    sink_);
  CUDA_CHECK_LAUNCH();
}

}  // namespace eplab
