// Chapter 02: one top-2 MoE layer on one GPU, grouped by expert.
//
//   x[T,H] → router GEMM → logits → sparsemixer / top-k → ids, w
//          → dispatch plan: histogram of rows per expert, exclusive scan → offsets, stable scatter
//          → permute: xp[row] = x[token of row]        (rows of one expert now sit together)
//          → grouped experts: [rows_e, H]·w13_eᵀ → fused SwiGLU → ·w2_eᵀ   (each weight read once)
//          → weighted unpermute: y[t] = Σ_j w[t,j] · yp[row of (t,j)]
//
// Chapter 01 read an expert's weights once per token that chose it; here they are read once per batch.
//
// Run: 02_moe_grouped [--tokens 64] [--device auto|gpu|cpu]        check against the CPU reference, then
//                                                                  naive vs grouped times (GPU, or CPU)
//      02_moe_grouped --bench [--peer-json hf.json]                Phi-tiny shape, T = 1 .. 16384, GPU;
//                                                                  each size checked before it is timed
//                     [--flush write|read|none] [--bench-split eager|queued|both] [--bench-spin-us 300]
//                     [--bench-experts cublas-streams,cublas-padded]   strategies side by side
#include <algorithm>
#include <cstdio>
#include <thread>

#include "bench.hpp"
#include "device.hpp"
#include "moe/grouped_cpu.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "moe_gpu.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"
#include "util/timer.hpp"

using namespace eplab;

namespace {

void print_plan(const DispatchPlan& plan) {
  std::printf("dispatch plan: rows per expert (offsets in the permuted buffer)\n");
  int most = 1;
  for (int c : plan.counts) most = std::max(most, c);
  for (int e = 0; e < plan.num_experts; ++e)
    std::printf("  expert %2d: %5d rows @ %5d  %s\n", e, plan.counts[e], plan.offsets[e],
                std::string(size_t(40.0 * plan.counts[e] / most + 0.5), '#').c_str());
}

// The grouped layer on the CPU with a given number of threads, step by step as on the GPU: dispatch plan,
// permute, grouped experts (threads split the experts), weighted unpermute. (moe_grouped_cpu does the same
// with every core; here the thread count is a knob, so that one thread can be set against the naive loop.)
std::vector<float> grouped_cpu(const LayerProblem& p, const Routing& r, int threads) {
  const int H = p.weights.hidden, T = r.tokens, k = r.k;
  const DispatchPlan plan = make_dispatch_plan(r, p.weights.num_experts);
  std::vector<float> xp(size_t(plan.rows()) * H), yp(size_t(plan.rows()) * H), y(size_t(T) * H, 0.f);
  for (int row = 0; row < plan.rows(); ++row)  // permute
    std::copy_n(&p.x[size_t(plan.assignment[row] / k) * H], H, &xp[size_t(row) * H]);
  grouped_experts_cpu(p.weights, xp, plan.offsets, yp, /*round_h=*/true, threads);
  for (int t = 0; t < T; ++t)  // weighted unpermute
    for (int j = 0; j < k; ++j) {
      const float g = r.weight(t, j);
      const float* src = &yp[size_t(plan.row_of[size_t(t) * k + j]) * H];
      for (int o = 0; o < H; ++o) y[size_t(t) * H + o] += g * src[o];
    }
  return y;
}

// Median wall time of fn() over a few runs (at least 3, more while under ~0.3 s in all), in ms.
template <typename Fn>
double cpu_ms(Fn&& fn) {
  std::vector<double> ms;
  WallTimer total;
  while (ms.size() < 3 || (ms.size() < 15 && total.ms() < 300)) {
    WallTimer t;
    fn();
    ms.push_back(t.ms());
  }
  return median(ms);
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    CLI::App app{"Chapter 02: a top-2 MoE layer on one GPU, grouped by expert (permute, grouped GEMM, unpermute)"};
    CommonOptions opt;
    LayerOptions lopt;
    BenchOptions bopt;
    bool bench = false;
    add_common_options(app, opt);
    add_layer_options(app, lopt);
    app.add_flag("--bench", bench, "benchmark at Phi-tiny-MoE's layer shape (GPU): grouped vs naive vs roofline");
    app.add_option("--bench-tokens", bopt.tokens, "token counts for --bench");
    app.add_option("--peer-json", bopt.peer_json, "HF transformers timings from scripts/hf_moe_bench.py --json");
    app.add_option("--flush", bopt.flush,
                   "--bench: L2 flush before each timed forward: write (memset, leaves dirty lines; default) or read"
                   " (a kernel reads 2 x L2, leaves clean lines) or none (warm caches: a diagnostic)")
        ->check(CLI::IsMember({"write", "read", "none"}));
    app.add_option("--bench-split", bopt.split,
                   "--bench: per-stage split method: eager (launch by launch), queued (behind a GPU busy-wait: GPU"
                   " time only) or both (default)")
        ->check(CLI::IsMember({"eager", "queued", "both"}));
    app.add_option("--bench-experts", bopt.experts_variants,
                   "--bench: expert strategies to compare on the whole layer, interleaved (e.g."
                   " cublas-streams,cublas-padded,cublas-grouped)")
        ->delimiter(',');
    app.add_option("--bench-spin-us", bopt.spin_us, "--bench: busy-wait of the queued split, microseconds (default 300)")
        ->check(CLI::Range(1.0, 100000.0));
    if (auto rc = parse_cli(app, argc, argv)) return *rc;
    // --bench's own options: bad values and use without --bench fail here, on every device, before any work.
    for (const std::string& v : bopt.experts_variants) {
      try {
        parse_expert_strategy(v);
      } catch (const Error& e) {
        fail("--bench-experts: ", e.what());
      }
    }
    for (const char* name : {"--bench-tokens", "--peer-json", "--flush", "--bench-split", "--bench-experts",
                             "--bench-spin-us"})
      require(bench || app.count(name) == 0, name, " is a --bench option: add --bench (it benchmarks the GPU path)");

    const DeviceChoice dev = choose_device(opt.device);
    std::printf("device: %s\n", dev.description.c_str());
    if (bench) {
      require(dev.backend == Backend::Gpu, "--bench measures the GPU path; no GPU here (", dev.description, ")");
      for (int t : bopt.tokens) require(t >= 1, "--bench-tokens must be >= 1, got ", t);
      bopt.seed = opt.seed;
      auto j = run_gpu_bench(bopt);
      j["device"] = dev.description;
      if (!opt.json.empty()) write_json(opt.json, j);
      const bool pass = j["pass"].get<bool>();
      std::printf("CHECK %s 02_moe_grouped --bench: output checked against the CPU reference before timing, at "
                  "every size (%d checks of %d sampled rows: grouped, naive and each --bench-experts strategy; "
                  "expert ids, multipliers, rel-L2 of y <= %.0e)%s; %zu sizes timed on %s\n",
                  pass ? "PASS" : "FAIL", j["checks"].get<int>(), j["check_rows"].get<int>(),
                  j["check_tolerance"].get<double>(), pass ? "" : ": see the FAIL lines above",
                  bopt.tokens.size(), dev.description.c_str());
      return pass ? 0 : 1;
    }

    const Checkpoint ckpt = Checkpoint::open(opt.model);
    LayerProblem p = make_layer_problem(ckpt, lopt, opt.seed);
    const int H = p.weights.hidden, E = p.weights.num_experts, T = p.tokens;
    std::printf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d, T=%d\n", opt.model.c_str(), lopt.layer, H,
                p.weights.inter, E, router_name(p.router), p.top_k, T);

    const MoeRefResult ref = moe_layer_reference(p.weights, p.x, T, {p.router, p.top_k, p.jitter_eps, true});
    print_plan(make_dispatch_plan(ref.routing, E));

    Routing routing;
    std::vector<float> y;
    double tolerance;
    nlohmann::json timing;
    if (dev.backend == Backend::Gpu) {
      GpuMoeLayer layer(p.weights, p.router, p.top_k, p.jitter_eps);
      layer.forward(p.x_bf16, T, MoePath::Grouped);  // warm-up
      layer.forward(p.x_bf16, T, MoePath::Naive);
      auto naive = layer.forward(p.x_bf16, T, MoePath::Naive, true);
      auto res = layer.forward(p.x_bf16, T, MoePath::Grouped, true);
      const MoeTimings& t = res.timings;
      std::printf("GPU grouped: router %.3f + routing %.3f + permute %.3f + experts %.3f + combine %.3f = %.3f ms\n",
                  t.router_ms, t.routing_ms, t.permute_ms, t.experts_ms, t.combine_ms, t.total_ms);
      const float speedup = naive.timings.total_ms / std::max(t.total_ms, 1e-6f);
      std::printf("GPU naive (chapter 01): %.3f ms  ->  naive/grouped = %.2fx at T=%d%s\n", naive.timings.total_ms,
                  speedup, T,
                  speedup < 1 ? " (this layer is too small for grouping to pay: try --tokens 4096 or --bench)" : "");
      timing = {{"grouped_ms", t.total_ms}, {"naive_ms", naive.timings.total_ms}};
      routing = std::move(res.routing);
      y = std::move(res.y);
      tolerance = 1e-2;  // bf16 output (unit roundoff 2^-9) and fp32 sums in another order; see chapter 01
    } else {
      // The lesson on a CPU: the naive loop (the reference: token by token, each expert's weights read and
      // widened from bf16 once per token that chose it) against the grouped steps (once per batch), both with
      // the router and on one thread; then the grouped steps on every core. Wall times, median of >= 3 runs.
      const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
      const double naive_ms = cpu_ms([&] {
        moe_layer_reference(p.weights, p.x, T, {p.router, p.top_k, p.jitter_eps, true});
      });
      std::vector<float> y1;
      const double grouped1_ms = cpu_ms([&] { y1 = grouped_cpu(p, route_on_cpu(p), 1); });
      const double grouped_ms = cpu_ms([&] {
        routing = route_on_cpu(p);
        y = grouped_cpu(p, routing, cores);
      });
      require(y1 == y, "the grouped CPU path gives different outputs on 1 and ", cores, " threads");
      std::printf("CPU naive (chapter 01's loop, the reference), 1 thread: %.3f ms\n", naive_ms);
      std::printf("CPU grouped, 1 thread: %.3f ms  ->  naive/grouped = %.2fx at T=%d\n", grouped1_ms,
                  naive_ms / std::max(grouped1_ms, 1e-6), T);
      std::printf("CPU grouped, %d thread%s (threads split the experts): %.3f ms\n", cores, cores == 1 ? "" : "s",
                  grouped_ms);
      if (naive_ms < 1.2 * grouped1_ms)
        std::printf("(on a CPU both loops do the same scalar arithmetic, which sets most of the time, and small layers"
                    " stay in its caches; what grouping saves, reading each expert's weights once per batch, shows"
                    " on a GPU: the chapter README's Measured table)\n");
      timing = {{"device", "cpu"}, {"naive_ms", naive_ms}, {"grouped_1thread_ms", grouped1_ms},
                {"grouped_ms", grouped_ms}, {"threads", cores}};
      tolerance = 1e-5;  // the same fp32 arithmetic as the reference in another order
    }

    print_routing(routing, lopt.show);
    const LayerCheck check = check_layer(ref, routing, y, H, p.router, p.jitter_eps, tolerance);
    if (!opt.json.empty())
      write_json(opt.json, {{"chapter", "02_moe_grouped"}, {"device", dev.description}, {"tokens", T},
                            {"timing", timing}, {"rel_l2", check.rel_l2}, {"pass", check.pass}});
    if (!check.pass) {
      std::printf("CHECK FAIL 02_moe_grouped: %s\n", check.summary().c_str());
      return 1;
    }
    std::printf("CHECK PASS 02_moe_grouped: T=%d on %s: %s\n", T, dev.backend == Backend::Gpu ? "GPU" : "CPU",
                check.summary().c_str());
    return 0;
  });
}
