#include "skewed_tokens.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moe/layer_check.hpp"
#include "util/bf16.hpp"
#include "util/check.hpp"
#include "util/rng.hpp"

namespace eplab {

std::vector<int> pick_hot_experts(int experts, int count, std::uint64_t seed) {
  require(count >= 0 && count <= experts, "--hot ", count, " must be between 0 and the number of experts (", experts,
          ")");
  std::vector<int> ids(experts);
  std::iota(ids.begin(), ids.end(), 0);
  Rng rng(seed * 7919 + 17);
  for (int i = experts - 1; i > 0; --i) std::swap(ids[i], ids[rng.next_u64() % std::uint64_t(i + 1)]);  // shuffle
  ids.resize(count);
  return ids;
}

std::vector<bf16_bits> skewed_tokens(const MoeLayerWeights& w, int T, std::uint64_t seed, const Skew& skew) {
  const int H = w.hidden;
  std::vector<bf16_bits> x = random_activations(T, H, seed);
  if (skew.hot.empty() || skew.strength == 0 || T == 0) return x;
  // Routers often share a common direction (every logit moves with it), so what raises expert e against the
  // others is its gate row minus the mean row. Its unit direction per hot expert, and how likely each is
  // chosen (1, 1/2, 1/3, ...).
  const int E = w.num_experts;
  std::vector<double> mean(H, 0.0);
  for (int e = 0; e < E; ++e)
    for (int c = 0; c < H; ++c) mean[c] += bf16_to_float(w.gate[std::size_t(e) * H + c]) / E;
  std::vector<std::vector<float>> dir;
  std::vector<double> cum;
  double total = 0;
  for (std::size_t i = 0; i < skew.hot.size(); ++i) {
    const int e = skew.hot[i];
    std::vector<float> d(H);
    double norm = 0;
    for (int c = 0; c < H; ++c) {
      d[c] = float(bf16_to_float(w.gate[std::size_t(e) * H + c]) - mean[c]);
      norm += double(d[c]) * d[c];
    }
    const float scale = norm > 0 ? float(skew.strength * std::sqrt(double(H)) / std::sqrt(norm)) : 0.f;
    for (float& v : d) v *= scale;
    dir.push_back(std::move(d));
    cum.push_back(total += 1.0 / double(i + 1));
  }
  Rng rng(seed ^ 0x5EEDull);
  for (int t = 0; t < T; ++t) {
    if (rng.uniform() >= skew.share) continue;
    const double u = rng.uniform() * total;
    const std::size_t h = std::size_t(std::lower_bound(cum.begin(), cum.end(), u) - cum.begin());
    const std::vector<float>& d = dir[std::min(h, dir.size() - 1)];
    for (int c = 0; c < H; ++c) {
      bf16_bits& v = x[std::size_t(t) * H + c];
      v = float_to_bf16(bf16_to_float(v) + d[c]);
    }
  }
  return x;
}

}  // namespace eplab
