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
// This file is the lesson; the hub itself is hub_gpu.cu (hub_cpu.cpp on the CPU), its row layout
// hub_layout.cpp; flags, tables and JSON are options.cpp and report.cpp; --bench is bench.cpp.
//
// Run: 03_manual_placement [--gpus N] [--placement linear|round-robin] [--tokens 64] [--device cpu]
//      03_manual_placement --bench [--gpus N]      GPU: Phi-tiny layer shape, T = 128 .. 16384
#include <algorithm>
#include <cstdio>
#include <utility>

#include "bench.hpp"
#include "device.hpp"
#include "hub_cpu.hpp"
#include "hub_gpu.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "moe/placement.hpp"
#include "options.hpp"
#include "report.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

using namespace eplab;
using namespace eplab::ch03;

int main(int argc, char** argv) {
  return run_main([&] {
    Options opt;
    if (auto rc = parse_options(argc, argv, opt)) return *rc;
    const DeviceChoice dev = choose_device(opt.common.device);
    check_devices(opt, dev);
    const bool on_gpu = dev.backend == Backend::Gpu;
    const char* unit = on_gpu ? "GPU" : "device";

    // How many devices (default: one per GPU present; 4 simulated on the CPU or on one shared GPU, never
    // more than the E experts), and which physical GPU each runs on: device g on GPU g, or all on GPU 0.
    auto num_devices = [&](int E) {
      return opt.gpus ? opt.gpus : std::min(on_gpu && !opt.share_gpu ? dev.gpu_count : 4, E);
    };
    auto gpu_of = [&](int N) {
      std::vector<int> m(N, 0);
      for (int g = 0; g < N && !opt.share_gpu; ++g) m[g] = g;
      return m;
    };
    if (opt.bench) {
      const int N = num_devices(16);
      return run_bench(opt, dev, N, gpu_of(N));
    }

    const Checkpoint ckpt = Checkpoint::open(opt.common.model);
    const int E = ckpt.config().num_local_experts;
    const int N = num_devices(E);
    require(N <= E, "--gpus ", N, ": the layer has only ", E, " experts, so some ", unit,
            " would hold none; use --gpus ", E, " or fewer");

    // The placement: device g holds experts pl.experts_of(g) and loads only those, as a separate GPU
    // would. The reference needs every expert, so the problem loads them all.
    LayerProblem p = make_layer_problem(ckpt, opt.layer, opt.common.seed);
    const int H = p.weights.hidden, T = p.tokens;
    const Placement pl(opt.placement, E, N);
    std::vector<MoeLayerWeights> dev_w;
    for (int g = 0; g < N; ++g) dev_w.push_back(load_moe_layer(ckpt, opt.layer.layer, pl.experts_of(g)));

    std::printf("device: %s\n", dev.description.c_str());
    if (on_gpu && opt.share_gpu) std::printf("%d logical GPUs, all on GPU 0 (--share-gpu), device 0 is the hub\n", N);
    else if (on_gpu) std::printf("%d GPU(s) in one process, GPU 0 is the hub\n", N);
    else std::printf("%d simulated devices: one host thread each, memcpy stands in for peer copies\n", N);
    std::printf("model %s: layer %d, H=%d, I=%d, E=%d, router %s, top-%d, T=%d\n", opt.common.model.c_str(),
                opt.layer.layer, H, p.weights.inter, E, router_name(p.router), p.top_k, T);
    print_placement(pl, unit);

    // GPU: h is stored in bf16 before w2, and the reference does the same. CPU: fp32 throughout.
    const MoeRefResult ref = moe_layer_reference(p.weights, p.x, T, {p.router, p.top_k, p.jitter_eps, on_gpu});

    // The hub's forward: route on device 0, send each device its rows, run its experts, bring them back,
    // combine on device 0. One warm-up (buffers; on GPUs also cuBLAS handles and peer mappings), then
    // --iters timed runs.
    HubRun run;
    std::vector<float> y;
    double tolerance;
    if (on_gpu) {
      HubGpu hub(p.weights.gate, dev_w, p.router, p.top_k, p.jitter_eps, gpu_of(N));
      for (const std::string& n : hub.notes()) std::printf("%s\n", n.c_str());
      hub.set_input(p.x_bf16, T);
      run = median_run(1, opt.iters, [&] { return hub.forward(); });
      y = hub.output();
      // bf16: the GPU rounds each expert's output row to bf16 before it travels (2^-9 relative), and y once
      // more; h is rounded in both. fp32 sums in another order add ~1e-6. Independent roundings of 2^-9 give
      // rel-L2 ~ 2e-3, so 1e-2 has margin, while one row sent to the wrong GPU, a missed copy or a wrong
      // multiplier puts at least one token's output off by O(1), i.e. rel-L2 >= ~1/sqrt(T) (0.12 at T=64).
      tolerance = 1e-2;
    } else {
      HubCpu hub(p.weights.gate, std::move(dev_w), p.router, p.top_k, p.jitter_eps);
      run = median_run(1, opt.iters, [&] { return hub.forward(p.x, T); });
      y = run.y;
      // The same fp32 operations in the same order as the reference (expert rows summed over H in order,
      // results added in j order), so the outputs agree bit for bit; 1e-6 only allows a compiler that
      // contracts a multiply-add differently.
      tolerance = 1e-6;
    }
    std::printf("\n");
    print_routing(run.routing, opt.layer.show);
    print_devices(run, p.top_k, unit);
    print_split(run, unit, opt.iters);

    const LayerCheck check = check_layer(ref, run.routing, y, H, p.router, p.jitter_eps, tolerance);
    if (!opt.common.json.empty())
      write_json(opt.common.json,
                 run_json(run, p.top_k,
                          {{"chapter", "03_manual_placement"}, {"device", dev.description},
                           {"backend", on_gpu ? "gpu" : "cpu"}, {"num_devices", N},
                           {"placement", placement_name(opt.placement)}, {"tokens", T}, {"rel_l2", check.rel_l2},
                           {"pass", check.pass}}));
    const std::string what = strf("%d %s%s, %s, T=%d", N, on_gpu ? "GPU" : "simulated device", N == 1 ? "" : "s",
                                  placement_name(opt.placement), T);
    std::printf("CHECK %s 03_manual_placement: %s: %s\n", check.pass ? "PASS" : "FAIL", what.c_str(),
                check.summary().c_str());
    return check.pass ? 0 : 1;
  });
}
