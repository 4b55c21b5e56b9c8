// Placement maps: the hand-worked examples of placement.hpp, vLLM's uneven rule, and the invariants
// (every expert on exactly one rank, local index and slot are bijections) for many (E, N); replica maps
// (from_slots) on DeepSeek's EPLB example.
#include <doctest/doctest.h>

#include <set>

#include "moe/placement.hpp"
#include "util/check.hpp"

using namespace eplab;

TEST_CASE("placement: linear and round-robin, even split") {
  Placement lin(PlacementKind::Linear, 8, 4);
  CHECK(lin.experts_of(0) == std::vector<int>{0, 1});
  CHECK(lin.experts_of(3) == std::vector<int>{6, 7});
  CHECK(lin.owner(5) == 2);
  CHECK(lin.local_index(5) == 1);
  CHECK(lin.even());
  for (int e = 0; e < 8; ++e) CHECK(lin.slot(e) == e);  // linear: rank-major order is id order

  Placement rr(PlacementKind::RoundRobin, 8, 4);
  CHECK(rr.experts_of(0) == std::vector<int>{0, 4});
  CHECK(rr.experts_of(3) == std::vector<int>{3, 7});
  CHECK(rr.owner(5) == 1);
  CHECK(rr.local_index(5) == 1);
  CHECK(rr.global_id(1, 1) == 5);
  // rank-major order: r0 {0,4} r1 {1,5} r2 {2,6} r3 {3,7}
  const std::vector<int> order = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int s = 0; s < 8; ++s) CHECK(rr.expert_at_slot(s) == order[s]);
  CHECK(rr.slot(5) == 3);
  CHECK(rr.first_slot(2) == 4);
  CHECK(rr.first_slot(4) == 8);
}

TEST_CASE("placement: uneven split the vLLM way (first E mod N ranks take one more)") {
  Placement lin(PlacementKind::Linear, 16, 3);
  CHECK(lin.num_local(0) == 6);
  CHECK(lin.num_local(1) == 5);
  CHECK(lin.num_local(2) == 5);
  CHECK(lin.experts_of(1).front() == 6);
  CHECK(lin.experts_of(2).front() == 11);
  CHECK(lin.max_local() == 6);
  CHECK_FALSE(lin.even());

  Placement rr(PlacementKind::RoundRobin, 5, 2);  // r0 {0,2,4} r1 {1,3}
  CHECK(rr.experts_of(0) == std::vector<int>{0, 2, 4});
  CHECK(rr.experts_of(1) == std::vector<int>{1, 3});
  CHECK(rr.local_index(4) == 2);
  CHECK(rr.slot(1) == 3);
}

TEST_CASE("placement: invariants for every E <= 20 and N <= E") {
  for (auto kind : {PlacementKind::Linear, PlacementKind::RoundRobin})
    for (int E = 1; E <= 20; ++E)
      for (int N = 1; N <= E; ++N) {
        CAPTURE(E);
        CAPTURE(N);
        Placement p(kind, E, N);
        std::multiset<int> all;
        for (int r = 0; r < N; ++r) {
          const auto& ex = p.experts_of(r);
          // sizes: E/N or E/N + 1, the bigger ones first
          CHECK(int(ex.size()) == E / N + (r < E % N ? 1 : 0));
          for (int i = 0; i < int(ex.size()); ++i) {
            if (i) CHECK(ex[i - 1] < ex[i]);
            CHECK(p.owner(ex[i]) == r);
            CHECK(p.local_index(ex[i]) == i);
            CHECK(p.global_id(r, i) == ex[i]);
            CHECK(p.slot(ex[i]) == p.first_slot(r) + i);
            if (kind == PlacementKind::RoundRobin) CHECK(ex[i] % N == r);
            if (kind == PlacementKind::Linear && i) CHECK(ex[i] == ex[i - 1] + 1);
            all.insert(ex[i]);
          }
        }
        CHECK(all.size() == size_t(E));
        CHECK(std::set<int>(all.begin(), all.end()).size() == size_t(E));
        for (int s = 0; s < E; ++s) CHECK(p.slot(p.expert_at_slot(s)) == s);
      }
}

TEST_CASE("placement: bad input is a clear error") {
  CHECK_THROWS_WITH_AS(Placement(PlacementKind::Linear, 4, 5), doctest::Contains("-np <= 4"), Error);
  CHECK_THROWS_AS(Placement(PlacementKind::Linear, 4, 0), Error);
  CHECK_THROWS_AS(Placement(PlacementKind::Linear, 0, 1), Error);
  CHECK_THROWS_AS(parse_placement("random"), Error);
  CHECK(parse_placement("round-robin") == PlacementKind::RoundRobin);
  CHECK(parse_placement("linear") == PlacementKind::Linear);
  Placement p(PlacementKind::Linear, 4, 2);
  CHECK_THROWS_AS(p.owner(4), Error);
  CHECK_THROWS_AS(p.experts_of(2), Error);
  CHECK_THROWS_AS(p.global_id(0, 2), Error);
}

TEST_CASE("placement: printing names every rank and the uneven rule") {
  const std::string s = Placement(PlacementKind::RoundRobin, 5, 2).str();
  CHECK(s.find("round-robin") != std::string::npos);
  CHECK(s.find("rank 0: experts 0 2 4") != std::string::npos);
  CHECK(s.find("rank 1: experts 1 3") != std::string::npos);
  CHECK(s.find("uneven") != std::string::npos);
  CHECK(s.find("4:0") != std::string::npos);
}

// Replicas: DeepSeek's EPLB example (12 experts on 8 ranks, 16 physical slots; test_eplb.cpp checks that
// rebalance_experts produces this map). Rank r holds slots 2r and 2r+1.
namespace {
const std::vector<int> kDeepSeekMap = {5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1};
}

TEST_CASE("placement: from_slots on DeepSeek's example map") {
  const Placement p = Placement::from_slots(kDeepSeekMap, 12, 8);
  CHECK(p.kind() == PlacementKind::Map);
  CHECK(p.num_slots() == 16);
  CHECK(p.num_experts() == 12);
  CHECK(p.has_replicas());
  CHECK(p.even());
  CHECK(p.max_replicas() == 2);
  CHECK(p.max_local() == 2);
  CHECK(p.replicas(5) == std::vector<int>{0, 2});  // slots on ranks 0 and 1
  CHECK(p.replicas(1) == std::vector<int>{13, 15});
  CHECK(p.replicas(4) == std::vector<int>{5, 7});
  CHECK(p.replicas(6) == std::vector<int>{1});
  // owner / local_index / slot name the first replica
  CHECK(p.owner(5) == 0);
  CHECK(p.local_index(5) == 0);
  CHECK(p.slot(5) == 0);
  CHECK(p.owner(1) == 6);
  CHECK(p.local_index(1) == 1);
  CHECK(p.slot(1) == 13);
  CHECK(p.owner(4) == 2);
  CHECK(p.local_index(4) == 1);
  CHECK(p.slot(4) == 5);
  // a rank's slots in slot order, not sorted by id (rank 7: {11, 1})
  CHECK(p.experts_of(0) == std::vector<int>{5, 6});
  CHECK(p.experts_of(7) == std::vector<int>{11, 1});
  CHECK(p.global_id(7, 1) == 1);
  for (int r = 0; r <= 8; ++r) CHECK(p.first_slot(r) == 2 * r);
  for (int s = 0; s < 16; ++s) CHECK(p.expert_at_slot(s) == kDeepSeekMap[s]);
  // token t's choice of a replicated expert takes replica t mod 2; a single replica takes every token
  for (int t = 0; t < 4; ++t) {
    CAPTURE(t);
    CHECK(p.slot_for(5, t) == (t % 2 == 0 ? 0 : 2));
    CHECK(p.slot_for(1, t) == (t % 2 == 0 ? 13 : 15));
    CHECK(p.slot_for(6, t) == 1);
  }
  CHECK_THROWS_AS(p.replicas(12), Error);
  CHECK_THROWS_AS(p.expert_at_slot(16), Error);
}

TEST_CASE("placement: a replica map prints its slots and replicas") {
  const std::string s = Placement::from_slots(kDeepSeekMap, 12, 8).str();
  CHECK(s.find("expert map (map, 12 experts on 8 ranks, 16 slots: 2 per rank, 4 replicas)") != std::string::npos);
  CHECK(s.find("rank 7: experts 11 1") != std::string::npos);
  CHECK(s.find(" 5:0+1") != std::string::npos);  // expert 5: rank 0, and a replica on rank 1
  CHECK(s.find(" 1:6+7") != std::string::npos);
}

TEST_CASE("placement: a bad replica map is a clear error") {
  std::vector<int> m = kDeepSeekMap;
  m[3] = 12;  // 12 experts: ids 0..11 (and expert 7 loses its only slot, but the range is named first)
  CHECK_THROWS_WITH_AS(Placement::from_slots(m, 12, 8), doctest::Contains("slot 3 holds expert 12"), Error);
  m = kDeepSeekMap;
  m[14] = 0;  // expert 11's only slot
  CHECK_THROWS_WITH_AS(Placement::from_slots(m, 12, 8), doctest::Contains("expert 11 has no slot"), Error);
  m = kDeepSeekMap;
  m.pop_back();  // 15 slots on 8 ranks (expert 1 keeps slot 13)
  CHECK_THROWS_WITH_AS(Placement::from_slots(m, 12, 8), doctest::Contains("do not split evenly over 8 ranks"),
                       Error);
  CHECK_THROWS_WITH_AS(Placement::from_slots({0, 1, 2, 3, 4, 5, 6, 7}, 12, 8),
                       doctest::Contains("8 slots cannot hold 12 experts"), Error);
  CHECK_THROWS_AS(Placement::from_slots({0, -1}, 1, 2), Error);
  CHECK_THROWS_AS(Placement::from_slots({}, 1, 1), Error);
}

TEST_CASE("placement: linear and round-robin have one slot per expert") {
  for (auto kind : {PlacementKind::Linear, PlacementKind::RoundRobin})
    for (auto [E, N] : {std::pair{8, 4}, std::pair{16, 3}, std::pair{5, 5}, std::pair{7, 1}}) {
      CAPTURE(E);
      CAPTURE(N);
      const Placement p(kind, E, N);
      CHECK(p.num_slots() == E);
      CHECK_FALSE(p.has_replicas());
      CHECK(p.max_replicas() == 1);
      for (int e = 0; e < E; ++e) {
        CHECK(p.replicas(e) == std::vector<int>{p.slot(e)});
        CHECK(p.slot_for(e, 0) == p.slot(e));
        CHECK(p.slot_for(e, 7) == p.slot(e));
      }
    }
}
