#include "gpu_router.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda_check.hpp"
#include "router.cuh"
#include "routing.cuh"

namespace eplab::viz {

namespace {
// A device buffer that only grows (prompts are short; reallocating on every keystroke is pointless).
struct DevBuf {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  void reserve(std::size_t n) {
    if (n <= bytes) return;
    if (ptr) CUDA_CHECK(cudaFree(ptr));
    ptr = nullptr;
    bytes = 0;
    CUDA_CHECK(cudaMalloc(&ptr, n));
    bytes = n;
  }
  void release() noexcept {
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
  }
};
}  // namespace

struct GpuRouter::Impl {
  int gpu = 0;
  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;
  DevBuf x, gate, logits, ids, weights;
  int gate_key = -1;
  std::size_t gate_elems = 0;
  ~Impl() {
    cudaSetDevice(gpu);
    for (DevBuf* b : {&x, &gate, &logits, &ids, &weights}) b->release();
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }
};

GpuRouter::GpuRouter(int gpu) : p_(std::make_unique<Impl>()) {
  p_->gpu = gpu;
  CUDA_CHECK(cudaSetDevice(gpu));
  CUDA_CHECK(cudaStreamCreateWithFlags(&p_->stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&p_->blas));
}

GpuRouter::~GpuRouter() = default;

void GpuRouter::route(const std::vector<bf16_bits>& x, const std::vector<bf16_bits>& gate, int gate_key, int T,
                      int H, int E, int k, RouterKind kind, float jitter_eps, std::vector<float>& logits,
                      Routing& out) {
  require(x.size() == std::size_t(T) * H && gate.size() == std::size_t(E) * H,
          "GPU routing: x / gate sizes do not match T=", T, ", H=", H, ", E=", E);
  Impl& p = *p_;
  cudaStream_t s = p.stream;
  CUDA_CHECK(cudaSetDevice(p.gpu));
  out = Routing{};
  out.tokens = T;
  out.k = k;
  logits.assign(std::size_t(T) * E, 0.f);
  out.ids.assign(std::size_t(T) * k, 0);
  out.weights.assign(std::size_t(T) * k, 0.f);
  if (T == 0) return;

  static_assert(sizeof(bf16_bits) == sizeof(gpu::bf16), "bf16_bits and __nv_bfloat16 must have the same bits");
  if (p.gate_key != gate_key || p.gate_elems != gate.size()) {
    p.gate_key = -1;  // stays invalid if the copy below throws
    p.gate.reserve(gate.size() * sizeof(bf16_bits));
    CUDA_CHECK(cudaMemcpyAsync(p.gate.ptr, gate.data(), gate.size() * sizeof(bf16_bits), cudaMemcpyHostToDevice, s));
    p.gate_key = gate_key;
    p.gate_elems = gate.size();
  }
  p.x.reserve(x.size() * sizeof(bf16_bits));
  p.logits.reserve(logits.size() * sizeof(float));
  p.ids.reserve(out.ids.size() * sizeof(int));
  p.weights.reserve(out.weights.size() * sizeof(float));
  CUDA_CHECK(cudaMemcpyAsync(p.x.ptr, x.data(), x.size() * sizeof(bf16_bits), cudaMemcpyHostToDevice, s));

  auto* d_logits = static_cast<float*>(p.logits.ptr);
  gpu::router_logits(p.blas, static_cast<const gpu::bf16*>(p.x.ptr), static_cast<const gpu::bf16*>(p.gate.ptr), T,
                     H, E, d_logits, s);
  gpu::route_topk(d_logits, T, E, k, kind, jitter_eps, static_cast<int*>(p.ids.ptr),
                  static_cast<float*>(p.weights.ptr), s);
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaMemcpyAsync(logits.data(), d_logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaMemcpyAsync(out.ids.data(), p.ids.ptr, out.ids.size() * sizeof(int), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaMemcpyAsync(out.weights.data(), p.weights.ptr, out.weights.size() * sizeof(float),
                             cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));  // pageable copies: the host vectors are only valid after this
}

}  // namespace eplab::viz
