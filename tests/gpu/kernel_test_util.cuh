// Small helpers for the kernel tests (routing, dispatch, combine, naive MoE): device buffers that are
// poisoned before every kernel, a non-blocking stream, random inputs, and mismatch reports that say
// exactly which element is wrong.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "model/checkpoint.hpp"
#include "util/bf16.hpp"
#include "util/rng.hpp"

namespace eplab::test {

using bf16 = __nv_bfloat16;

// A device array of n T's (kernels/device_buffer.hpp's DeviceBuffer: upload, download) that can also be
// poisoned. Host data goes through std::vector; bf16 travels as eplab::bf16_bits.
template <typename T>
class DevBuf : public DeviceBuffer<T> {
 public:
  using Base = DeviceBuffer<T>;
  using Base::Base;
  // Every byte 0xFF: NaN for float and bf16, -1 for int. An element a kernel forgets to write fails.
  // The memset runs on the legacy default stream, which the tests' non-blocking streams do not wait for,
  // and it may return before it is done: wait for it here, or a kernel queued next on such a stream can
  // run first and be overwritten (seen as a whole-row mismatch under `ctest -j`, when the GPU is shared).
  void poison() {
    if (!this->size()) return;
    CUDA_CHECK(cudaMemset(this->get(), 0xFF, this->bytes()));
    CUDA_CHECK(cudaDeviceSynchronize());
  }
};

inline bf16* as_bf16(const DevBuf<bf16_bits>& b) { return reinterpret_cast<bf16*>(b.get()); }

// A non-blocking stream: kernels that ignore their stream argument would race with the test's
// synchronisation and show up as failures instead of passing by accident.
class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  operator cudaStream_t() const { return s_; }
  // Waits for the stream and surfaces asynchronous kernel errors (illegal address, ...).
  void sync() const {
    CUDA_CHECK(cudaStreamSynchronize(s_));
    CUDA_CHECK(cudaGetLastError());
  }

 private:
  cudaStream_t s_{};
};

// Poisoning uses cudaMemset on the legacy stream; make sure it is done before work on a non-blocking
// stream starts.
inline void device_sync() { CUDA_CHECK(cudaDeviceSynchronize()); }

inline std::vector<float> random_normal(Rng& rng, size_t n, float scale = 1.f, float offset = 0.f) {
  std::vector<float> v(n);
  for (auto& x : v) x = offset + scale * rng.normal();
  return v;
}

// Random bf16 values and their exact float values (what the GPU sees).
struct Bf16Data {
  std::vector<bf16_bits> bits;
  std::vector<float> f;
};
inline Bf16Data random_bf16(Rng& rng, size_t n, float scale = 1.f) {
  Bf16Data d;
  d.bits.resize(n);
  d.f.resize(n);
  for (size_t i = 0; i < n; ++i) {
    d.bits[i] = float_to_bf16(scale * rng.normal());
    d.f[i] = bf16_to_float(d.bits[i]);
  }
  return d;
}

// Compares two int arrays exactly; on failure returns "<what>: N mismatches, first at i: got g, want w ...".
inline std::string int_mismatches(const char* what, const std::vector<int>& got, const std::vector<int>& want,
                                  size_t* count = nullptr) {
  std::ostringstream os;
  size_t bad = 0;
  if (got.size() != want.size()) {
    os << what << ": size " << got.size() << " vs " << want.size();
    bad = 1;
  } else {
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i] != want[i]) {
        if (bad < 5) os << (bad ? "; " : "") << what << "[" << i << "] got " << got[i] << " want " << want[i];
        ++bad;
      }
    if (bad) os << " (" << bad << " of " << got.size() << " differ)";
  }
  if (count) *count = bad;
  return os.str();
}

// Random bf16 MoE layer weights, every expert: std 1/sqrt(fan_in), so activations stay unit-scale throughout.
inline MoeLayerWeights random_layer(int H, int I, int E, std::uint64_t seed) {
  Rng rng(seed);
  MoeLayerWeights w;
  w.hidden = H, w.inter = I, w.num_experts = E;
  w.expert_ids.resize(size_t(E));
  std::iota(w.expert_ids.begin(), w.expert_ids.end(), 0);
  auto fill = [&](std::vector<bf16_bits>& v, size_t n, float sd) {
    v.resize(n);
    for (auto& b : v) b = float_to_bf16(sd * rng.normal());
  };
  const float sh = 1.f / std::sqrt(float(H)), si = 1.f / std::sqrt(float(I));
  fill(w.gate, size_t(E) * H, sh);
  fill(w.w1, size_t(E) * I * H, sh);
  fill(w.w3, size_t(E) * I * H, sh);
  fill(w.w2, size_t(E) * H * I, si);
  return w;
}

}  // namespace eplab::test
