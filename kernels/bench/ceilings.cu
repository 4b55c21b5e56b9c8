// Measured ceilings for "% of roofline": what this GPU actually sustains, not the datasheet.
//
//  HBM:  cudaMemcpyAsync device-to-device of 1 GiB (less if memory is short), timed with CUDA events,
//        median of 10 after 2 warm-ups. A copy reads and writes every byte, so GB/s = 2 * bytes / time
//        (the convention of bandwidthTest and nvbandwidth for D2D). 1 GiB is ~20x the L2, so L2 hits
//        are noise.
//  GEMM: cublasGemmEx 8192 x 8192 x 8192, bf16 A/B/C, CUBLAS_COMPUTE_32F (the precision the MoE GEMMs
//        use), median of 10 after 3 warm-ups, TFLOP/s = 2 * N^3 / time. Inputs are random (hash init on the
//        GPU), not zeros: tensor cores draw less power on zeros and run at higher clocks, which would
//        overstate the ceiling.
#include <cuda_bf16.h>

#include <algorithm>
#include <vector>

#include "bench_support.hpp"
#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "random_init.cuh"

namespace eplab {

namespace {

// Frees what it holds on scope exit, also when a check throws halfway.
struct Scratch {
  std::vector<DeviceBuffer<unsigned char>> bufs;
  cudaStream_t stream = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  cublasHandle_t blas = nullptr;
  void* alloc(std::size_t bytes) { return bufs.emplace_back(bytes).get(); }
  void release() { bufs.clear(); }
  ~Scratch() {
    release();
    if (blas) cublasDestroy(blas);
    if (a) cudaEventDestroy(a);
    if (b) cudaEventDestroy(b);
    if (stream) cudaStreamDestroy(stream);
  }
};

template <typename Fn>
double median_ms(Scratch& s, int warmup, int reps, Fn&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(s.a, s.stream));
    fn();
    CUDA_CHECK(cudaEventRecord(s.b, s.stream));
    CUDA_CHECK(cudaEventSynchronize(s.b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, s.a, s.b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

}  // namespace

Ceilings measure_ceilings() {
  Ceilings c;
  Scratch s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreate(&s.a));
  CUDA_CHECK(cudaEventCreate(&s.b));

  // HBM copy.
  std::size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  std::size_t bytes = std::size_t(1) << 30;
  while (bytes > (std::size_t(64) << 20) && 2 * bytes + (std::size_t(256) << 20) > free_b) bytes /= 2;
  void* src = s.alloc(bytes);
  void* dst = s.alloc(bytes);
  CUDA_CHECK(cudaMemsetAsync(src, 0x5a, bytes, s.stream));
  const double copy_ms = median_ms(s, 2, 10, [&] {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s.stream));
  });
  c.hbm_gbps = 2.0 * double(bytes) / (copy_ms * 1e-3) / 1e9;
  s.release();

  // bf16 GEMM.
  constexpr int N = 8192;
  const std::size_t elems = std::size_t(N) * N;
  auto* A = static_cast<__nv_bfloat16*>(s.alloc(elems * sizeof(__nv_bfloat16)));
  auto* B = static_cast<__nv_bfloat16*>(s.alloc(elems * sizeof(__nv_bfloat16)));
  auto* C = static_cast<__nv_bfloat16*>(s.alloc(elems * sizeof(__nv_bfloat16)));
  gpu::fill_random_bf16(A, elems, 1.f, 0xA11CEull, s.stream);
  gpu::fill_random_bf16(B, elems, 1.f, 0xB0Bull, s.stream);
  CUBLAS_CHECK(cublasCreate(&s.blas));
  CUBLAS_CHECK(cublasSetStream(s.blas, s.stream));
  const float one = 1.f, zero = 0.f;
  const double gemm_ms = median_ms(s, 3, 10, [&] {
    CUBLAS_CHECK(cublasGemmEx(s.blas, CUBLAS_OP_T, CUBLAS_OP_N, N, N, N, &one, A, CUDA_R_16BF, N, B, CUDA_R_16BF, N,
                              &zero, C, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  c.bf16_tflops = 2.0 * double(N) * N * N / (gemm_ms * 1e-3) / 1e12;
  return c;
}

}  // namespace eplab
