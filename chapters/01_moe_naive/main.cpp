// Chapter 01: one top-2 MoE layer on one GPU, the naive way.
//
//   x[T,H] --router GEMM (cuBLAS)--> logits[T,E] --sparsemixer / top-k kernel--> ids[T,k], w[T,k]
//          --naive kernel: one thread block per token, loop over its k experts--> y[T,H]
//
// Every token's block reads the full weights of its k experts, so the same expert weights are read
// again and again by different tokens: fine for a handful of tokens, wasteful for thousands (chapter 02).
//
// Run: 01_moe_naive [--tokens 64] [--layer 0] [--device auto|gpu|cpu] [--router auto|sparsemixer|softmax]
#include <cmath>
#include <cstdio>

#include "device.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "moe_gpu.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"
#include "util/timer.hpp"

using namespace eplab;

namespace {

// The naive kernel's algorithm, written out for the CPU: "one thread block per token". The block keeps
// x_t and h in fast memory, and for each of its k experts streams that expert's w1, w3 and w2 rows.
// h is rounded to bf16 as the kernel stores it.
std::vector<float> naive_moe_cpu(const MoeLayerWeights& w, const std::vector<float>& x, const Routing& r) {
  const int H = w.hidden, I = w.inter;
  std::vector<float> y(size_t(r.tokens) * H, 0.f), h(I);
  for (int t = 0; t < r.tokens; ++t) {             // one "block" per token
    const float* xt = &x[size_t(t) * H];
    float* yt = &y[size_t(t) * H];
    for (int j = 0; j < r.k; ++j) {                // loop over its k experts
      const int e = r.id(t, j);                    // all experts are loaded: local index == expert id
      for (int i = 0; i < I; ++i) {                // h = silu(w1 x) * (w3 x)
        const bf16_bits* r1 = &w.w1[(size_t(e) * I + i) * H];
        const bf16_bits* r3 = &w.w3[(size_t(e) * I + i) * H];
        float g = 0.f, u = 0.f;
        for (int c = 0; c < H; ++c) {
          g += bf16_to_float(r1[c]) * xt[c];
          u += bf16_to_float(r3[c]) * xt[c];
        }
        h[i] = round_bf16(g / (1.f + std::exp(-g)) * u);
      }
      for (int o = 0; o < H; ++o) {                // y += w_tj * (w2 h)
        const bf16_bits* r2 = &w.w2[(size_t(e) * H + o) * I];
        float acc = 0.f;
        for (int i = 0; i < I; ++i) acc += bf16_to_float(r2[i]) * h[i];
        yt[o] += r.weight(t, j) * acc;
      }
    }
  }
  return y;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    CLI::App app{"Chapter 01: a top-2 MoE layer on one GPU, naive (one thread block per token)"};
    CommonOptions opt;
    LayerOptions lopt;
    add_common_options(app, opt);
    add_layer_options(app, lopt);
    if (auto rc = parse_cli(app, argc, argv)) return *rc;

    const Checkpoint ckpt = Checkpoint::open(opt.model);
    LayerProblem p = make_layer_problem(ckpt, lopt, opt.seed);
    const DeviceChoice dev = choose_device(opt.device);
    const int H = p.weights.hidden, E = p.weights.num_experts, T = p.tokens;
    std::printf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d\n", opt.model.c_str(), lopt.layer, H,
                p.weights.inter, E, router_name(p.router), p.top_k);
    std::printf("device: %s\n", dev.description.c_str());

    // The reference: fp32 everywhere, token by token (common/moe/reference.cpp).
    WallTimer ref_timer;
    MoeRefOptions ropt{{p.router, p.top_k, p.jitter_eps}, /*round_h_to_bf16=*/true};
    const MoeRefResult ref = moe_layer_reference(p.weights, p.x, T, ropt);
    const double ref_ms = ref_timer.ms();

    Routing routing;
    std::vector<float> y;
    double tolerance;
    double run_ms = 0;
    if (dev.backend == Backend::Gpu) {
      GpuMoeLayer layer(p.weights, p.router, p.top_k, p.jitter_eps);
      layer.forward(p.x_bf16, T, MoePath::Naive);  // warm-up: cuBLAS handle, module load
      auto res = layer.forward(p.x_bf16, T, MoePath::Naive, /*time_stages=*/true);
      routing = std::move(res.routing);
      y = std::move(res.y);
      run_ms = res.timings.total_ms;
      // bf16 output: each element is rounded once more than in the reference (unit roundoff 2^-9 = 2e-3),
      // plus fp32 sums in another order; 1e-2 leaves room for that and catches any real error (a wrong
      // expert or a missing SiLU moves rel-L2 to O(1)).
      tolerance = 1e-2;
      std::printf("GPU time: router %.3f ms, routing %.3f ms, experts %.3f ms, total %.3f ms\n",
                  res.timings.router_ms, res.timings.routing_ms, res.timings.experts_ms, res.timings.total_ms);
    } else {
      // On the CPU the chapter runs the naive kernel's algorithm in plain C++ (naive_moe_cpu above), a
      // second implementation checked against the reference's.
      WallTimer t;
      routing = route_on_cpu(p);
      y = naive_moe_cpu(p.weights, p.x, routing);
      run_ms = t.ms();
      tolerance = 1e-5;  // same arithmetic as the reference, only the order of a few sums differs
      std::printf("CPU time: %.3f ms (reference %.3f ms)\n", run_ms, ref_ms);
    }

    print_routing(routing, lopt.show);
    const LayerCheck check = check_layer(ref, routing, y, H, p.router, p.jitter_eps, tolerance);
    if (!opt.json.empty())
      write_json(opt.json, {{"chapter", "01_moe_naive"}, {"device", dev.description}, {"tokens", T},
                            {"time_ms", run_ms}, {"rel_l2", check.rel_l2}, {"pass", check.pass},
                            {"ids", routing.ids}, {"weights", routing.weights}});
    if (!check.pass) {
      std::printf("CHECK FAIL 01_moe_naive: %s\n", check.summary().c_str());
      return 1;
    }
    std::printf("CHECK PASS 01_moe_naive: T=%d on %s: %s\n", T, dev.backend == Backend::Gpu ? "GPU" : "CPU",
                check.summary().c_str());
    return 0;
  });
}
