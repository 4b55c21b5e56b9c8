// Checked CUDA and cuBLAS calls. A failure throws eplab::Error naming the call, the file:line and the
// error string, so the program ends with one clear line instead of silent garbage.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "util/check.hpp"

namespace eplab {

void cuda_fail(cudaError_t err, const char* call, const char* file, int line);
void cublas_fail(cublasStatus_t st, const char* call, const char* file, int line);

}  // namespace eplab

#define CUDA_CHECK(call)                                                          \
  do {                                                                            \
    cudaError_t eplab_err_ = (call);                                              \
    if (eplab_err_ != cudaSuccess) ::eplab::cuda_fail(eplab_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: catches bad launch configurations right away.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(call)                                                        \
  do {                                                                            \
    cublasStatus_t eplab_st_ = (call);                                            \
    if (eplab_st_ != CUBLAS_STATUS_SUCCESS) ::eplab::cublas_fail(eplab_st_, #call, __FILE__, __LINE__); \
  } while (0)
