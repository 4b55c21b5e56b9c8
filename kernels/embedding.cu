#include "embedding.cuh"


#include "cuda_check.hpp"
#include "device_util.cuh"

namespace eplab::gpu {
namespace {

constexpr int kThreads = 128;

__global__ void embedding_kernel(const bf16* __restrict__ table, int V, int H, const int* __restrict__ ids,
                                 bf16* __restrict__ out, int* __restrict__ error) {
  const int t = blockIdx.x;
  const int id = ids[t];
  uint4* dst = reinterpret_cast<uint4*>(out + std::size_t(t) * H);
  const int nvec = H / 8;
  if (id < 0 || id >= V) {
    if (threadIdx.x == 0 && error) atomicCAS(error, 0, t + 1);
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) dst[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint4* src = reinterpret_cast<const uint4*>(table + std::size_t(id) * H);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) dst[i] = __ldg(src + i);
}

}  // namespace

void embedding(const bf16* d_table, int V, int H, const int* d_ids, int T, bf16* d_out, int* d_error,
               cudaStream_t s) {
  require(T >= 0 && V >= 1 && H >= 1, "embedding: bad sizes T ", T, " V ", V, " H ", H);
  if (T == 0) return;
  require(d_table && d_ids && d_out, "embedding: null device pointer");
  require(H % 8 == 0, "embedding: hidden size ", H, " must be a multiple of 8 (16-byte row copies)");
  require(aligned16(d_table) && aligned16(d_out), "embedding: table and output must be 16-byte aligned");
  embedding_kernel<<<T, kThreads, 0, s>>>(d_table, V, H, d_ids, d_out, d_error);
  CUDA_CHECK_LAUNCH();
}

void embedding_check_error(int* d_error, int V, cudaStream_t s) {
  require(d_error != nullptr, "embedding_check_error: null flag");
  int h = 0;
  CUDA_CHECK(cudaMemcpyAsync(&h, d_error, sizeof(int), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  if (h != 0) {
    // Reset the flag and wait for it: a reader on another stream (or a blocking copy) must see 0 next.
    CUDA_CHECK(cudaMemsetAsync(d_error, 0, sizeof(int), s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    fail("embedding: token row ", h - 1, " has an id outside the vocabulary [0, ", V,
         "): check the tokenizer and the model's vocab_size");
  }
}

}  // namespace eplab::gpu
