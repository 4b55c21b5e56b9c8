#include "linear.cuh"

#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda_check.hpp"

namespace eplab::gpu {
namespace {

template <typename Out>
__global__ void bias_broadcast_kernel(const bf16* __restrict__ b, std::int64_t total, int N, Out* __restrict__ y) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if constexpr (sizeof(Out) == 4)
      y[i] = __bfloat162float(b[i % N]);
    else
      y[i] = b[i % N];
  }
}

#define LT_CHECK(call)                                                                            \
  do {                                                                                            \
    const cublasStatus_t st_ = (call);                                                            \
    require(st_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt: ", #call, " failed with status ", int(st_)); \
  } while (0)

// One cached cuBLASLt plan for y[T, N] (bf16) = x[T, K] W[N, K]^T + b, per device.
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<std::tuple<int, int, int>, LtPlan> plans;  // (T, K, N): one per row count seen; never freed
};
constexpr std::size_t kLtWorkspace = 32u << 20;

LtPlan& lt_plan(int T, int K, int N, LtDevice*& dev_out) {
  static std::mutex mu;
  static std::map<int, LtDevice> devices;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  LtDevice& d = devices[device];
  if (!d.handle) {
    LT_CHECK(cublasLtCreate(&d.handle));
    CUDA_CHECK(cudaMalloc(&d.workspace, kLtWorkspace));
  }
  dev_out = &d;
  if (auto it = d.plans.find({T, K, N}); it != d.plans.end()) return it->second;
  // Built in full before it goes into the cache, so a failure here leaves no half-made plan behind.
  LtPlan p;
  LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
  const cudaDataType_t bias_type = CUDA_R_16BF;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
  // Column-major views: A = W as [K, N] (ld K, transposed by the op), B = x as [K, T], C = D = y as [N, T].
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, K, N, K));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, K, T, K));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, N, T, N));
  cublasLtMatmulPreference_t pref = nullptr;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const std::size_t ws = kLtWorkspace;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  // The bias pointer is set per call; the heuristic needs one set to see the epilogue's alignment: any
  // 16-byte aligned address will do (the workspace's).
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &d.workspace, sizeof(void*)));
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(d.handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  require(found > 0, "linear: cuBLASLt has no bf16 GEMM with a bias epilogue for T ", T, " K ", K, " N ", N);
  p.algo = result.algo;
  return d.plans.emplace(std::make_tuple(T, K, N), p).first->second;
}

// y = bf16(x W^T + b) with the bias added in fp32 by the epilogue (linear.cuh says why).
void linear_bias_lt(const bf16* x, int T, int K, const bf16* w, int N, const bf16* b, bf16* y, cudaStream_t s) {
  LtDevice* d = nullptr;
  LtPlan& p = lt_plan(T, K, N, d);
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b, sizeof(b)));
  const float alpha = 1.f, beta = 0.f;
  LT_CHECK(cublasLtMatmul(d->handle, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, d->workspace,
                          kLtWorkspace, s));
}

template <typename Out>
void run(cublasHandle_t h, const bf16* x, int T, int K, const bf16* w, int N, const bf16* b, Out* y,
         cudaStream_t s, cudaDataType_t ytype, const char* who) {
  require(T >= 0 && K >= 1 && N >= 1, who, ": bad sizes T ", T, " K ", K, " N ", N);
  require(h != nullptr, who, ": cuBLAS handle is null (create one with cublasCreate)");
  if (T == 0) return;
  require(x && w && y, who, ": null device pointer");
  require(static_cast<const void*>(x) != static_cast<const void*>(y), who, ": y must not alias x");
  if constexpr (sizeof(Out) == 2) {
    if (b) return linear_bias_lt(x, T, K, w, N, b, y, s);
  }
  if (b) {
    const std::int64_t total = std::int64_t(T) * N;
    const int threads = 256;
    const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 4096));
    bias_broadcast_kernel<Out><<<blocks, threads, 0, s>>>(b, total, N, y);
    CUDA_CHECK_LAUNCH();
  }
  // Only when it changes: cublasSetStream also resets the handle's workspace to cuBLAS's default pool, which
  // would throw away a workspace the caller set for graph capture (GpuPhimoeModel does).
  cudaStream_t current = nullptr;
  CUBLAS_CHECK(cublasGetStream(h, &current));
  if (current != s) CUBLAS_CHECK(cublasSetStream(h, s));
  cublasPointerMode_t mode;
  CUBLAS_CHECK(cublasGetPointerMode(h, &mode));
  CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  const float alpha = 1.f, beta = b ? 1.f : 0.f;
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/N, /*n=*/T, /*k=*/K, &alpha, w, CUDA_R_16BF,
                            /*lda=*/K, x, CUDA_R_16BF, /*ldb=*/K, &beta, y, ytype, /*ldc=*/N, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
  CUBLAS_CHECK(cublasSetPointerMode(h, mode));
}

}  // namespace

void linear(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b, bf16* d_y,
            cudaStream_t s) {
  run<bf16>(h, d_x, T, K, d_w, N, d_b, d_y, s, CUDA_R_16BF, "linear");
}

void linear_f32(cublasHandle_t h, const bf16* d_x, int T, int K, const bf16* d_w, int N, const bf16* d_b,
                float* d_y, cudaStream_t s) {
  run<float>(h, d_x, T, K, d_w, N, d_b, d_y, s, CUDA_R_32F, "linear_f32");
}

}  // namespace eplab::gpu
