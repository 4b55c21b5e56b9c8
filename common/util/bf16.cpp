#include "util/bf16.hpp"

#include <cmath>

namespace eplab {

float f16_to_float(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(mant), -24);                       // subnormal
  else if (exp == 31) v = mant ? NAN : INFINITY;                         // inf / nan
  else v = std::ldexp(float(mant | 0x400), exp - 25);                    // normal
  return sign ? -v : v;
}

std::vector<float> bf16_to_float(std::span<const bf16_bits> in) {
  std::vector<float> out(in.size());
  for (size_t i = 0; i < in.size(); ++i) out[i] = bf16_to_float(in[i]);
  return out;
}

std::vector<bf16_bits> float_to_bf16(std::span<const float> in) {
  std::vector<bf16_bits> out(in.size());
  for (size_t i = 0; i < in.size(); ++i) out[i] = float_to_bf16(in[i]);
  return out;
}

}  // namespace eplab
