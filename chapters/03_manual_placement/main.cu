// Chapter 03: the experts of one MoE layer placed by hand on several GPUs, in one process. GPU 0 is the hub.
//
//   GPU 0: x ─ router GEMM ─ top-k ─► ids, w ──(to host)──► plan: which rows go to which GPU
//   for every GPU g, from its own host thread, on its own streams:
//       GPU 0: gather g's rows ──cudaMemcpyPeerAsync──► GPU g: grouped experts ──cudaMemcpyPeerAsync──► GPU 0
//   GPU 0: wait for all, combine: y[t] = Σ_j w[t,j] · result(t, j)
//
// The placement map (linear: GPU g holds a block of experts; round-robin: expert e on GPU e mod N) is the
// only new idea next to chapter 02; everything else is chapter 02's kernels run on more GPUs. Every row
// leaves GPU 0 and comes back to it, and the combine waits for the slowest GPU: GPU 0 is a hub, and
// chapter 04 removes it.
//
// Without a GPU (or with --device cpu) the same structure runs on N simulated devices: one std::thread
// per device, its own buffers, memcpy for the peer copies, so the lesson runs on a laptop.
//
// Run: 03_manual_placement [--gpus N] [--placement linear|round-robin] [--tokens 64] [--device cpu]
//      03_manual_placement --bench [--gpus N]      GPU: Phi-tiny layer shape, T = 128 .. 16384
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "device.hpp"
#include "hub_cpu.hpp"
#include "hub_gpu.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "moe/placement.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"
#include "util/rng.hpp"
#include "util/timer.hpp"

using namespace eplab;
using namespace eplab::ch03;

namespace {

// --- printing -------------------------------------------------------------------------------------------

void print_placement(const Placement& pl, const char* unit) {
  std::printf("placement %s: %d experts on %d %ss (%s)\n", placement_name(pl.kind()), pl.num_experts(),
              pl.num_ranks(), unit,
              pl.even() ? strf("%d each", pl.num_experts() / pl.num_ranks()).c_str()
                        : strf("uneven: the first %d hold %d, the rest %d", pl.num_experts() % pl.num_ranks(),
                               pl.max_local(), pl.max_local() - 1).c_str());
  for (int g = 0; g < pl.num_ranks(); ++g) {
    std::string ids;
    for (int e : pl.experts_of(g)) ids += strf(" %d", e);
    std::printf("  %s %d: experts%s\n", unit, g, ids.c_str());
  }
  std::string experts = "  expert:", owners = strf("  %-6s:", unit);
  for (int e = 0; e < pl.num_experts(); ++e) {
    experts += strf(" %2d", e);
    owners += strf(" %2d", pl.owner(e));
  }
  std::printf("%s\n%s\n", experts.c_str(), owners.c_str());
}

// Median of every stage over several runs (each stage separately).
HubTimes median_times(const std::vector<HubTimes>& runs) {
  HubTimes m = runs.front();
  auto med = [&](auto get) {
    std::vector<double> v;
    for (const HubTimes& r : runs) v.push_back(get(r));
    return median(v);
  };
  m.route_ms = med([](const HubTimes& r) { return r.route_ms; });
  m.plan_ms = med([](const HubTimes& r) { return r.plan_ms; });
  m.spokes_ms = med([](const HubTimes& r) { return r.spokes_ms; });
  m.combine_ms = med([](const HubTimes& r) { return r.combine_ms; });
  m.total_ms = med([](const HubTimes& r) { return r.total_ms; });
  for (size_t g = 0; g < m.dev.size(); ++g) {
    m.dev[g].gather_ms = med([&](const HubTimes& r) { return r.dev[g].gather_ms; });
    m.dev[g].copy_out_ms = med([&](const HubTimes& r) { return r.dev[g].copy_out_ms; });
    m.dev[g].experts_ms = med([&](const HubTimes& r) { return r.dev[g].experts_ms; });
    m.dev[g].copy_back_ms = med([&](const HubTimes& r) { return r.dev[g].copy_back_ms; });
  }
  return m;
}

double max_over(const HubTimes& t, double DeviceTimes::*f) {
  double m = 0;
  for (const DeviceTimes& d : t.dev) m = std::max(m, d.*f);
  return m;
}

double gbps(double bytes, double ms) { return ms > 0 ? bytes / (ms * 1e6) : 0.0; }

void print_devices(const HubRun& run, const HubTimes& t, int k, const char* unit) {
  const HubLayout& L = run.layout;
  std::printf("\nper %s (a row = one (token, expert) pair; a token whose experts share a %s travels once per expert)\n",
              unit, unit);
  Table tab({unit, "experts", "rows", "share", "tokens", "gather ms", "copy out ms", "experts ms", "copy back ms",
             "copy GB/s"});
  for (size_t g = 0; g < L.dev.size(); ++g) {
    const DeviceSlice& s = L.dev[g];
    const DeviceTimes& d = t.dev[g];
    const double bytes = double(s.rows()) * run.row_bytes;
    tab.add_row({strf("%zu", g), strf("%zu", s.experts.size()), strf("%d", s.rows()),
                 strf("%.1f%%", L.total_rows ? 100.0 * s.rows() / L.total_rows : 0.0),
                 strf("%d", s.distinct_tokens(k)), strf("%.3f", d.gather_ms),
                 g == 0 ? std::string("stays") : strf("%.3f", d.copy_out_ms), strf("%.3f", d.experts_ms),
                 g == 0 ? std::string("stays") : strf("%.3f", d.copy_back_ms),
                 g == 0 ? std::string("-") : strf("%.1f", gbps(2 * bytes, d.copy_out_ms + d.copy_back_ms))});
  }
  tab.print();
}

void print_split(const HubRun& run, const HubTimes& t, const char* unit, int runs) {
  const double out = double(run.bytes_out()), back = double(run.bytes_back());
  std::printf("\ntime split, median of %d run%s (ms)\n", runs, runs == 1 ? "" : "s");
  Table tab({"stage", "where", "ms"});
  const bool gpu = std::string(unit) == "GPU";
  tab.add_row({gpu ? "route: router GEMM + top-k + ids/w to host" : "route: router GEMM + top-k", strf("%s 0", unit),
               strf("%.3f", t.route_ms)});
  tab.add_row({"plan + index upload", "host", strf("%.3f", t.plan_ms)});
  tab.add_row({"gather (slowest)", strf("%s 0", unit), strf("%.3f", max_over(t, &DeviceTimes::gather_ms))});
  tab.add_row({"copy out (slowest)", strf("%s 0 -> g", unit), strf("%.3f", max_over(t, &DeviceTimes::copy_out_ms))});
  tab.add_row({"experts (slowest)", strf("each %s", unit), strf("%.3f", max_over(t, &DeviceTimes::experts_ms))});
  tab.add_row({"copy back (slowest)", strf("g -> %s 0", unit), strf("%.3f", max_over(t, &DeviceTimes::copy_back_ms))});
  tab.add_row({"spokes: first gather .. last result back", "all", strf("%.3f", t.spokes_ms)});
  tab.add_row({"combine", strf("%s 0", unit), strf("%.3f", t.combine_ms)});
  tab.add_row({"total (wall clock)", "", strf("%.3f", t.total_ms)});
  tab.print();
  const int own = run.layout.dev.empty() ? 0 : run.layout.dev[0].rows();
  std::printf("through %s 0: %s out + %s back = %s (%d of %d rows leave %s 0; its own %d stay)\n", unit,
              human_bytes(out).c_str(), human_bytes(back).c_str(), human_bytes(out + back).c_str(),
              run.layout.total_rows - own, run.layout.total_rows, unit, own);
}

nlohmann::json run_json(const HubRun& run, const HubTimes& t, int k) {
  nlohmann::json devs = nlohmann::json::array();
  for (size_t g = 0; g < run.layout.dev.size(); ++g) {
    const DeviceSlice& s = run.layout.dev[g];
    const DeviceTimes& d = t.dev[g];
    devs.push_back({{"experts", s.experts}, {"rows", s.rows()}, {"tokens", s.distinct_tokens(k)},
                    {"gather_ms", d.gather_ms}, {"copy_out_ms", d.copy_out_ms}, {"experts_ms", d.experts_ms},
                    {"copy_back_ms", d.copy_back_ms}});
  }
  return {{"route_ms", t.route_ms}, {"plan_ms", t.plan_ms},       {"spokes_ms", t.spokes_ms},
          {"combine_ms", t.combine_ms}, {"total_ms", t.total_ms}, {"bytes_out", run.bytes_out()},
          {"bytes_back", run.bytes_back()}, {"devices", devs}};
}

// --- set-up ---------------------------------------------------------------------------------------------

// The experts `ids` of a layer that holds all of them (ascending ids), as one device's weights.
MoeLayerWeights take_experts(const MoeLayerWeights& all, const std::vector<int>& ids) {
  MoeLayerWeights w;
  w.layer = all.layer;
  w.hidden = all.hidden;
  w.inter = all.inter;
  w.num_experts = all.num_experts;
  w.expert_ids = ids;
  w.gate = all.gate;
  const size_t IH = size_t(all.inter) * all.hidden;
  for (int e : ids) {
    w.w1.insert(w.w1.end(), all.w1.begin() + e * IH, all.w1.begin() + (e + 1) * IH);
    w.w3.insert(w.w3.end(), all.w3.begin() + e * IH, all.w3.begin() + (e + 1) * IH);
    w.w2.insert(w.w2.end(), all.w2.begin() + e * IH, all.w2.begin() + (e + 1) * IH);
  }
  return w;
}

// Random weights of Phi-tiny-MoE's layer shape (nn.Linear's init scale), for --bench without a checkpoint.
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

// --- the GPU benchmark ----------------------------------------------------------------------------------

int run_bench(int N, const std::vector<int>& gpu_of, PlacementKind kind, const std::vector<int>& sizes, int iters,
              std::uint64_t seed, const std::string& json_path, const std::string& device) {
  std::printf("--bench: Phi-tiny-MoE layer shape (H=4096, I=448, E=16, top-2 sparsemixer), random bf16 weights\n");
  const MoeLayerWeights all = phi_tiny_random_layer(seed);
  const Placement pl(kind, all.num_experts, N);
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
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int T = sizes[i];
    const std::vector<bf16_bits> x = random_activations(T, all.hidden, seed + 1 + i);
    hub.set_input(x, T);
    for (int w = 0; w < 2; ++w) hub.forward();  // warm-up: allocations, cuBLAS heuristics
    std::vector<HubTimes> times;
    HubRun run;
    for (int it = 0; it < iters; ++it) {
      run = hub.forward();
      times.push_back(run.times);
    }
    const HubTimes t = median_times(times);
    const double via = double(run.bytes_out() + run.bytes_back());
    tab.add_row({strf("%d", T), strf("%.3f", t.route_ms), strf("%.3f", t.plan_ms),
                 strf("%.3f", max_over(t, &DeviceTimes::gather_ms)), strf("%.3f", max_over(t, &DeviceTimes::copy_out_ms)),
                 strf("%.3f", max_over(t, &DeviceTimes::experts_ms)),
                 strf("%.3f", max_over(t, &DeviceTimes::copy_back_ms)), strf("%.3f", t.spokes_ms),
                 strf("%.3f", t.combine_ms), strf("%.3f", t.total_ms), human_bytes(via),
                 human_count(T / (t.total_ms * 1e-3))});
    nlohmann::json j = run_json(run, t, 2);
    j["tokens"] = T;
    rows.push_back(j);
    if (i == 0 && T <= 512) {
      const std::vector<float> xf = bf16_to_float(std::span<const bf16_bits>(x));
      const MoeRefResult ref = moe_layer_reference(all, xf, T, {RouterKind::SparseMixer, 2, 0.01f, true});
      const LayerCheck c = check_layer(ref, run.routing, hub.output(), all.hidden, RouterKind::SparseMixer, 0.01f, 1e-2);
      verdict = strf("T=%d %s", T, c.summary().c_str());
      ok = c.pass;
    }
  }
  std::printf("\nmedian of %d runs per size, ms (gather/copy/experts: the slowest GPU)\n", iters);
  tab.print();
  if (!json_path.empty())
    write_json(json_path, {{"chapter", "03_manual_placement"}, {"bench", true}, {"device", device}, {"gpus", N},
                           {"placement", placement_name(kind)}, {"sizes", rows}, {"check", verdict}});
  if (!ok) {
    std::printf("CHECK FAIL 03_manual_placement --bench: %s\n", verdict.c_str());
    return 1;
  }
  std::printf("CHECK PASS 03_manual_placement --bench: %zu sizes on %d GPUs (%s); %s\n", sizes.size(), N,
              placement_name(kind), verdict.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    CLI::App app{"Chapter 03: experts placed by hand on several GPUs in one process; GPU 0 routes and combines"};
    CommonOptions opt;
    LayerOptions lopt;
    int gpus = 0, iters = 5;
    std::string placement = "linear";
    bool bench = false, share_gpu = false;
    std::vector<int> bench_tokens{128, 1024, 4096, 16384};
    add_common_options(app, opt);
    add_layer_options(app, lopt);
    app.add_option("--gpus", gpus, "devices to place the experts on (default: every GPU; on the CPU: 4 simulated)");
    app.add_option("--placement", placement, "expert -> device map: linear or round-robin")
        ->check(CLI::IsMember({"linear", "round-robin"}))
        ->capture_default_str();
    app.add_option("--iters", iters, "timed runs (the time split is their median)")->capture_default_str();
    app.add_flag("--bench", bench, "GPU: time the hub at Phi-tiny-MoE's layer shape for several token counts");
    app.add_option("--bench-tokens", bench_tokens, "token counts for --bench");
    app.add_flag("--share-gpu", share_gpu,
                 "GPU: put all --gpus N devices on GPU 0 (tests the multi-GPU path on one GPU; times meaningless)");
    if (auto rc = parse_cli(app, argc, argv)) return *rc;
    const bool gpus_given = app.count("--gpus") > 0;
    require(!gpus_given || gpus >= 1, "--gpus must be >= 1, got ", gpus);
    require(iters >= 1, "--iters must be >= 1, got ", iters);
    const PlacementKind kind = parse_placement(placement);

    const DeviceChoice dev = choose_device(opt.device);
    const bool on_gpu = dev.backend == Backend::Gpu;
    const char* unit = on_gpu ? "GPU" : "device";
    require(!on_gpu || share_gpu || !gpus_given || gpus <= dev.gpu_count, "--gpus ", gpus, ": only ", dev.gpu_count,
            " GPU(s) present; use --gpus ", dev.gpu_count, " or fewer, or --device cpu to simulate ", gpus, " devices");
    require(!share_gpu || on_gpu, "--share-gpu needs a GPU (on the CPU every device is simulated anyway)");
    // Devices per GPU: g on GPU g, or all on GPU 0 with --share-gpu.
    auto gpu_map = [&](int N) {
      std::vector<int> m(N, 0);
      for (int g = 0; g < N && !share_gpu; ++g) m[g] = g;
      return m;
    };
    const int default_n = on_gpu && !share_gpu ? dev.gpu_count : 4;

    if (bench) {
      require(on_gpu, "--bench times the GPU path; no GPU here (", dev.description,
              "). Without --bench the CPU run prints the same time split");
      for (int t : bench_tokens) require(t >= 1, "--bench-tokens must be >= 1, got ", t);
      const int N = gpus_given ? gpus : std::min(default_n, 16);
      require(N <= 16, "--gpus ", N, ": the Phi-tiny layer has only 16 experts; use --gpus 16 or fewer");
      std::printf("device: %s, %d GPU(s) present\n", dev.description.c_str(), dev.gpu_count);
      return run_bench(N, gpu_map(N), kind, bench_tokens, iters, opt.seed, opt.json, dev.description);
    }

    const Checkpoint ckpt = Checkpoint::open(opt.model);
    const int E = ckpt.config().num_local_experts;
    const int N = gpus_given ? gpus : std::min(default_n, E);
    require(N <= E, "--gpus ", N, ": the layer has only ", E, " experts, so some ", unit,
            " would hold none; use --gpus ", E, " or fewer");

    // The reference needs every expert; each device loads only its own (as separate GPUs would).
    LayerProblem p = make_layer_problem(ckpt, lopt, opt.seed);
    const int H = p.weights.hidden, T = p.tokens;
    const Placement pl(kind, E, N);
    std::vector<MoeLayerWeights> dev_w;
    for (int g = 0; g < N; ++g) dev_w.push_back(load_moe_layer(ckpt, lopt.layer, pl.experts_of(g)));

    std::printf("device: %s\n", dev.description.c_str());
    if (on_gpu && share_gpu) std::printf("%d logical GPUs, all on GPU 0 (--share-gpu), device 0 is the hub\n", N);
    else if (on_gpu) std::printf("%d GPU(s) in one process, GPU 0 is the hub\n", N);
    else std::printf("%d simulated devices: one host thread each, memcpy stands in for peer copies\n", N);
    std::printf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d, T=%d\n", opt.model.c_str(), lopt.layer, H,
                p.weights.inter, E, router_name(p.router), p.top_k, T);
    print_placement(pl, unit);

    // GPU: h is stored in bf16 before w2, and the reference does the same. CPU: fp32 throughout.
    const MoeRefResult ref = moe_layer_reference(p.weights, p.x, T, {p.router, p.top_k, p.jitter_eps, on_gpu});

    HubRun run;
    std::vector<HubTimes> times;
    std::vector<float> y;
    double tolerance;
    if (on_gpu) {
      HubGpu hub(p.weights.gate, dev_w, p.router, p.top_k, p.jitter_eps, gpu_map(N));
      for (const std::string& n : hub.notes()) std::printf("%s\n", n.c_str());
      hub.set_input(p.x_bf16, T);
      hub.forward();  // warm-up: cuBLAS handles, buffers, peer mappings
      for (int it = 0; it < iters; ++it) {
        run = hub.forward();
        times.push_back(run.times);
      }
      y = hub.output();
      // bf16: the GPU rounds each expert's output row to bf16 before it travels (2^-9 relative), and y once
      // more; h is rounded in both. fp32 sums in another order add ~1e-6. Independent roundings of 2^-9 give
      // rel-L2 ~ 2e-3, so 1e-2 has margin, while one row sent to the wrong GPU, a missed copy or a wrong
      // multiplier puts at least one token's output off by O(1), i.e. rel-L2 >= ~1/sqrt(T) (0.12 at T=64).
      tolerance = 1e-2;
    } else {
      HubCpu hub(p.weights.gate, std::move(dev_w), p.router, p.top_k, p.jitter_eps);
      hub.forward(p.x, T);  // warm-up: buffers
      for (int it = 0; it < iters; ++it) {
        run = hub.forward(p.x, T);
        times.push_back(run.times);
      }
      y = run.y;
      // The same fp32 operations in the same order as the reference (expert rows summed over H in order,
      // results added in j order), so the outputs agree bit for bit; 1e-6 only allows a compiler that
      // contracts a multiply-add differently.
      tolerance = 1e-6;
    }
    std::printf("\n");
    print_routing(run.routing, lopt.show);
    const HubTimes t = median_times(times);
    print_devices(run, t, p.top_k, unit);
    print_split(run, t, unit, iters);

    const LayerCheck check = check_layer(ref, run.routing, y, H, p.router, p.jitter_eps, tolerance);
    if (!opt.json.empty()) {
      nlohmann::json j = run_json(run, t, p.top_k);
      j.update({{"chapter", "03_manual_placement"}, {"device", dev.description}, {"backend", on_gpu ? "gpu" : "cpu"},
                {"num_devices", N}, {"placement", placement_name(kind)}, {"tokens", T},
                {"rel_l2", check.rel_l2}, {"pass", check.pass}});
      write_json(opt.json, j);
    }
    const std::string what = strf("%d %s%s, %s, T=%d", N, on_gpu ? "GPU" : "simulated device", N == 1 ? "" : "s",
                                  placement_name(kind), T);
    if (!check.pass) {
      std::printf("CHECK FAIL 03_manual_placement: %s: %s\n", what.c_str(), check.summary().c_str());
      return 1;
    }
    std::printf("CHECK PASS 03_manual_placement: %s: %s\n", what.c_str(), check.summary().c_str());
    return 0;
  });
}
