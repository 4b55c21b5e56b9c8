// Owning arrays of T in CUDA-allocated memory, moved, never copied: DeviceBuffer<T> in GPU memory
// (cudaMalloc) and PinnedBuffer<T> in page-locked host memory (cudaMallocHost, what asynchronous copies and
// CUDA graphs read and write at run time). Every kernel-side owner of memory (the layers' weights and
// scratch, the model's activations, the GPU tests' inputs) uses these two.
//
// A buffer made with n = 0 holds nothing (get() is null). grow(n) is for scratch that follows the largest
// call seen: it reallocates only when n exceeds the size (old contents are lost; the old block is freed
// first, so the peak stays one block) and always leaves at least one element, so callers may pass get() to
// APIs that reject null even for empty work.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "cuda_check.hpp"

namespace eplab {

namespace detail {
struct DeviceMemory {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  static void release(void* p) { cudaFree(p); }  // destructor path: errors (a dead context at exit) ignored
};
struct PinnedMemory {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  static void release(void* p) { cudaFreeHost(p); }
};
}  // namespace detail

template <typename T, typename Memory>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  explicit CudaBuffer(std::size_t n) {
    if (n) allocate(n);
  }
  // A copy of host data (device: a synchronous upload; pinned: a plain copy).
  explicit CudaBuffer(std::span<const T> h) : CudaBuffer(h.size()) { upload(h); }
  explicit CudaBuffer(const std::vector<T>& h) : CudaBuffer(std::span<const T>(h)) {}
  CudaBuffer(CudaBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  CudaBuffer& operator=(CudaBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer() { reset(); }

  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  // At least n elements (at least 1). True when it reallocated, i.e. every pointer taken from get() before
  // (a captured CUDA graph, say) is stale.
  bool grow(std::size_t n) {
    n = std::max<std::size_t>(n, 1);
    if (p_ && n <= n_) return false;
    reset();
    allocate(n);
    return true;
  }
  void reset() {
    if (p_) Memory::release(p_);
    p_ = nullptr;
    n_ = 0;
  }

  // Synchronous copies of exactly size() elements.
  void upload(std::span<const T> h) {
    require(h.size() == n_, "CudaBuffer::upload: ", h.size(), " values for a buffer of ", n_);
    if (n_) CUDA_CHECK(cudaMemcpy(p_, h.data(), bytes(), cudaMemcpyDefault));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_) CUDA_CHECK(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDefault));
    return h;
  }

 private:
  void allocate(std::size_t n) {
    p_ = static_cast<T*>(Memory::allocate(n * sizeof(T)));
    n_ = n;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

template <typename T>
using DeviceBuffer = CudaBuffer<T, detail::DeviceMemory>;
template <typename T>
using PinnedBuffer = CudaBuffer<T, detail::PinnedMemory>;

}  // namespace eplab
