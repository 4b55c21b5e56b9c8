// Benchmark support (API in bench_support.hpp): a GPU busy-wait, the two kinds of L2 flush, and the queued
// stage split of GpuMoeLayer.
//
// gpu_busy_wait: one thread reads %globaltimer (ns, the same clock on every SM, independent of the SM clock
//   that boosts and throttles) until `us` have passed. It touches no memory, so an L2 flushed before it stays
//   flushed. Used by time_stages_queued: while the GPU spins, the host enqueues the whole forward and the
//   events between its stages, so each stage is then timed as the GPU runs it, not at the pace at which the
//   host launches kernels (at T = 1 the host takes longer to launch a kernel than the GPU takes to run it,
//   and an eager split then times the host).
//
// L2Flusher, read kind: grid-stride 16-byte loads over 2 x L2, xor-folded per thread, one atomicXor per warp
//   into a sink (so the loads are live). Plain loads (allocate in L2, no streaming hint): the point is that the
//   buffer's lines replace whatever was there, and they are clean, so evicting them later costs no write-back.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bench_support.hpp"
#include "cuda_check.hpp"
#include "device_util.cuh"
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
  const std::size_t want = std::size_t(std::max(l2, 1 << 20)) * 2;
  buf_ = DeviceBuffer<uint4>((want + 15) / 16);
  sink_ = DeviceBuffer<unsigned>(1);
  CUDA_CHECK(cudaMemset(buf_.get(), 0x5a, buf_.bytes()));  // defined contents for the read flush
  CUDA_CHECK(cudaMemset(sink_.get(), 0, sink_.bytes()));
  CUDA_CHECK(cudaDeviceSynchronize());
}

void L2Flusher::flush(cudaStream_t s, int salt) {
  if (kind_ == L2FlushKind::None) return;
  if (kind_ == L2FlushKind::Write) {
    CUDA_CHECK(cudaMemsetAsync(buf_.get(), salt & 0xff, buf_.bytes(), s));
    return;
  }
  read_flush_kernel<<<unsigned(gpu::sm_count() * 8), 256, 0, s>>>(buf_.get(), buf_.size(), sink_.get());
  CUDA_CHECK_LAUNCH();
}

// ---- time_stages_queued

namespace {

// The stage events, plus a busy-wait in front of each stretch the host queues: at the start, and after the
// host's wait for the offsets (cuBLAS strategies). A busy-wait that is over before the host has queued
// what follows it is a miss.
class QueuedStages final : public MoeStageEvents {
 public:
  explicit QueuedStages(float spin_us) : spin_us_(spin_us) {
    CUDA_CHECK(cudaEventCreateWithFlags(&spin_end_, cudaEventDisableTiming));
  }
  ~QueuedStages() override {
    if (spin_end_) cudaEventDestroy(spin_end_);
  }
  void boundary(MoeBoundary b, cudaStream_t s) override {
    if (b == kMoeStart) spin(s);
    MoeStageEvents::boundary(b, s);
  }
  void before_host_wait() override { check(); }
  void after_host_wait(cudaStream_t s) override { spin(s); }  // the GEMMs, SwiGLU and combine queue behind it
  // The latest busy-wait must still be running now that the host has queued what follows it.
  void check() {
    const cudaError_t q = cudaEventQuery(spin_end_);
    if (q == cudaSuccess) ++misses;
    else if (q != cudaErrorNotReady) CUDA_CHECK(q);
  }
  int misses = 0;

 private:
  void spin(cudaStream_t s) {
    gpu_busy_wait(s, spin_us_);
    CUDA_CHECK(cudaEventRecord(spin_end_, s));
  }
  float spin_us_;
  cudaEvent_t spin_end_ = nullptr;
};

}  // namespace

QueuedStageTimes time_stages_queued(GpuMoeLayer& layer, const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y,
                                    MoePath path, cudaStream_t stream, float spin_us) {
  require(T >= 0, "time_stages_queued: tokens must be >= 0, got ", T);
  require(spin_us > 0 && spin_us <= 1e5f, "time_stages_queued: busy-wait ", spin_us, " us is outside (0, 100000]");
  QueuedStages q(spin_us);
  layer.forward_device_observed(d_x, T, d_y, path, stream, q);
  if (T == 0) return {};
  q.check();
  QueuedStageTimes r;
  r.router_ms = q.ms(kMoeStart, kMoeRouted);
  r.routing_ms = q.ms(kMoeRouted, kMoeRoutingDone);
  r.permute_ms = q.ms(kMoeRoutingDone, kMoePermuted);
  r.experts_ms = q.ms(kMoeExpertsStart, kMoeExpertsDone);  // from the end of the last busy-wait
  r.combine_ms = q.ms(kMoeExpertsDone, kMoeCombined);
  r.total_ms = r.router_ms + r.routing_ms + r.permute_ms + r.experts_ms + r.combine_ms;
  r.queue_misses = q.misses;
  return r;
}

}  // namespace eplab
