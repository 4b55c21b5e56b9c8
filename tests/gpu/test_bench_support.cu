// The benchmark support library (kernels/bench/bench_support.hpp): the queued stage split of GpuMoeLayer
// times the same forward as forward_device, the L2 flushes and the busy-wait run. (No assertion on how fast
// anything runs: times are the benchmarks' business.)
#include <doctest/doctest.h>

#include <span>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.hpp"
#include "kernel_test_util.cuh"
#include "moe/reference.hpp"
#include "moe_gpu.hpp"

using namespace eplab;
using namespace eplab::test;

namespace {
constexpr float kEps = 0.01f;  // sparsemixer jitter_eps (Phi-tiny's router_jitter_noise)
}  // namespace

TEST_CASE("time_stages_queued: same output as forward_device, stages add up, busy-wait long enough") {
  // The queued split (02_moe_grouped --bench) must time the same forward: y identical to an untimed
  // forward_device on the same input, on the direct small-batch path (T = 3), cublas-grouped (T = 100),
  // cublas-streams (T = 2048: the host waits for the offsets mid-forward, second busy-wait) and cublas-padded
  // (its own experts and combine stage boundaries).
  const MoeLayerWeights w = random_layer(256, 128, 16, 91);
  const int H = w.hidden;
  Rng rng(92);
  GpuMoeLayer layer(w, RouterKind::SparseMixer, 2, kEps);
  const std::pair<int, ExpertStrategy> runs[] = {{3, ExpertStrategy::Auto},
                                                 {100, ExpertStrategy::Auto},
                                                 {2048, ExpertStrategy::Auto},
                                                 {100, ExpertStrategy::CublasPadded},
                                                 {2048, ExpertStrategy::CublasPadded}};
  for (const auto& run : runs) {
    const int T = run.first;
    INFO("T=" << T << ", strategy " << expert_strategy_name(run.second));
    layer.set_expert_strategy(run.second);
    const Bf16Data x = random_bf16(rng, size_t(T) * H);
    DevBuf<bf16_bits> d_x(x.bits), d_y(size_t(T) * H);
    Stream s;
    d_y.poison();
    layer.forward_device(as_bf16(d_x), T, as_bf16(d_y), MoePath::Grouped, s);
    s.sync();
    const auto want = d_y.download();
    const std::string ran = expert_strategy_name(layer.last_expert_strategy());
    INFO("experts via " << ran);
    d_y.poison();
    device_sync();
    const QueuedStageTimes t = time_stages_queued(layer, as_bf16(d_x), T, as_bf16(d_y), MoePath::Grouped, s, 2000.f);
    s.sync();
    const auto got = d_y.download();
    // Same kernels on the same input: the same bits (cuBLAS could in principle pick another algorithm on a
    // later call, so a tiny difference is reported, not failed).
    const double diff = rel_l2(bf16_to_float(std::span<const bf16_bits>(got)), bf16_to_float(std::span<const bf16_bits>(want)));
    CHECK_MESSAGE(diff <= 1e-3, "queued forward differs from forward_device: rel-L2 ", diff);
    if (got != want) MESSAGE("T=", T, ": queued forward not bit-identical to forward_device (rel-L2 ", diff, ")");
    CHECK(t.router_ms > 0);
    CHECK(t.experts_ms > 0);
    CHECK(t.permute_ms >= 0);
    CHECK(t.routing_ms >= 0);
    CHECK(t.combine_ms >= 0);
    CHECK(t.offsets_wait_ms == 0);
    CHECK(t.total_ms == doctest::Approx(t.router_ms + t.routing_ms + t.permute_ms + t.experts_ms + t.combine_ms));
    // 2 ms of busy-wait is far more than the host needs to queue one forward of this size.
    CHECK_MESSAGE(t.queue_misses == 0, "a 2 ms busy-wait ended before the host had queued the forward");
    MESSAGE("T=", T, " via ", ran, ": queued split router ", t.router_ms, " routing ", t.routing_ms, " permute ",
            t.permute_ms, " experts ", t.experts_ms, " combine ", t.combine_ms, " ms");
    // The eager split of the cuBLAS paths reports the offsets wait inside the experts stage.
    const MoeTimings e = layer.forward(x.bits, T, MoePath::Grouped, true).timings;
    CHECK(e.offsets_wait_ms >= 0);
    CHECK(e.offsets_wait_ms <= e.experts_ms + 1e-3f);
  }
  CHECK_THROWS_AS(time_stages_queued(layer, nullptr, -1, nullptr, MoePath::Grouped, cudaStream_t{}), Error);
  CHECK_THROWS_AS(time_stages_queued(layer, nullptr, 1, nullptr, MoePath::Grouped, cudaStream_t{}, 0.f), Error);
}

TEST_CASE("L2Flusher: every kind runs, and parse_l2_flush names them") {
  for (L2FlushKind kind : {L2FlushKind::Write, L2FlushKind::Read, L2FlushKind::None}) {
    L2Flusher f(kind);
    CHECK(f.kind() == kind);
    CHECK(f.bytes() >= (size_t(2) << 20));
    Stream s;
    f.flush(s, 1);
    gpu_busy_wait(s, 10);
    s.sync();
    CHECK(parse_l2_flush(l2_flush_name(kind)) == kind);
  }
  CHECK_THROWS_AS(parse_l2_flush("memset"), Error);
}
