// The expert-parallel plan, checked by simulating N ranks in one process: the all-to-alls are done by
// hand from the plans' counts, rows carry tags (rank, token, choice) so every step can be checked
// against the routing itself, and a numeric run must equal the single-device reference bit for bit.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "moe/ep_plan.hpp"
#include "moe/reference.hpp"
#include "util/check.hpp"
#include "util/rng.hpp"

using namespace eplab;

namespace {

// k distinct random experts per token, random positive weights.
Routing random_routing(int T, int E, int k, std::uint64_t seed, int hot = -1) {
  Rng rng(seed);
  Routing r;
  r.tokens = T;
  r.k = k;
  for (int t = 0; t < T; ++t) {
    std::vector<int> ids;
    while (int(ids.size()) < k) {
      int e = (hot >= 0 && ids.empty() && rng.uniform() < 0.7) ? hot : int(rng.next_u64() % E);
      if (std::find(ids.begin(), ids.end(), e) == ids.end()) ids.push_back(e);
    }
    for (int j = 0; j < k; ++j) {
      r.ids.push_back(ids[j]);
      r.weights.push_back(rng.uniform(0.1f, 1.f));
    }
  }
  return r;
}

struct World {
  Placement placement;
  std::vector<Routing> routing;  // per rank
  std::vector<EpPlan> plan;      // per rank
};

World make_world(PlacementKind kind, int E, int N, int k, std::vector<int> tokens, std::uint64_t seed, int hot = -1) {
  World w{Placement(kind, E, N), {}, {}};
  std::vector<int> all;
  for (int r = 0; r < N; ++r) {
    w.routing.push_back(random_routing(tokens[r], E, k, seed * 100 + r, hot));
    w.plan.push_back(make_ep_send_plan(w.routing[r], w.placement, r));
    all.insert(all.end(), w.plan[r].slot_counts.begin(), w.plan[r].slot_counts.end());  // the allgather
  }
  for (int r = 0; r < N; ++r) finish_ep_plan(w.plan[r], w.placement, all);
  return w;
}

// MPI_Alltoallv semantics on per-rank vectors of rows (width values each).
template <typename V>
std::vector<std::vector<V>> alltoallv(const std::vector<std::vector<V>>& send, const std::vector<std::vector<int>>& scounts,
                                      const std::vector<std::vector<int>>& rcounts, size_t width) {
  const int N = int(send.size());
  std::vector<std::vector<V>> recv(N);
  for (int d = 0; d < N; ++d) {
    for (int s = 0; s < N; ++s) {
      REQUIRE(rcounts[d][s] == scounts[s][d]);  // the receiver expects what the sender sends
      const int off = std::accumulate(scounts[s].begin(), scounts[s].begin() + d, 0);
      recv[d].insert(recv[d].end(), send[s].begin() + size_t(off) * width, send[s].begin() + size_t(off + scounts[s][d]) * width);
    }
  }
  return recv;
}

struct Tag {
  int rank, token, choice;
  bool operator==(const Tag&) const = default;
};

void check_world(const World& w) {
  const Placement& p = w.placement;
  const int N = p.num_ranks();
  // Traffic matrix, counted directly from the routing.
  std::vector<int> traffic(size_t(N) * N, 0);
  for (int s = 0; s < N; ++s)
    for (int e : w.routing[s].ids) ++traffic[size_t(s) * N + p.owner(e)];
  for (int r = 0; r < N; ++r) CHECK(w.plan[r].traffic == traffic);

  // Send buffers of tags, in plan order; check the grouping (dest rank, local expert, token).
  std::vector<std::vector<Tag>> send(N);
  std::vector<std::vector<int>> sc(N), rc(N);
  for (int s = 0; s < N; ++s) {
    const EpPlan& pl = w.plan[s];
    const Routing& ro = w.routing[s];
    REQUIRE(pl.send_offsets.back() == ro.tokens * ro.k);
    for (int i = 0; i < pl.send_rows(); ++i) {
      const int a = pl.by_slot.assignment[i], t = a / ro.k, j = a % ro.k, e = ro.ids[a];
      send[s].push_back({s, t, j});
      const int d = int(std::upper_bound(pl.send_offsets.begin(), pl.send_offsets.end(), i) - pl.send_offsets.begin()) - 1;
      CHECK(p.owner(e) == d);
      if (i > pl.send_offsets[d]) {  // not the first row of its block: ordered after the previous row
        const int a0 = pl.by_slot.assignment[i - 1], e0 = ro.ids[a0];
        CHECK(p.local_index(e0) <= p.local_index(e));
        if (e0 == e) CHECK(a0 / ro.k < t);
      }
      CHECK(pl.returned_row(t, j) == i);
    }
    for (int d = 0; d < N; ++d) CHECK(pl.send_counts[d] == traffic[size_t(s) * N + d]);
    sc[s] = pl.send_counts;
    rc[s] = pl.recv_counts;
  }

  // Dispatch, then check what every rank believes about the rows it got.
  auto recv = alltoallv(send, sc, rc, 1);
  std::vector<std::vector<Tag>> back(N);
  for (int d = 0; d < N; ++d) {
    const EpPlan& pl = w.plan[d];
    REQUIRE(int(recv[d].size()) == pl.recv_rows());
    std::vector<Tag> grouped(pl.recv_rows());
    for (int i = 0; i < pl.recv_rows(); ++i) {
      const Tag& tg = recv[d][i];
      const int e = w.routing[tg.rank].id(tg.token, tg.choice);
      CHECK(p.owner(e) == d);
      CHECK(pl.recv_local_expert[i] == p.local_index(e));
      CHECK(pl.grouped_to_recv[pl.recv_to_grouped[i]] == i);
      grouped[pl.recv_to_grouped[i]] = tg;
    }
    // grouped rows: local expert le owns [local_offsets[le], local_offsets[le+1])
    for (int le = 0; le < pl.num_local; ++le)
      for (int g = pl.local_offsets[le]; g < pl.local_offsets[le + 1]; ++g) {
        const Tag& tg = grouped[g];
        CHECK(w.routing[tg.rank].id(tg.token, tg.choice) == p.global_id(d, le));
      }
    // The direct layout: segments sent straight into the grouped buffer must build the same buffer.
    std::vector<Tag> direct(pl.recv_rows(), Tag{-1, -1, -1});
    for (int s = 0; s < N; ++s) {
      std::vector<EpPlan::Segment> out, in;
      for (const auto& sg : w.plan[s].send_segments)
        if (sg.peer == d) out.push_back(sg);
      for (const auto& sg : pl.recv_segments)
        if (sg.peer == s) in.push_back(sg);
      REQUIRE(out.size() == in.size());  // matched in posting order, one to one
      for (size_t m = 0; m < out.size(); ++m) {
        REQUIRE(out[m].rows == in[m].rows);
        CHECK(out[m].rows > 0);
        for (int r = 0; r < out[m].rows; ++r) direct[in[m].offset + r] = send[s][out[m].offset + r];
      }
    }
    CHECK(direct == grouped);
    // counts alone (the GPU path) give the same send side
    const EpPlan counts_only = make_ep_counts_plan(p, d, pl.slot_counts);
    CHECK(counts_only.send_counts == pl.send_counts);
    CHECK(counts_only.send_offsets == pl.send_offsets);
    CHECK(counts_only.send_segments.size() == pl.send_segments.size());
    // "experts" = identity on tags; unpermute back to receive order.
    back[d].resize(pl.recv_rows());
    for (int i = 0; i < pl.recv_rows(); ++i) back[d][i] = grouped[pl.recv_to_grouped[i]];
  }
  // Combine: the reverse exchange swaps the count roles; each row must come home to returned_row(t, j).
  auto home = alltoallv(back, rc, sc, 1);
  for (int s = 0; s < N; ++s) {
    const Routing& ro = w.routing[s];
    REQUIRE(int(home[s].size()) == ro.tokens * ro.k);
    for (int t = 0; t < ro.tokens; ++t)
      for (int j = 0; j < ro.k; ++j) CHECK(home[s][w.plan[s].returned_row(t, j)] == Tag{s, t, j});
  }
}

// A small random layer held in full (the reference) and split by a placement (the ranks).
MoeLayerWeights random_layer(int E, int H, int I, std::uint64_t seed) {
  Rng rng(seed);
  MoeLayerWeights w;
  w.hidden = H;
  w.inter = I;
  w.num_experts = E;
  for (int e = 0; e < E; ++e) w.expert_ids.push_back(e);
  auto fill = [&](std::vector<bf16_bits>& v, size_t n, float scale) {
    v.resize(n);
    for (auto& x : v) x = float_to_bf16(scale * rng.normal());
  };
  fill(w.gate, size_t(E) * H, 1.f);
  fill(w.w1, size_t(E) * I * H, 0.3f);
  fill(w.w3, size_t(E) * I * H, 0.3f);
  fill(w.w2, size_t(E) * H * I, 0.3f);
  return w;
}

MoeLayerWeights subset(const MoeLayerWeights& full, const std::vector<int>& experts) {
  MoeLayerWeights w = full;
  w.expert_ids = experts;
  w.w1.clear();
  w.w3.clear();
  w.w2.clear();
  const size_t n = size_t(full.inter) * full.hidden;
  for (int e : experts) {
    w.w1.insert(w.w1.end(), full.w1.begin() + e * n, full.w1.begin() + (e + 1) * n);
    w.w3.insert(w.w3.end(), full.w3.begin() + e * n, full.w3.begin() + (e + 1) * n);
    w.w2.insert(w.w2.end(), full.w2.begin() + e * n, full.w2.begin() + (e + 1) * n);
  }
  return w;
}

}  // namespace

TEST_CASE("ep plan: rows go to their expert's rank and come home, every placement and N") {
  for (auto kind : {PlacementKind::Linear, PlacementKind::RoundRobin})
    for (int N = 1; N <= 5; ++N) {
      CAPTURE(N);
      CAPTURE(placement_name(kind));
      std::vector<int> tokens;
      for (int r = 0; r < N; ++r) tokens.push_back(7 + 5 * r);  // different batch sizes per rank
      check_world(make_world(kind, 16, N, 2, tokens, 11 + N));
      check_world(make_world(kind, 7, N, 3, tokens, 21 + N));  // uneven split, k = 3
    }
}

TEST_CASE("ep plan: empty batches, a hot expert, a rank that receives nothing") {
  check_world(make_world(PlacementKind::Linear, 8, 3, 2, {0, 5, 0}, 3));
  check_world(make_world(PlacementKind::RoundRobin, 8, 4, 2, {0, 0, 0, 0}, 4));
  World w = make_world(PlacementKind::RoundRobin, 8, 4, 1, {50, 50, 50, 50}, 5, /*hot=*/6);
  check_world(w);
  CHECK(w.plan[2].recv_rows() > w.plan[0].recv_rows());  // expert 6 lives on rank 2
  // top-1 with every token on expert 0: ranks 1 and 2 receive nothing.
  Routing r;
  r.tokens = 4;
  r.k = 1;
  r.ids = {0, 0, 0, 0};
  r.weights = {1, 1, 1, 1};
  Placement p(PlacementKind::Linear, 3, 3);
  EpPlan pl = make_ep_send_plan(r, p, 0);
  finish_ep_plan(pl, p, std::vector<int>{4, 0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(pl.send_counts == std::vector<int>{4, 0, 0});
  CHECK(pl.recv_counts == std::vector<int>{4, 0, 0});
  CHECK(pl.local_counts == std::vector<int>{4});
}

TEST_CASE("ep plan: simulated expert parallelism equals the single-device reference bit for bit") {
  const int E = 6, H = 16, I = 8, k = 2;
  const MoeLayerWeights full = random_layer(E, H, I, 7);
  for (auto kind : {PlacementKind::Linear, PlacementKind::RoundRobin})
    for (int N : {1, 2, 3, 4}) {
      CAPTURE(N);
      World w = make_world(kind, E, N, k, std::vector<int>(N, 9), 40 + N);
      std::vector<MoeLayerWeights> mine;
      for (int r = 0; r < N; ++r) mine.push_back(subset(full, w.placement.experts_of(r)));
      // per-rank tokens
      Rng rng(99);
      std::vector<std::vector<float>> x(N);
      for (auto& xr : x)
        for (int i = 0; i < 9 * H; ++i) xr.push_back(round_bf16(rng.normal()));
      // dispatch rows of x
      std::vector<std::vector<float>> send(N);
      std::vector<std::vector<int>> sc(N), rc(N);
      for (int s = 0; s < N; ++s) {
        for (int i = 0; i < w.plan[s].send_rows(); ++i) {
          const float* row = &x[s][size_t(w.plan[s].send_token(i)) * H];
          send[s].insert(send[s].end(), row, row + H);
        }
        sc[s] = w.plan[s].send_counts;
        rc[s] = w.plan[s].recv_counts;
      }
      auto recv = alltoallv(send, sc, rc, H);
      // local permute, experts, unpermute
      std::vector<std::vector<float>> out(N);
      for (int d = 0; d < N; ++d) {
        const EpPlan& pl = w.plan[d];
        std::vector<float> yg(size_t(pl.recv_rows()) * H);
        for (int le = 0; le < pl.num_local; ++le)
          for (int g = pl.local_offsets[le]; g < pl.local_offsets[le + 1]; ++g)
            expert_forward_cpu(mine[d], le, &recv[d][size_t(pl.grouped_to_recv[g]) * H], &yg[size_t(g) * H], false);
        out[d].resize(yg.size());
        for (int i = 0; i < pl.recv_rows(); ++i)
          std::copy_n(&yg[size_t(pl.recv_to_grouped[i]) * H], H, &out[d][size_t(i) * H]);
      }
      auto home = alltoallv(out, rc, sc, H);
      // weighted sum on the owning rank, compared with the reference on the same routing
      for (int s = 0; s < N; ++s) {
        std::vector<float> y(size_t(9) * H, 0.f);
        for (int t = 0; t < 9; ++t)
          for (int j = 0; j < k; ++j) {
            const float g = w.routing[s].weight(t, j);
            const float* row = &home[s][size_t(w.plan[s].returned_row(t, j)) * H];
            for (int o = 0; o < H; ++o) y[size_t(t) * H + o] += g * row[o];
          }
        const std::vector<float> ref = moe_experts_reference(full, x[s], w.routing[s]);
        CHECK(max_abs_diff(y, ref) == 0.0);
        CHECK(rel_l2(y, ref) == 0.0);
      }
    }
}

TEST_CASE("ep plan: exchanged counts that disagree are an error") {
  Routing r;
  r.tokens = 2;
  r.k = 1;
  r.ids = {0, 1};
  r.weights = {1, 1};
  Placement p(PlacementKind::Linear, 2, 2);
  EpPlan pl = make_ep_send_plan(r, p, 1);
  CHECK(pl.slot_counts == std::vector<int>{1, 1});
  CHECK_THROWS_AS(finish_ep_plan(pl, p, std::vector<int>{0, 0, 0, 0}), Error);  // own counts changed
  CHECK_THROWS_AS(finish_ep_plan(pl, p, std::vector<int>{1, 1}), Error);        // wrong size
  CHECK_THROWS_AS(make_ep_send_plan(r, p, 2), Error);
  Routing bad = r;
  bad.ids = {0, 5};
  CHECK_THROWS_AS(make_ep_send_plan(bad, p, 0), Error);
}

TEST_CASE("ep plan: EpRowMaps::Skip leaves out the per-row maps and nothing else") {
  for (PlacementKind kind : {PlacementKind::Linear, PlacementKind::RoundRobin})
    for (int N : {1, 2, 3, 4}) {
      CAPTURE(N);
      World w = make_world(kind, 16, N, 2, std::vector<int>(size_t(N), 37), 11);
      std::vector<int> all;
      for (const EpPlan& pl : w.plan) all.insert(all.end(), pl.slot_counts.begin(), pl.slot_counts.end());
      for (int r = 0; r < N; ++r) {
        const EpPlan& full = w.plan[r];
        EpPlan lean = make_ep_send_plan(w.routing[r], w.placement, r);
        finish_ep_plan(lean, w.placement, all, EpRowMaps::Skip);
        CHECK(lean.finished);
        CHECK(lean.recv_counts == full.recv_counts);
        CHECK(lean.recv_offsets == full.recv_offsets);
        CHECK(lean.local_offsets == full.local_offsets);
        CHECK(lean.traffic == full.traffic);
        REQUIRE(lean.recv_segments.size() == full.recv_segments.size());
        for (size_t i = 0; i < full.recv_segments.size(); ++i) {
          CHECK(lean.recv_segments[i].peer == full.recv_segments[i].peer);
          CHECK(lean.recv_segments[i].offset == full.recv_segments[i].offset);
          CHECK(lean.recv_segments[i].rows == full.recv_segments[i].rows);
        }
        CHECK(full.recv_rows() > 0);
        CHECK(full.recv_to_grouped.size() == size_t(full.recv_rows()));
        CHECK(lean.recv_local_expert.empty());
        CHECK(lean.recv_to_grouped.empty());
        CHECK(lean.grouped_to_recv.empty());
      }
    }
}

TEST_CASE("ep plan: a replicated expert's rows go to slot_for(e, t), alternating by token") {
  // 3 experts, 2 ranks, 4 slots: rank 0 {0, 1}, rank 1 {0, 2}; expert 0 has slots 0 and 2.
  const Placement p = Placement::from_slots({0, 1, 0, 2}, 3, 2);
  REQUIRE(p.replicas(0) == std::vector<int>{0, 2});
  Routing r;
  r.tokens = 4;
  r.k = 2;
  r.ids = {0, 1, 0, 2, 0, 1, 1, 0};  // expert 0 in every token, as choice 0 or 1
  r.weights = {1, 1, 1, 1, 1, 1, 1, 1};
  // t even -> slot 0 (rank 0), t odd -> slot 2 (rank 1); the token index decides, not the choice index
  for (int t = 0; t < 4; ++t) CHECK(p.slot_for(0, t) == (t % 2 ? 2 : 0));
  CHECK(routing_in_slots(r, p).ids == std::vector<int>{0, 1, 2, 3, 0, 1, 1, 2});
  EpPlan pl = make_ep_send_plan(r, p, 0);
  CHECK(pl.num_slots == 4);
  CHECK(pl.slot_counts == std::vector<int>{2, 3, 2, 1});  // expert 0: tokens 0, 2 | 1, 3
  CHECK(pl.send_counts == std::vector<int>{5, 3});
  // slot 2's rows are tokens 1 and 3 (choice 0 of token 1, choice 1 of token 3), in token order
  CHECK(pl.send_token(5) == 1);
  CHECK(pl.send_token(6) == 3);
  CHECK(pl.returned_row(1, 0) == 5);
  CHECK(pl.returned_row(3, 1) == 6);
  // rank 1 sends nothing: rank 0 receives its own 5 rows, 2 for its copy of expert 0 and 3 for expert 1
  finish_ep_plan(pl, p, std::vector<int>{2, 3, 2, 1, 0, 0, 0, 0});
  CHECK(pl.recv_counts == std::vector<int>{5, 0});
  CHECK(pl.local_counts == std::vector<int>{2, 3});
  CHECK(pl.traffic == std::vector<int>{5, 3, 0, 0});
}
