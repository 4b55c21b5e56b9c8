// Placement maps: the hand-worked examples of placement.hpp, vLLM's uneven rule, and the invariants
// (every expert on exactly one rank, local index and slot are bijections) for many (E, N).
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
