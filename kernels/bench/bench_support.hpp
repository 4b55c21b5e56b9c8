// Benchmark support: what the chapters' `--bench` modes and the GPU tests use to time the layers, and nothing
// the layers themselves need. Library eplab_bench (kernels/bench/CMakeLists.txt); only benchmark code and
// gpu_tests link it.
//
//   measure_ceilings    the GPU's measured HBM copy bandwidth and bf16 GEMM throughput ("% of roofline")
//   gpu_busy_wait       a single-thread kernel that spins on the GPU clock
//   L2Flusher           a cold L2 before a timed forward
//   time_stages_queued  GpuMoeLayer's stage split without host launch gaps
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "device_buffer.hpp"
#include "moe_gpu.hpp"

namespace eplab {

// Measured ceilings for "% of roofline" (ceilings.cu says how).
struct Ceilings {
  double hbm_gbps = 0;     // device-to-device copy, (read + write) bytes / time
  double bf16_tflops = 0;  // large cuBLAS bf16 GEMM, fp32 accumulate
};
Ceilings measure_ceilings();

// Spins on the GPU's global timer for `us` microseconds (0..1e6) on stream s: work enqueued behind it is all
// queued before the GPU reaches it.
void gpu_busy_wait(cudaStream_t s, double us);

// A cold L2 before a timed forward: touch a buffer of twice the L2 size.
//   Write: cudaMemsetAsync over it. The L2 is left full of DIRTY lines, so the first misses of the next
//          kernel also pay write-backs to HBM.
//   Read:  a kernel reads it all and folds it into one value. The L2 is left full of CLEAN lines, as after
//          a layer that mostly read weights (what a real model's next layer finds).
//   None:  no flush (a diagnostic, not a model of decoding: the layer's weights may still sit in L2 from the
//          previous forward; the gap to write/read is what the cold caches cost).
enum class L2FlushKind { Write, Read, None };
const char* l2_flush_name(L2FlushKind k);              // "write", "read", "none"
L2FlushKind parse_l2_flush(const std::string& name);  // the names above; throws on anything else
class L2Flusher {
 public:
  explicit L2Flusher(L2FlushKind kind);  // allocates 2 x the current device's L2 (at least 2 MiB)
  L2Flusher(const L2Flusher&) = delete;
  L2Flusher& operator=(const L2Flusher&) = delete;
  void flush(cudaStream_t s, int salt);  // salt: the byte a write flush stores (vary it between calls)
  std::size_t bytes() const { return buf_.bytes(); }
  L2FlushKind kind() const { return kind_; }

 private:
  L2FlushKind kind_;
  DeviceBuffer<uint4> buf_;
  DeviceBuffer<unsigned> sink_;  // the read flush's result, so the loads cannot be optimised away
};

// The stage split of one GpuMoeLayer forward without host launch gaps, x and y on the device. A GPU
// busy-wait of spin_us microseconds is enqueued first, so the host has queued the forward (and the events
// between its stages) before the GPU gets there: the stages are timed back to back as the GPU runs them, not
// at the pace of host launches. The cuBLAS strategies wait on the host for the offsets mid-forward; there a
// second busy-wait is enqueued after that wait and the experts stage is timed from its end, so the split
// leaves out the offsets round trip (the eager GpuMoeLayer::forward(..., true) shows it as offsets_wait_ms,
// 0 here). total_ms is the sum of the stages. The layer's CUDA graphs are not used (events need the kernels
// one by one), nor programmatic dependent launch.
struct QueuedStageTimes : MoeTimings {
  // Busy-waits that were over before the host had queued what follows them (then the split includes host
  // gaps after all: raise the busy-wait). 0 means the split is pure GPU time.
  int queue_misses = 0;
};
QueuedStageTimes time_stages_queued(GpuMoeLayer& layer, const __nv_bfloat16* d_x, int T, __nv_bfloat16* d_y,
                                    MoePath path, cudaStream_t stream, float spin_us = 300.f);

}  // namespace eplab
