#include "device.hpp"

#include <cuda_runtime.h>

#include "cuda_check.hpp"
#include "util/report.hpp"

namespace eplab {

void cuda_fail(cudaError_t err, const char* call, const char* file, int line) {
  fail("CUDA call ", call, " failed at ", file, ":", line, ": ", cudaGetErrorString(err),
       err == cudaErrorMemoryAllocation ? " (out of GPU memory: use fewer tokens or a larger GPU)" : "");
}

void cublas_fail(cublasStatus_t st, const char* call, const char* file, int line) {
  fail("cuBLAS call ", call, " failed at ", file, ":", line, ": status ", int(st));
}

int gpu_count(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device found";
  return n;
}

DeviceChoice choose_device(const std::string& flag, int gpu) {
  DeviceChoice c;
  require(flag == "auto" || flag == "gpu" || flag == "cpu", "--device must be auto, gpu or cpu, got '", flag, "'");
  std::string why;
  c.gpu_count = flag == "cpu" ? 0 : gpu_count(&why);
  if (flag == "cpu") {
    c.description = "CPU (--device cpu)";
    return c;
  }
  if (c.gpu_count == 0) {
    require(flag != "gpu", "--device gpu: no usable GPU (", why, "); use --device cpu or auto");
    c.description = "CPU (no GPU: " + why + ")";
    return c;
  }
  require(gpu >= 0 && gpu < c.gpu_count, "GPU ", gpu, " requested but only ", c.gpu_count, " present");
  CUDA_CHECK(cudaSetDevice(gpu));
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, gpu));
  c.backend = Backend::Gpu;
  c.gpu = gpu;
  c.description = strf("%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor, p.multiProcessorCount,
                       double(p.totalGlobalMem) / (1024.0 * 1024 * 1024));
  return c;
}

}  // namespace eplab
