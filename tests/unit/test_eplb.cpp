// EPLB (common/moe/eplb.hpp): DeepSeek's published example, the invariants every plan must keep, the two
// pitfalls chapter 06's README shows, and bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "moe/eplb.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

// Every logical expert has a slot, counts add up to R, log2phy inverts phy2log, and each GPU holds R/G slots
// (by construction: GPU g is slots [g R/G, (g+1) R/G)).
void check_invariants(const EplbPlan& p, const std::vector<std::vector<double>>& w) {
  REQUIRE(p.layers == int(w.size()));
  for (int l = 0; l < p.layers; ++l) {
    REQUIRE(int(p.phy2log[l].size()) == p.slots);
    int total = 0;
    for (int e = 0; e < p.experts; ++e) {
      CHECK(p.logcnt[l][e] >= 1);
      total += p.logcnt[l][e];
      const std::vector<int>& slots = p.log2phy[l][e];
      int listed = 0;
      for (int r = 0; r < p.max_replicas; ++r) {
        if (r >= p.logcnt[l][e]) {
          CHECK(slots[r] == -1);
          continue;
        }
        REQUIRE(slots[r] >= 0);
        CHECK(p.phy2log[l][slots[r]] == e);
        ++listed;
      }
      CHECK(listed == p.logcnt[l][e]);
    }
    CHECK(total == p.slots);
  }
}

}  // namespace

TEST_CASE("EPLB: DeepSeek's published example (2 layers, 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs)") {
  const std::vector<std::vector<double>> w = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                                              {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
  const EplbPlan p = rebalance_experts(w, 16, 4, 2, 8);
  // deepseek-ai/EPLB README: the phy2log its rebalance_experts prints for this input
  const std::vector<std::vector<int>> expected = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                                                  {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
  CHECK(p.phy2log == expected);
  check_invariants(p, w);
  // the hottest experts got the replicas: layer 0's 10 (183), 5 (165), 1 (132), 4 (104)
  CHECK(p.logcnt[0] == std::vector<int>{1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1});
  // and the GPUs are far more even than without replicas (8 GPUs, 12 experts: no balanced plan exists)
  for (int l = 0; l < 2; ++l) CHECK(balancedness(gpu_load(w[l], p.phy2log[l], 8)) > 0.8);
}

TEST_CASE("EPLB: balanced packing and replication on their own") {
  // decreasing weight, each to the lighter pack with room (3 items each): 5 -> p0, 4 -> p1, 3 (item 4) -> p1
  // (4 < 5), 3 (item 5) -> p0 (5 < 7), 2 -> p1 (7 < 8), 1 -> p0 (p1 is full)
  const Packing pk = balanced_packing({5, 1, 4, 2, 3, 3}, 2);
  CHECK(pk.pack == std::vector<int>{0, 0, 1, 1, 1, 0});
  CHECK(pk.rank_in_pack == std::vector<int>{0, 2, 0, 2, 1, 1});
  const Packing one = balanced_packing({1, 9, 5}, 3);  // one item per pack: item i is pack i
  CHECK(one.pack == std::vector<int>{0, 1, 2});
  const Replication r = replicate_experts({10, 40, 20}, 6);
  // slots 3..5: 40/1 -> 1, then 40/2=20 vs 20/1=20 tie -> the lower id (1), then 20 vs 40/3 -> 2
  CHECK(r.phy2log == std::vector<int>{0, 1, 2, 1, 1, 2});
  CHECK(r.rank == std::vector<int>{0, 0, 0, 1, 2, 1});
  CHECK(r.logcnt == std::vector<int>{1, 3, 2});
}

TEST_CASE("EPLB: random loads keep every invariant, hierarchical and global (no rows made or lost)") {
  std::mt19937 rng(3);
  struct Shape {
    int E, R, groups, nodes, gpus;
  };
  for (const Shape s : {Shape{16, 16, 1, 1, 4}, Shape{16, 20, 4, 2, 4}, Shape{16, 24, 4, 2, 8}, Shape{64, 80, 8, 2, 8},
                        Shape{12, 16, 3, 2, 8} /* 3 groups on 2 nodes: the global policy */}) {
    CAPTURE(s.E);
    CAPTURE(s.R);
    std::vector<std::vector<double>> w(3, std::vector<double>(s.E));
    std::lognormal_distribution<double> skew(0.0, 1.0);  // a few hot experts, as real routing has
    for (auto& row : w)
      for (double& v : row) v = std::floor(100 * skew(rng));
    const EplbPlan p = rebalance_experts(w, s.R, s.groups, s.nodes, s.gpus);
    check_invariants(p, w);
    for (int l = 0; l < 3; ++l) {
      double total = 0;
      for (double v : w[l]) total += v;
      const std::vector<double> load = gpu_load(w[l], p.phy2log[l], s.gpus);
      double sum = 0;
      for (double v : load) sum += v;
      CHECK(sum == doctest::Approx(total));  // replicas split tokens, they do not make or lose any
      CHECK(balancedness(load) > 0.0);
      CHECK(balancedness(load) <= 1.0);
      CHECK(imbalance(load) == doctest::Approx(1.0 / balancedness(load)));
    }
  }
}

TEST_CASE("EPLB pitfalls: a hot expert replicated only inside its node; two replicas on one GPU") {
  // expert 0 takes ~94 % of the tokens; 8 experts in 2 groups on 2 nodes, 12 slots on 4 GPUs
  const std::vector<std::vector<double>> w = {{1000, 10, 10, 10, 10, 10, 10, 10}};
  const EplbPlan hier = rebalance_experts(w, 12, 2, 2, 4), glob = rebalance_experts(w, 12, 1, 1, 4);
  // hierarchical: node 0 (slots 0-5) gets expert 0's group, so every replica of expert 0 stays there, while
  // node 1 spends its 2 extra slots on experts with 10 tokens
  for (int s : hier.log2phy[0][0])
    if (s >= 0) CHECK(s < 6);
  CHECK(hier.logcnt[0][0] == 3);
  CHECK(glob.logcnt[0][0] == 5);  // the global policy gives it every extra slot
  const double hier_max = imbalance(gpu_load(w[0], hier.phy2log[0], 4));
  const double glob_max = imbalance(gpu_load(w[0], glob.phy2log[0], 4));
  MESSAGE("max/mean tokens per GPU: hierarchical ", hier_max, ", global ", glob_max);
  CHECK(glob_max < hier_max);
  // two replicas of expert 0 share GPU 0 (slots 0-2) under both policies: they halve that GPU's work per
  // replica but move nothing to another GPU
  for (const EplbPlan* p : {&hier, &glob}) {
    int on_gpu0 = 0;
    for (int s = 0; s < 3; ++s) on_gpu0 += p->phy2log[0][s] == 0;
    CHECK(on_gpu0 >= 2);
  }
}

TEST_CASE("EPLB: bad input is one clear error") {
  const std::vector<std::vector<double>> w = {{1, 2, 3, 4}};
  CHECK_THROWS_AS(rebalance_experts(w, 3, 1, 1, 1), Error);   // fewer slots than experts
  CHECK_THROWS_AS(rebalance_experts(w, 6, 1, 1, 4), Error);   // 6 slots on 4 GPUs
  CHECK_THROWS_AS(rebalance_experts(w, 8, 3, 1, 4), Error);   // 4 experts in 3 groups
  CHECK_THROWS_AS(rebalance_experts(w, 8, 2, 2, 3), Error);   // 3 GPUs on 2 nodes
  CHECK_THROWS_AS(rebalance_experts({{1, -2, 3, 4}}, 8, 1, 1, 4), Error);  // negative load
  CHECK_THROWS_AS(rebalance_experts({{1, 2}, {1, 2, 3}}, 8, 1, 1, 4), Error);  // ragged layers
  CHECK_THROWS_AS(rebalance_experts({}, 8, 1, 1, 4), Error);
  CHECK_THROWS_AS(gpu_load({1, 2}, {0, 1, 2}, 1), Error);  // a slot names expert 2 of 2
}
