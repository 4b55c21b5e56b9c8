// Deterministic random tensors generated on the GPU: benchmarks at Phi-tiny size (88 M expert
// parameters per layer) need no checkpoint and no slow host-side generation + upload.
//
// What: d[i] = bf16(stddev * sqrt(3) * u), u uniform in [-1, 1) from a splitmix64 hash of (seed, i), so
// the values have mean 0 and standard deviation `stddev` (use 1/sqrt(fan_in) for weights, the scale
// at which x·w keeps unit variance). Same seed -> same bits on every GPU and every launch shape.
// Thread mapping: one thread per element, grid-stride loop (coalesced 2-byte stores; a one-off init).
// Uniform rather than normal: no Box-Muller, and a router or expert does not care about the shape of
// the distribution, only its scale.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace eplab::gpu {

void fill_random_bf16(__nv_bfloat16* d, std::size_t n, float stddev, unsigned long long seed, cudaStream_t s);

}  // namespace eplab::gpu
