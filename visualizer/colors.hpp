// Colours shared by the panels and by the screenshot checker (png_check.cpp), which looks for them.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

namespace eplab::viz {

struct Rgb {
  std::uint8_t r, g, b;
};

// The heat map's scale: a perceptually ordered dark-purple -> blue -> green -> yellow ramp (anchors
// sampled from matplotlib's viridis), interpolated linearly. v in [0, 1].
inline constexpr std::array<Rgb, 6> kHeatAnchors{{
    {68, 1, 84}, {65, 68, 135}, {42, 120, 142}, {34, 168, 132}, {122, 209, 81}, {253, 231, 37}}};

inline Rgb heat_color(float v) {
  v = std::clamp(v, 0.f, 1.f) * float(kHeatAnchors.size() - 1);
  const int i = std::min(int(v), int(kHeatAnchors.size()) - 2);
  const float f = v - float(i);
  const Rgb a = kHeatAnchors[i], b = kHeatAnchors[i + 1];
  auto mix = [f](std::uint8_t x, std::uint8_t y) { return std::uint8_t(x + (float(y) - float(x)) * f + 0.5f); };
  return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}

// One colour per GPU (cycled past 10), used in the load bars and the experts' owner strip.
inline constexpr std::array<Rgb, 10> kGpuColors{{{78, 121, 167}, {242, 142, 43}, {225, 87, 89}, {118, 183, 178},
                                                 {89, 161, 79}, {237, 201, 72}, {176, 122, 161}, {255, 157, 167},
                                                 {156, 117, 95}, {186, 176, 172}}};
inline Rgb gpu_color(int gpu) { return kGpuColors[std::size_t(gpu) % kGpuColors.size()]; }

// The window background the screenshot checker treats as "nothing drawn".
inline constexpr Rgb kBackground{24, 26, 31};

}  // namespace eplab::viz
