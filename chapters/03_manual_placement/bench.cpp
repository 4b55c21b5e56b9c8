#include "bench.hpp"

#include <cmath>
#include <cstdio>
#include <utility>

#include "hub_gpu.hpp"
#include "moe/layer_check.hpp"
#include "report.hpp"
#include "util/check.hpp"
#include "util/report.hpp"
#include "util/rng.hpp"

namespace eplab::ch03 {

namespace {

// The experts `ids` of a layer that holds all of them (ascending ids), as one device's weights.
MoeLayerWeights take_experts(const MoeLayerWeights& all, const std::vector<int>& ids) {
  MoeLayerWeights w{all.layer, all.hidden, all.inter, all.num_experts, ids, all.gate, {}, {}, {}};
  const size_t IH = size_t(all.inter) * all.hidden;
  for (auto [to, from] : {std::pair{&w.w1, &all.w1}, {&w.w3, &all.w3}, {&w.w2, &all.w2}})
    for (int e : ids) to->insert(to->end(), from->begin() + e * IH, from->begin() + (e + 1) * IH);
  return w;
}

// Random weights of Phi-tiny-MoE's layer shape (nn.Linear's init scale).
MoeLayerWeights phi_tiny_random_layer(std::uint64_t seed) {
  MoeLayerWeights w;
  w.hidden = 4096;
  w.inter = 448;
  w.num_experts = 16;
  for (int e = 0; e < w.num_experts; ++e) w.expert_ids.push_back(e);
  Rng rng(seed);
  auto fill = [&](std::vector<bf16_bits>& v, size_t n, int fan_in) {
    const float a = 1.f / std::sqrt(float(fan_in));
    v.resize(n);
    for (auto& b : v) b = float_to_bf16(rng.uniform(-a, a));
  };
  const size_t E = w.num_experts, H = w.hidden, I = w.inter;
  fill(w.gate, E * H, w.hidden);
  fill(w.w1, E * I * H, w.hidden);
  fill(w.w3, E * I * H, w.hidden);
  fill(w.w2, E * H * I, w.inter);
  return w;
}

}  // namespace

int run_bench(const Options& opt, const DeviceChoice& dev, int N, const std::vector<int>& gpu_of) {
  require(dev.backend == Backend::Gpu, "--bench times the GPU path; no GPU here (", dev.description,
          "). Without --bench the CPU run prints the same time split");
  for (int t : opt.bench_tokens) require(t >= 1, "--bench-tokens must be >= 1, got ", t);
  require(N <= 16, "--gpus ", N, ": the Phi-tiny layer has only 16 experts; use --gpus 16 or fewer");
  std::printf("device: %s, %d GPU(s) present\n", dev.description.c_str(), dev.gpu_count);
  std::printf("--bench: Phi-tiny-MoE layer shape (H=4096, I=448, E=16, top-2 sparsemixer), random bf16 weights\n");
  const MoeLayerWeights all = phi_tiny_random_layer(opt.common.seed);
  const Placement pl(opt.placement, all.num_experts, N);
  print_placement(pl, "GPU");
  std::vector<MoeLayerWeights> dev_w;
  for (int g = 0; g < N; ++g) dev_w.push_back(take_experts(all, pl.experts_of(g)));
  HubGpu hub(all.gate, dev_w, RouterKind::SparseMixer, 2, 0.01f, gpu_of);
  for (const std::string& n : hub.notes()) std::printf("%s\n", n.c_str());

  // The first size is also checked against the CPU reference (small, so the reference is quick).
  Table tab({"T", "route", "plan", "gather", "copy out", "experts", "copy back", "spokes", "combine", "total ms",
             "via GPU 0", "tok/s"});
  nlohmann::json rows = nlohmann::json::array();
  std::string verdict = "not checked";
  bool ok = true;
  for (size_t i = 0; i < opt.bench_tokens.size(); ++i) {
    const int T = opt.bench_tokens[i];
    const std::vector<bf16_bits> x = random_activations(T, all.hidden, opt.common.seed + 1 + i);
    hub.set_input(x, T);
    // Two warm-ups: allocations, cuBLAS heuristics.
    const HubRun run = median_run(2, opt.iters, [&] { return hub.forward(); });
    const HubTimes& t = run.times;
    const double via = double(run.bytes_out() + run.bytes_back());
    tab.add_row({strf("%d", T), strf("%.3f", t.route_ms), strf("%.3f", t.plan_ms),
                 strf("%.3f", slowest(t, &DeviceTimes::gather_ms)), strf("%.3f", slowest(t, &DeviceTimes::copy_out_ms)),
                 strf("%.3f", slowest(t, &DeviceTimes::experts_ms)),
                 strf("%.3f", slowest(t, &DeviceTimes::copy_back_ms)), strf("%.3f", t.spokes_ms),
                 strf("%.3f", t.combine_ms), strf("%.3f", t.total_ms), human_bytes(via),
                 human_count(T / (t.total_ms * 1e-3))});
    rows.push_back(run_json(run, 2, {{"tokens", T}}));
    if (i == 0 && T <= 512) {
      const std::vector<float> xf = bf16_to_float(std::span<const bf16_bits>(x));
      const MoeRefResult ref = moe_layer_reference(all, xf, T, {RouterKind::SparseMixer, 2, 0.01f, true});
      const LayerCheck c =
          check_layer(ref, run.routing, hub.output(), all.hidden, RouterKind::SparseMixer, 0.01f, 1e-2);
      verdict = strf("T=%d %s", T, c.summary().c_str());
      ok = c.pass;
    }
  }
  std::printf("\nmedian of %d runs per size, ms (gather/copy/experts: the slowest GPU)\n", opt.iters);
  tab.print();
  if (!opt.common.json.empty())
    write_json(opt.common.json, {{"chapter", "03_manual_placement"}, {"bench", true}, {"device", dev.description},
                                 {"gpus", N}, {"placement", placement_name(opt.placement)}, {"sizes", rows},
                                 {"check", verdict}});
  if (!ok) {
    std::printf("CHECK FAIL 03_manual_placement --bench: %s\n", verdict.c_str());
    return 1;
  }
  std::printf("CHECK PASS 03_manual_placement --bench: %zu sizes on %d GPUs (%s); %s\n", opt.bench_tokens.size(), N,
              placement_name(opt.placement), verdict.c_str());
  return 0;
}

}  // namespace eplab::ch03
