// Host wall-clock timing and the statistics benchmarks report.
#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

namespace eplab {

class WallTimer {
 public:
  WallTimer() : t0_(std::chrono::steady_clock::now()) {}
  void reset() { t0_ = std::chrono::steady_clock::now(); }
  double ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  std::chrono::steady_clock::time_point t0_;
};

// Median of a sample (copied: the caller's order is kept). Empty input gives 0.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace eplab
