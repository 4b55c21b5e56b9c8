// The EP engine (kernels/ep/ep_moe_gpu.hpp) on 2, 3 and 4 simulated ranks on ONE GPU (loopback_comm.hpp:
// a thread per rank, exchanges as device copies). NCCL needs a GPU per rank, so without this the engine's
// multi-rank paths (blocks from several peers, pieces of the chunked pipeline, the combine classes) run
// only on a multi-GPU machine. Every rank's output is checked against the single-device CPU reference for
// all tokens of all ranks (bf16 activations: rel-L2 <= 1e-2, as chapter 04's GPU check), and the chunked
// pipeline must give the same bits as one message per peer.
#include <cuda_bf16.h>
#include <doctest/doctest.h>

#include <functional>
#include <string>
#include <vector>

#include "cuda_check.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "kernel_test_util.cuh"
#include "loopback_comm.hpp"
#include "moe/layer_check.hpp"
#include "moe/placement.hpp"
#include "moe/reference.hpp"
#include "util/bf16.hpp"

using namespace eplab;

namespace {

struct EngineRun {
  std::vector<float> y;  // every rank's output, rank after rank: [sum T, H]
  Routing routing;       // every rank's routing, in the same order
};

struct Variant {
  EpLayout layout;
  int chunks;
  const char* name;
};

// One engine per simulated rank, `forwards` forwards of T[r] tokens each (random_tokens of the spec; every
// forward must give the same bits); returns the last forward's outputs and routing of all ranks.
EngineRun run_engine(PlacementKind kind, const std::vector<int>& T, const EpMoeGpu::RandomSpec& spec,
                     const RouterCfg& rc, const Variant& v, int forwards) {
  const int N = int(T.size()), H = spec.hidden;
  std::vector<std::vector<bf16_bits>> y(N);
  std::vector<Routing> routing(N);
  std::vector<int> same_every_forward(N, 1);
  testing::run_loopback_ranks(N, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Placement placement(kind, spec.experts, N);
    EpMoeGpu layer(comm, placement, spec, rc, v.layout);
    layer.set_chunks(v.chunks);
    const std::size_t n = std::size_t(T[r]) * H;
    test::DevBuf<bf16_bits> d_x(std::max<std::size_t>(n, 1)), d_y(std::max<std::size_t>(n, 1));
    random_tokens_device(spec, r, T[r], test::as_bf16(d_x));
    std::vector<bf16_bits> first;
    for (int f = 0; f < forwards; ++f) {
      // y poisoned (NaN) before every forward: a token that no combine writes cannot pass on an earlier
      // forward's (or an earlier variant's) leftover output; the memsets are waited for, since the engine's
      // stream does not order itself after the legacy stream
      d_y.poison();
      layer.forward_device(test::as_bf16(d_x), T[r], test::as_bf16(d_y));
      comm.sync();
      y[r] = d_y.download();
      y[r].resize(n);
      if (f == 0) first = y[r];
      else if (y[r] != first) same_every_forward[r] = 0;  // the same input: the engine must repeat itself
    }
    routing[r] = layer.routing();
  });
  for (int r = 0; r < N; ++r) CHECK_MESSAGE(same_every_forward[r], "rank ", r, ": a later forward changed the output");
  EngineRun out;
  out.routing.k = rc.top_k;
  for (int r = 0; r < N; ++r) {
    const std::vector<float> yf = bf16_to_float(std::span<const bf16_bits>(y[r]));
    out.y.insert(out.y.end(), yf.begin(), yf.end());
    out.routing.tokens += routing[r].tokens;
    out.routing.ids.insert(out.routing.ids.end(), routing[r].ids.begin(), routing[r].ids.end());
    out.routing.weights.insert(out.routing.weights.end(), routing[r].weights.begin(), routing[r].weights.end());
  }
  return out;
}

// The single-device CPU reference for every rank's tokens, rank after rank.
MoeRefResult reference(const std::vector<int>& T, const EpMoeGpu::RandomSpec& spec, const RouterCfg& rc) {
  std::vector<float> x;
  int total = 0;
  for (int r = 0; r < int(T.size()); ++r) {
    const std::vector<float> xr = bf16_to_float(std::span<const bf16_bits>(random_tokens(spec, r, T[r])));
    x.insert(x.end(), xr.begin(), xr.end());
    total += T[r];
  }
  return moe_layer_reference(random_layer_weights(spec), x, total, {rc, true});
}

void check_all_variants(PlacementKind kind, const std::vector<int>& T, const RouterCfg& rc) {
  EpMoeGpu::RandomSpec spec;
  spec.hidden = 256;
  spec.inter = 128;
  spec.experts = 16;
  spec.seed = 7;
  const MoeRefResult ref = reference(T, spec, rc);
  const Variant variants[] = {{EpLayout::InPlace, 1, "inplace"},     {EpLayout::InPlace, 2, "inplace c=2"},
                              {EpLayout::InPlace, 3, "inplace c=3"}, {EpLayout::InPlace, 64, "inplace c=64"},
                              {EpLayout::Permute, 1, "permute"},     {EpLayout::Direct, 1, "direct"}};
  std::vector<float> y_inplace;
  for (const Variant& v : variants) {
    const std::string name = v.name;
    CAPTURE(name);
    const EngineRun run = run_engine(kind, T, spec, rc, v, 2);
    const LayerCheck c = check_layer(ref, run.routing, run.y, spec.hidden, rc.kind, rc.jitter_eps, 1e-2);
    MESSAGE(T.size(), " ranks, ", name, ": ", c.summary());
    CHECK(c.pass);
    if (v.layout != EpLayout::InPlace) continue;
    if (v.chunks == 1) {
      y_inplace = run.y;
    } else {
      // the chunked pipeline moves rows differently but computes every token the same way: the same bits
      REQUIRE(run.y.size() == y_inplace.size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < run.y.size(); ++i) differ += run.y[i] != y_inplace[i];
      CHECK_MESSAGE(differ == 0, differ, " of ", run.y.size(), " output values differ from --chunks 1");
    }
  }
}

}  // namespace

TEST_CASE("EP engine on 2 simulated ranks (linear placement, top-2 sparsemixer): every layout and chunk count") {
  check_all_variants(PlacementKind::Linear, {64, 37}, RouterCfg{});
}

TEST_CASE("EP engine on 3 simulated ranks (round-robin, uneven split, a rank without tokens)") {
  check_all_variants(PlacementKind::RoundRobin, {40, 0, 23}, RouterCfg{});
}

TEST_CASE("EP engine on 4 simulated ranks, top-4 softmax (the combine's general top-k path)") {
  RouterCfg rc;
  rc.kind = RouterKind::SoftmaxTopK;
  rc.top_k = 4;
  check_all_variants(PlacementKind::Linear, {5, 30, 1, 12}, rc);
}

TEST_CASE("EP engine on one rank: the single-GPU layer's kernels (decode, weight-stream, padded GEMMs) vs the reference") {
  // T = 1: the token-direct decode chain; 100: permute + cublas-padded; 700 (1400 rows): past the direct path
  check_all_variants(PlacementKind::Linear, {1}, RouterCfg{});
  check_all_variants(PlacementKind::Linear, {100}, RouterCfg{});
  check_all_variants(PlacementKind::RoundRobin, {700}, RouterCfg{});
}

namespace {

// Every rank's output for the given per-rank token blocks, with the per-row kernels forced: the fused router
// (one block per token) and weight-streaming experts (each row's dot products in a fixed order, whatever the
// other rows). rows[r]: rank r's tokens [T_r, H].
// placement: the map for N ranks; per_row: force the per-row kernels (else the default choices).
std::vector<bf16_bits> run_engine_rows(const std::vector<std::vector<bf16_bits>>& rows, const EpMoeGpu::RandomSpec& spec,
                                       const RouterCfg& rc, const std::function<Placement(int)>& placement,
                                       bool per_row, Routing* routing_all = nullptr) {
  const int N = int(rows.size()), H = spec.hidden;
  std::vector<std::vector<bf16_bits>> y(N);
  std::vector<Routing> routing(N);
  testing::run_loopback_ranks(N, [&](dist::Communicator& comm) {
    const int r = comm.rank(), T = int(rows[r].size() / H);
    EpMoeGpu layer(comm, placement(N), spec, rc);
    if (per_row) {
      layer.set_router_impl(RouterImpl::Fused);
      layer.set_expert_strategy(ExpertStrategy::WeightStream);
    }
    test::DevBuf<bf16_bits> d_x(std::max<std::size_t>(rows[r].size(), 1)), d_y(std::max<std::size_t>(rows[r].size(), 1));
    if (T > 0) CUDA_CHECK(cudaMemcpy(d_x.get(), rows[r].data(), rows[r].size() * 2, cudaMemcpyHostToDevice));
    d_y.poison();
    layer.forward_device(test::as_bf16(d_x), T, test::as_bf16(d_y));
    comm.sync();
    y[r] = d_y.download();
    y[r].resize(rows[r].size());
    routing[r] = layer.routing();
  });
  if (routing_all) {  // every rank's routing, rank after rank (the order of the rows)
    *routing_all = Routing{0, rc.top_k, {}, {}};
    for (const Routing& q : routing) {
      routing_all->tokens += q.tokens;
      routing_all->ids.insert(routing_all->ids.end(), q.ids.begin(), q.ids.end());
      routing_all->weights.insert(routing_all->weights.end(), q.weights.begin(), q.weights.end());
    }
  }
  std::vector<bf16_bits> all;
  for (const auto& v : y) all.insert(all.end(), v.begin(), v.end());
  return all;
}

std::vector<bf16_bits> run_per_row_kernels(const std::vector<std::vector<bf16_bits>>& rows,
                                           const EpMoeGpu::RandomSpec& spec, const RouterCfg& rc, PlacementKind kind,
                                           Routing* routing_all = nullptr) {
  return run_engine_rows(
      rows, spec, rc, [&](int N) { return Placement(kind, spec.experts, N); }, true, routing_all);
}

// Cut x [sum T, H] into the ranks' blocks.
std::vector<std::vector<bf16_bits>> split_rows(const std::vector<bf16_bits>& x, const std::vector<int>& T, int H) {
  std::vector<std::vector<bf16_bits>> rows;
  std::size_t at = 0;
  for (int t : T) {
    rows.emplace_back(x.begin() + std::ptrdiff_t(at), x.begin() + std::ptrdiff_t(at + std::size_t(t) * H));
    at += std::size_t(t) * H;
  }
  return rows;
}

}  // namespace

TEST_CASE("Same bits at every EP size: one rank and 2, 3, 4 loopback ranks give identical outputs for the same rows") {
  // The engine's dispatch and combine add no arithmetic: with per-row kernels, a token's output cannot depend
  // on which rank owns it or which rows travel with it. (The default kernels pick cuBLAS algorithms by row
  // count, so there EP sizes agree to bf16 rounding: the reference checks above.) 600 tokens, top-2: 1200 rows,
  // past the one-rank token-direct path, so every size runs plan -> permute -> experts -> combine.
  EpMoeGpu::RandomSpec spec;
  spec.hidden = 256;
  spec.inter = 128;
  spec.experts = 16;
  spec.seed = 11;
  for (const RouterCfg rc : {RouterCfg{}, RouterCfg{RouterKind::SoftmaxTopK, 4, 0.01f}}) {
    const std::vector<std::vector<int>> splits = {{600}, {300, 300}, {250, 0, 350}, {150, 131, 170, 149}};
    std::vector<bf16_bits> x = random_tokens(spec, 0, 600);
    std::vector<bf16_bits> one;
    for (const std::vector<int>& T : splits) {
      std::vector<std::vector<bf16_bits>> rows;
      std::size_t at = 0;
      for (int t : T) {
        rows.emplace_back(x.begin() + std::ptrdiff_t(at), x.begin() + std::ptrdiff_t(at + std::size_t(t) * spec.hidden));
        at += std::size_t(t) * spec.hidden;
      }
      for (PlacementKind kind : {PlacementKind::Linear, PlacementKind::RoundRobin}) {
        Routing routing;
        const std::vector<bf16_bits> y = run_per_row_kernels(rows, spec, rc, kind, &routing);
        if (one.empty()) {
          one = y;  // EP = 1, linear
          // and it is the right answer: the CPU reference on the same rows
          const MoeRefResult ref = moe_layer_reference(random_layer_weights(spec), bf16_to_float(std::span<const bf16_bits>(x)),
                                                       600, {rc, true});
          const LayerCheck c = check_layer(ref, routing, bf16_to_float(std::span<const bf16_bits>(y)), spec.hidden,
                                           rc.kind, rc.jitter_eps, 1e-2);
          MESSAGE("one rank, per-row kernels vs the CPU reference: ", c.summary());
          CHECK(c.pass);
          continue;
        }
        std::size_t differ = 0;
        for (std::size_t i = 0; i < y.size(); ++i) differ += y[i] != one[i];
        CHECK_MESSAGE(differ == 0, T.size(), " ranks (", placement_name(kind), ", top-", rc.top_k, "): ", differ,
                      " of ", y.size(), " output values differ from one rank");
      }
    }
  }
}

TEST_CASE("EP engine with replicas (EPLB's physical slots): the reference, and the same bits as without replicas") {
  // 16 experts, 3 and 4 replicas of the hottest; every (token, choice) goes to one replica by its index. A
  // replica is a copy of its expert's weights, so with the per-row kernels the output must not change at all,
  // and with the default kernels it must match the CPU reference.
  EpMoeGpu::RandomSpec spec;
  spec.hidden = 256;
  spec.inter = 128;
  spec.experts = 16;
  spec.seed = 5;
  const RouterCfg rc;
  const std::vector<bf16_bits> x = random_tokens(spec, 0, 400);
  const MoeRefResult ref = moe_layer_reference(random_layer_weights(spec), bf16_to_float(std::span<const bf16_bits>(x)),
                                               400, {rc, true});
  struct Case {
    std::vector<int> T, phy2log;
  };
  const Case cases[] = {
      // 2 ranks, 20 slots: expert 3 three times (twice on rank 0), expert 9 twice
      {{250, 150}, {0, 1, 2, 3, 4, 5, 6, 7, 3, 3, 8, 9, 10, 11, 12, 13, 14, 15, 9, 2}},
      // 4 ranks, 24 slots (6 each), a rank with no tokens; expert 0 on every rank
      {{120, 0, 200, 80}, {0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 12, 13, 14, 15, 0, 4, 4, 7, 8, 15}},
  };
  for (const Case& c : cases) {
    const int N = int(c.T.size());
    CAPTURE(N);
    const auto rows = split_rows(x, c.T, spec.hidden);
    const auto with_replicas = [&](int n) { return Placement::from_slots(c.phy2log, spec.experts, n); };
    const auto linear = [&](int n) { return Placement(PlacementKind::Linear, spec.experts, n); };
    const std::vector<bf16_bits> plain = run_engine_rows(rows, spec, rc, linear, true);
    const std::vector<bf16_bits> replicated = run_engine_rows(rows, spec, rc, with_replicas, true);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < plain.size(); ++i) differ += plain[i] != replicated[i];
    CHECK_MESSAGE(differ == 0, differ, " of ", plain.size(), " values differ with replicas (per-row kernels)");
    Routing routing;
    const std::vector<bf16_bits> dflt = run_engine_rows(rows, spec, rc, with_replicas, false, &routing);
    const LayerCheck chk = check_layer(ref, routing, bf16_to_float(std::span<const bf16_bits>(dflt)), spec.hidden,
                                       rc.kind, rc.jitter_eps, 1e-2);
    MESSAGE(N, " ranks with replicas, default kernels vs the CPU reference: ", chk.summary());
    CHECK(chk.pass);
  }
}
