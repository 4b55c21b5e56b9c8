// bfloat16 on the host: the top 16 bits of an IEEE float32, rounded to nearest even.
// Weights and activations travel as bf16 (2 bytes); every CPU computation widens them to float32.
#pragma once
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace eplab {

using bf16_bits = std::uint16_t;  // raw storage; identical bit layout to CUDA's __nv_bfloat16

inline float bf16_to_float(bf16_bits b) {
  std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_bits float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return bf16_bits((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_bits(u >> 16);
}

// IEEE half (F16 in safetensors) to float, for checkpoints stored in fp16.
float f16_to_float(std::uint16_t h);

// Rounds a float to the nearest bf16 value and back: what storing an activation in bf16 does to it.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

std::vector<float> bf16_to_float(std::span<const bf16_bits> in);
std::vector<bf16_bits> float_to_bf16(std::span<const float> in);

}  // namespace eplab
