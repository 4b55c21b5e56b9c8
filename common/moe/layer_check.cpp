#include "moe/layer_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "util/report.hpp"
#include "util/rng.hpp"

namespace eplab {

std::vector<bf16_bits> random_activations(int T, int H, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<bf16_bits> x(size_t(std::max(T, 0)) * H);
  for (auto& v : x) v = float_to_bf16(rng.normal());
  return x;
}

void print_routing(const Routing& r, int max_tokens) {
  for (int t = 0; t < std::min(r.tokens, max_tokens); ++t) {
    std::string ids, ws;
    for (int j = 0; j < r.k; ++j) {
      ids += strf(j ? ", %d" : "%d", r.id(t, j));
      ws += strf(j ? ", %.2f" : "%.2f", r.weight(t, j));
    }
    std::printf("token %d \u2192 experts [%s] weights [%s]\n", t, ids.c_str(), ws.c_str());
  }
}

std::string LayerCheck::summary() const {
  return strf("ids match on %d/%d tokens (%d near-ties), max multiplier error %.1e, rel-L2 %.2e %s %.1e",
              tokens - id_mismatches - near_ties, tokens, near_ties, weight_max_err, rel_l2,
              rel_l2 <= tolerance ? "<=" : ">", tolerance);
}

LayerCheck check_layer(const MoeRefResult& ref, const Routing& routing, std::span<const float> y, int H,
                       RouterKind router, float jitter_eps, double tolerance) {
  LayerCheck c;
  c.tokens = ref.routing.tokens;
  c.tolerance = tolerance;
  const int k = ref.routing.k, E = c.tokens ? int(ref.logits.size() / c.tokens) : 0;
  std::vector<float> a, b;
  bool shapes_ok = routing.tokens == c.tokens && routing.k == k && y.size() == size_t(c.tokens) * H;
  for (int t = 0; shapes_ok && t < c.tokens; ++t) {
    bool same = true;
    for (int j = 0; j < k; ++j) same &= routing.id(t, j) == ref.routing.id(t, j);
    if (!same) {
      if (routing_margin(router, ref.logits, t, E, jitter_eps) < 1e-5f) ++c.near_ties;
      else ++c.id_mismatches;
      continue;
    }
    for (int j = 0; j < k; ++j)
      c.weight_max_err = std::max(c.weight_max_err, double(std::fabs(routing.weight(t, j) - ref.routing.weight(t, j))));
    a.insert(a.end(), y.begin() + size_t(t) * H, y.begin() + size_t(t + 1) * H);
    b.insert(b.end(), ref.y.begin() + size_t(t) * H, ref.y.begin() + size_t(t + 1) * H);
  }
  c.rel_l2 = shapes_ok ? rel_l2(a, b) : INFINITY;
  c.pass = shapes_ok && c.id_mismatches == 0 && c.near_ties * 100 <= std::max(c.tokens, 1) &&
           c.weight_max_err <= 1e-4 && c.rel_l2 <= tolerance;
  return c;
}

}  // namespace eplab
