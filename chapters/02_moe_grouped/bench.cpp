// Check first (llm.c's rule: validate, then time): at every size, before anything is timed, the grouped
// path, the naive path and every --bench-experts strategy run the size's first input batch, and kCheckRows
// of its rows (spread over the batch, first and last included) are compared with the fp32 CPU reference on
// the same bf16 weights: expert ids (near-ties excepted), multipliers and rel-L2 of y <= 1e-2, the
// tolerance of the chapter's own check (bf16 output, fp32 sums in another order). The weights are made
// on the GPU (random_init.cuh), copied to the host once for the reference, and uploaded into the layer.
// A failed check is reported at its size, the timing goes on, and the run ends with CHECK FAIL (exit 1).
//
// Timing method (see the chapter README): weights are random bf16 of Phi-tiny-MoE's layer shape; each
// measured forward starts with a cold L2 (a buffer twice the L2 size is touched before it, outside the
// timed region), because in a real model the next layer's weights are never in cache. Each point is the
// median over many forwards timed one by one with CUDA events; inputs rotate over 8 seeded batches so
// routing (and so which experts' weights are read) changes from forward to forward.
//
// L2 flush (--flush): write (default, the method of every number recorded so far) rewrites the buffer with
// cudaMemsetAsync and leaves the L2 full of dirty lines, so the forward's first misses also pay write-backs;
// read sums the buffer in a kernel and leaves clean lines, closer to what a real model's next layer finds
// (its L2 holds mostly weights it only read). Measured on an H200: the two agree within ~3 %.
// none skips the flush: a diagnostic (warm caches), never a recorded number; its gap to write/read is what
// the cold caches cost.
//
// Per-stage split (--bench-split): two methods, both printed by default.
//   eager:  forward(x, T, Grouped, time_stages) as before: kernels launched one by one with events between
//           the stages. When the host launches slower than the GPU runs (T = 1: ~3-5 us per launch against
//           kernels of a few us) the GPU waits for the host, and those waits land in the stage times.
//   queued: time_stages_queued (kernels/bench): a GPU busy-wait (--bench-spin-us) is enqueued first, so the
//           whole forward and its events are queued before the GPU reaches them; the stages are then pure
//           GPU time. On the cuBLAS strategies the host waits for the offsets mid-forward; a second
//           busy-wait after that wait keeps the GEMMs queued too, and the offsets round trip is left out
//           (the eager split shows it as "offsets wait"). "misses" counts busy-waits that ended before the
//           host had queued what follows them (then that split is not pure: raise --bench-spin-us).
//
// Expert strategies side by side (--bench-experts a,b,...): at every T with more rows than the small-batch
// threshold, the whole layer with each named strategy forced, in interleaved rounds (round i runs every
// strategy once, starting at a different one each round, each forward after its own L2 flush) so that
// clock and thermal drift during the run hit all of them alike; plus each one's queued experts stage. The
// run-to-run spread of the experts stage (~20 % between device runs at T = 4096) cannot decide a 5-10 %
// difference between two separate runs; inside one interleaved run it can.
#include "bench.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>

#include "bench_support.hpp"
#include "cuda_check.hpp"
#include "moe/layer_check.hpp"
#include "moe/reference.hpp"
#include "moe_gpu.hpp"
#include "random_init.cuh"
#include "util/report.hpp"
#include "util/timer.hpp"

namespace eplab {

namespace {

struct PeerTimes {
  std::map<int, double> ms;  // T -> best HF time
  std::string label;
};

PeerTimes load_peer(const std::string& path) {
  PeerTimes p;
  if (path.empty()) return p;
  const nlohmann::json j = read_json(path, "--peer-json");
  // scripts/hf_moe_bench.py writes {"best": {"<T>": {"ms": .., "impl": ..}}, "device": ..}
  require(j.contains("best") && j["best"].is_object(), "--peer-json ", path, ": no 'best' object");
  for (auto& [t, v] : j["best"].items()) p.ms[std::stoi(t)] = v.is_object() ? v.value("ms", 0.0) : v.get<double>();
  p.label = j.value("label", std::string("HF transformers"));
  return p;
}

constexpr int kCheckRows = 16;       // rows per size compared with the CPU reference
constexpr double kCheckTol = 1e-2;   // rel-L2 of y (bf16 output, fp32 sums in another order)

// A layer of random bf16 weights of the given shape, made on the GPU (std 1/sqrt(fan_in), so logits and
// expert activations keep unit scale for unit-scale x) and copied to the host: the layer uploads it, the
// CPU reference of the check reads it.
MoeLayerWeights random_weights(int H, int I, int E, unsigned long long seed) {
  MoeLayerWeights w;
  w.hidden = H;
  w.inter = I;
  w.num_experts = E;
  for (int e = 0; e < E; ++e) w.expert_ids.push_back(e);
  const std::size_t EIH = std::size_t(E) * I * H;
  __nv_bfloat16* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, EIH * sizeof(__nv_bfloat16)));
  auto make = [&](std::vector<bf16_bits>& out, std::size_t n, float stddev, unsigned long long s) {
    gpu::fill_random_bf16(d, n, stddev, s, nullptr);
    out.resize(n);
    CUDA_CHECK(cudaMemcpy(out.data(), d, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
  };
  make(w.gate, std::size_t(E) * H, 1.f / std::sqrt(float(H)), seed * 4 + 0);
  make(w.w1, EIH, 1.f / std::sqrt(float(H)), seed * 4 + 1);
  make(w.w3, EIH, 1.f / std::sqrt(float(H)), seed * 4 + 2);
  make(w.w2, EIH, 1.f / std::sqrt(float(I)), seed * 4 + 3);
  CUDA_CHECK(cudaFree(d));
  return w;
}

// Up to kCheckRows row indices spread over [0, T), the first and the last included.
std::vector<int> check_rows(int T) {
  const int n = std::min(T, kCheckRows);
  std::vector<int> rows;
  for (int i = 0; i < n; ++i) rows.push_back(n == 1 ? 0 : int((long long)i * (T - 1) / (n - 1)));
  return rows;
}

// Times fn() n times, each after an L2 flush, and returns the median in ms.
template <typename Fn>
double time_cold(int n, cudaStream_t s, L2Flusher& flush, Fn&& fn) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < n; ++i) {
    flush.flush(s, i);
    CUDA_CHECK(cudaEventRecord(a, s));
    fn(i);
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  return median(ms);
}

}  // namespace

nlohmann::json run_gpu_bench(const BenchOptions& opt) {
  const PeerTimes peer = load_peer(opt.peer_json);
  const Ceilings ceil = measure_ceilings();
  std::printf("measured ceilings: HBM copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", ceil.hbm_gbps, ceil.bf16_tflops);

  const int H = opt.hidden, I = opt.inter, E = opt.experts, k = opt.top_k;
  constexpr float kJitterEps = 0.01f;
  const MoeLayerWeights weights = random_weights(H, I, E, opt.seed);
  GpuMoeLayer layer(weights, RouterKind::SparseMixer, k, kJitterEps);
  bool all_pass = true;
  int checks = 0;
  const int T_max = *std::max_element(opt.tokens.begin(), opt.tokens.end());
  constexpr int kBatches = 8;

  L2Flusher flush(parse_l2_flush(opt.flush));
  const bool split_eager = opt.split == "eager" || opt.split == "both";
  const bool split_queued = opt.split == "queued" || opt.split == "both";
  require(split_eager || split_queued, "--bench-split must be eager, queued or both, got '", opt.split, "'");
  std::printf("L2 flush before each timed forward: %s, %.0f MiB\n", l2_flush_name(flush.kind()),
              double(flush.bytes()) / (1 << 20));
  __nv_bfloat16 *d_x = nullptr, *d_y = nullptr;
  CUDA_CHECK(cudaMalloc(&d_x, size_t(kBatches) * T_max * H * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&d_y, size_t(T_max) * H * sizeof(__nv_bfloat16)));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreate(&s));

  Table stages({"T", "via", "router", "routing", "permute", "experts", "combine", "total (eager)",
                "offsets wait"});
  Table queued({"T", "via", "router", "routing", "permute", "experts", "combine", "sum (GPU)", "misses"});
  Table variants({"T", "strategy", "ran", "layer ms (median)", "p10 ms", "p90 ms", "experts stage (queued)",
                  "sum (queued)", "misses"});
  std::vector<ExpertStrategy> variant_list;
  for (const std::string& name : opt.experts_variants) variant_list.push_back(parse_expert_strategy(name));
  Table table({"T", "grouped ms", "naive ms", "speedup", "TFLOP/s", "weights GB/s", "%bf16 peak", "%HBM",
               "roofline ms", "% of roofline", "HF ms", "vs HF"});
  nlohmann::json rows = nlohmann::json::array();
  for (int T : opt.tokens) {
    // Seeded inputs, uploaded once; routing of batch 0 tells how many experts a forward touches.
    std::set<int> touched;
    std::vector<bf16_bits> x0;
    for (int b = 0; b < kBatches; ++b) {
      auto x = random_activations(T, H, opt.seed * 1000 + b);
      CUDA_CHECK(cudaMemcpy(d_x + size_t(b) * T_max * H, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
      if (b == 0) {
        auto res = layer.forward(x, T, MoePath::Grouped);
        touched.insert(res.routing.ids.begin(), res.routing.ids.end());
        x0 = std::move(x);
      }
    }
    auto run = [&](MoePath path) {
      return [&, path](int i) { layer.forward_device(d_x + size_t(i % kBatches) * T_max * H, T, d_y, path, s); };
    };
    layer.forward_device(d_x, T, d_y, MoePath::Grouped, s);  // warm-up and workspace growth
    layer.forward_device(d_x, T, d_y, MoePath::Naive, s);
    CUDA_CHECK(cudaStreamSynchronize(s));

    // --- check before timing: sampled rows of batch 0 against the CPU reference (see the file header)
    const std::vector<int> pick = check_rows(T);
    const int n = int(pick.size());
    std::vector<float> xs(std::size_t(n) * H);
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < H; ++c) xs[std::size_t(i) * H + c] = bf16_to_float(x0[std::size_t(pick[i]) * H + c]);
    const MoeRefResult ref = moe_layer_reference(weights, xs, n, {RouterKind::SparseMixer, k, kJitterEps, true});
    nlohmann::json check_rows_json = nlohmann::json::array();
    auto check_path = [&](MoePath path, const std::string& what) {
      const GpuMoeLayer::Result res = layer.forward(x0, T, path);
      Routing r;
      r.tokens = n;
      r.k = k;
      std::vector<float> ys(std::size_t(n) * H);
      for (int i = 0; i < n; ++i) {
        std::copy_n(&res.y[std::size_t(pick[i]) * H], H, &ys[std::size_t(i) * H]);
        for (int j = 0; j < k; ++j) {
          r.ids.push_back(res.routing.id(pick[i], j));
          r.weights.push_back(res.routing.weight(pick[i], j));
        }
      }
      const LayerCheck c = check_layer(ref, r, ys, H, RouterKind::SparseMixer, kJitterEps, kCheckTol);
      const std::string via =
          path == MoePath::Naive ? "" : std::string(" via ") + expert_strategy_name(layer.last_expert_strategy());
      std::printf("check T=%d %s%s (%d sampled rows): %s %s\n", T, what.c_str(), via.c_str(), n,
                  c.pass ? "PASS" : "FAIL", c.summary().c_str());
      all_pass = all_pass && c.pass;
      ++checks;
      check_rows_json.push_back({{"path", what}, {"rows", n}, {"rel_l2", c.rel_l2}, {"pass", c.pass}});
    };
    check_path(MoePath::Grouped, "grouped");
    check_path(MoePath::Naive, "naive");
    const int iters = T <= 512 ? 200 : T <= 4096 ? 50 : 20;
    const double g_ms = time_cold(iters, s, flush, run(MoePath::Grouped));
    const double n_ms = time_cold(T <= 512 ? 50 : 5, s, flush, run(MoePath::Naive));

    const std::string via =
        std::string(router_impl_name(layer.last_router_impl())) + " + " + expert_strategy_name(layer.last_expert_strategy());

    // Per-stage split: eager forwards (no graph) with CUDA events between the stages, cold L2 (x itself is
    // warm: forward() uploads it first). Median of 5 per stage. On the small-batch direct path the
    // routing is fused into the router kernel and the combine into the experts kernel (0 here).
    double sm[7] = {}, qm[6] = {};
    int misses = 0;
    if (split_eager) {
      std::vector<double> st[7];
      for (int rep = 0; rep < 5; ++rep) {
        flush.flush(s, rep);
        CUDA_CHECK(cudaStreamSynchronize(s));
        const MoeTimings t = layer.forward(x0, T, MoePath::Grouped, true).timings;
        const float v[7] = {t.router_ms,  t.routing_ms, t.permute_ms,     t.experts_ms,
                            t.combine_ms, t.total_ms,   t.offsets_wait_ms};
        for (int i = 0; i < 7; ++i) st[i].push_back(v[i]);
      }
      for (int i = 0; i < 7; ++i) sm[i] = median(st[i]);
      stages.add_row({std::to_string(T), via, strf("%.4f", sm[0]), strf("%.4f", sm[1]), strf("%.4f", sm[2]),
                      strf("%.4f", sm[3]), strf("%.4f", sm[4]), strf("%.4f", sm[5]), strf("%.4f", sm[6])});
    }
    if (split_queued) {
      // Same input batch 0, already on the device; median of 9.
      std::vector<double> st[6];
      for (int rep = 0; rep < 9; ++rep) {
        flush.flush(s, rep);
        const QueuedStageTimes t = time_stages_queued(layer, d_x, T, d_y, MoePath::Grouped, s, float(opt.spin_us));
        const float v[6] = {t.router_ms, t.routing_ms, t.permute_ms, t.experts_ms, t.combine_ms, t.total_ms};
        for (int i = 0; i < 6; ++i) st[i].push_back(v[i]);
        misses += t.queue_misses;
      }
      for (int i = 0; i < 6; ++i) qm[i] = median(st[i]);
      queued.add_row({std::to_string(T), via, strf("%.4f", qm[0]), strf("%.4f", qm[1]), strf("%.4f", qm[2]),
                      strf("%.4f", qm[3]), strf("%.4f", qm[4]), strf("%.4f", qm[5]), std::to_string(misses)});
    }

    nlohmann::json variant_rows = nlohmann::json::array();
    if (!variant_list.empty() && T * k > layer.small_rows_max()) {
      const ExpertStrategy saved = layer.expert_strategy();
      const int small = layer.small_rows_max();
      const int V = int(variant_list.size());
      for (ExpertStrategy v : variant_list) {  // checked, then warm-up: every buffer grown, cuBLAS heuristics cached
        layer.set_expert_strategy(v, small);
        check_path(MoePath::Grouped, std::string("grouped, --bench-experts ") + expert_strategy_name(v));
        layer.forward_device(d_x, T, d_y, MoePath::Grouped, s);
        layer.forward_device(d_x, T, d_y, MoePath::Grouped, s);
      }
      CUDA_CHECK(cudaStreamSynchronize(s));
      std::vector<std::vector<double>> ms(static_cast<size_t>(V));
      std::vector<std::set<std::string>> ran(static_cast<size_t>(V));
      cudaEvent_t a, b;
      CUDA_CHECK(cudaEventCreate(&a));
      CUDA_CHECK(cudaEventCreate(&b));
      for (int it = 0; it < iters; ++it)
        for (int j = 0; j < V; ++j) {
          const int v = (it + j) % V;
          layer.set_expert_strategy(variant_list[size_t(v)], small);
          flush.flush(s, it * V + j);
          CUDA_CHECK(cudaEventRecord(a, s));
          layer.forward_device(d_x + size_t(it % kBatches) * T_max * H, T, d_y, MoePath::Grouped, s);
          CUDA_CHECK(cudaEventRecord(b, s));
          CUDA_CHECK(cudaEventSynchronize(b));
          float t = 0;
          CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
          ms[size_t(v)].push_back(t);
          ran[size_t(v)].insert(expert_strategy_name(layer.last_expert_strategy()));
        }
      CUDA_CHECK(cudaEventDestroy(a));
      CUDA_CHECK(cudaEventDestroy(b));
      for (int v = 0; v < V; ++v) {
        layer.set_expert_strategy(variant_list[size_t(v)], small);
        std::vector<double> ex, sum;
        int vm = 0;
        for (int rep = 0; rep < 5; ++rep) {
          flush.flush(s, rep);
          const QueuedStageTimes t = time_stages_queued(layer, d_x, T, d_y, MoePath::Grouped, s, float(opt.spin_us));
          ex.push_back(t.experts_ms);
          sum.push_back(t.total_ms);
          vm += t.queue_misses;
        }
        std::string ran_s;
        for (const auto& r : ran[size_t(v)]) ran_s += (ran_s.empty() ? "" : "|") + r;
        std::vector<double> sorted = ms[size_t(v)];
        std::sort(sorted.begin(), sorted.end());
        const double p10 = sorted[sorted.size() / 10], p90 = sorted[sorted.size() * 9 / 10];
        const double med = median(ms[size_t(v)]);
        variants.add_row({std::to_string(T), expert_strategy_name(variant_list[size_t(v)]), ran_s, strf("%.4f", med),
                          strf("%.4f", p10), strf("%.4f", p90), strf("%.4f", median(ex)), strf("%.4f", median(sum)),
                          std::to_string(vm)});
        variant_rows.push_back({{"strategy", expert_strategy_name(variant_list[size_t(v)])}, {"ran", ran_s},
                                {"layer_ms", med}, {"p10_ms", p10}, {"p90_ms", p90},
                                {"experts_queued_ms", median(ex)}, {"sum_queued_ms", median(sum)}, {"misses", vm}});
      }
      layer.set_expert_strategy(saved, small);
    }

    const double flops = 2.0 * T * k * 3.0 * H * I + 2.0 * T * E * H;
    const double weight_bytes = double(touched.size()) * 3.0 * H * I * 2 + double(E) * H * 2;
    const double min_bytes = weight_bytes + 2.0 * T * H * 2;  // + x read once, y written once
    const double roof_ms = std::max(flops / (ceil.bf16_tflops * 1e12), min_bytes / (ceil.hbm_gbps * 1e9)) * 1e3;
    const double tflops = flops / (g_ms * 1e-3) / 1e12, gbps = weight_bytes / (g_ms * 1e-3) / 1e9;
    const auto p = peer.ms.find(T);
    table.add_row({std::to_string(T), strf("%.4f", g_ms), strf("%.4f", n_ms), strf("%.1fx", n_ms / g_ms),
                   strf("%.1f", tflops), strf("%.0f", gbps), strf("%.1f%%", 100 * tflops / ceil.bf16_tflops),
                   strf("%.1f%%", 100 * gbps / ceil.hbm_gbps), strf("%.4f", roof_ms),
                   strf("%.0f%%", 100 * roof_ms / g_ms), p != peer.ms.end() ? strf("%.3f", p->second) : "-",
                   p != peer.ms.end() ? strf("%.1fx", p->second / g_ms) : "-"});
    rows.push_back({{"tokens", T}, {"grouped_ms", g_ms}, {"naive_ms", n_ms}, {"tflops", tflops},
                    {"weights_gbps", gbps}, {"experts_touched", touched.size()}, {"roofline_ms", roof_ms},
                    {"experts_via", via},
                    {"stages_ms", split_eager ? nlohmann::json{{"router", sm[0]}, {"routing", sm[1]},
                                                               {"permute", sm[2]}, {"experts", sm[3]},
                                                               {"combine", sm[4]}, {"total", sm[5]},
                                                               {"offsets_wait", sm[6]}}
                                              : nlohmann::json(nullptr)},
                    {"stages_queued_ms", split_queued ? nlohmann::json{{"router", qm[0]}, {"routing", qm[1]},
                                                                       {"permute", qm[2]}, {"experts", qm[3]},
                                                                       {"combine", qm[4]}, {"sum", qm[5]},
                                                                       {"misses", misses}}
                                                      : nlohmann::json(nullptr)},
                    {"experts_variants", variant_rows}, {"check", check_rows_json},
                    {"peer_ms", p != peer.ms.end() ? nlohmann::json(p->second) : nlohmann::json(nullptr)}});
  }
  std::printf("\n%s", table.str().c_str());
  std::printf("(median of cold-L2 forwards; weights GB/s counts the experts a forward touches; roofline = max(FLOPs /"
              " GEMM peak, bytes / HBM copy))\n");
  if (split_eager)
    std::printf("\nper-stage split of the grouped path, ms, EAGER (kernels launched one by one with events between"
                " stages, median of 5; includes the GPU's waits for host launches; 'offsets wait': end of permute"
                " to start of the GEMMs, inside 'experts'):\n%s",
                stages.str().c_str());
  if (split_queued)
    std::printf("\nper-stage split of the grouped path, ms, QUEUED (a %.0f us GPU busy-wait first, so the forward is"
                " queued before the GPU runs it: GPU time only, no host gaps, offsets round trip left out; median"
                " of 9; misses > 0: some busy-wait ended too early, raise --bench-spin-us):\n%s",
                opt.spin_us, queued.str().c_str());
  if (!variant_list.empty())
    std::printf("\nexpert strategies compared on the whole layer, ms (interleaved rounds, %s L2 flush before each"
                " forward; 'ran': what actually ran, e.g. cublas-padded above its cap runs cublas-streams; T with"
                " rows <= small_rows_max skipped):\n%s",
                l2_flush_name(flush.kind()), variants.str().c_str());
  std::printf("(via: router + expert strategy; permute includes the dispatch plan; experts includes SwiGLU;"
              " with the fused or tiled router the router column includes routing (one kernel); on the weight-stream"
              " path the experts column includes the combine; L2 flush: %s)\n",
              l2_flush_name(flush.kind()));
  CUDA_CHECK(cudaStreamDestroy(s));
  CUDA_CHECK(cudaFree(d_x));
  CUDA_CHECK(cudaFree(d_y));
  return {{"pass", all_pass}, {"checks", checks}, {"check_rows", kCheckRows}, {"check_tolerance", kCheckTol},
          {"ceilings", {{"hbm_gbps", ceil.hbm_gbps}, {"bf16_tflops", ceil.bf16_tflops}}},
          {"method", {{"l2_flush", l2_flush_name(flush.kind())}, {"split", opt.split}, {"spin_us", opt.spin_us}}},
          {"shape", {{"hidden", H}, {"inter", I}, {"experts", E}, {"top_k", k}}}, {"rows", rows}};
}

}  // namespace eplab
