// Two small facts about the device that many kernel files need: whether a pointer allows 16-byte vector
// access (the vectorised paths load and store uint4 = 8 bf16), and how many SMs the current GPU has (grids
// of grid-stride kernels and split counts are sized by it).
#pragma once
#include <cstdint>

namespace eplab::gpu {

// True when p may be read or written as 16-byte vectors.
inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Streaming multiprocessors of the current device (at least 1). Asked of the driver once per device,
// then cached: it is called on every forward, where a host round of attribute queries would show at T = 1.
int sm_count();

}  // namespace eplab::gpu
