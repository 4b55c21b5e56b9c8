#include "moe/ep_plan.hpp"

#include "util/check.hpp"

namespace eplab {

Routing routing_in_slots(const Routing& r, const Placement& p) {
  Routing s = r;
  for (int& id : s.ids) {
    require(id >= 0 && id < p.num_experts(), "routing names expert ", id, " but the placement has ", p.num_experts(),
            " experts");
    id = p.slot(id);
  }
  return s;
}

EpPlan make_ep_send_plan(const Routing& routing, const Placement& p, int rank) {
  require(rank >= 0 && rank < p.num_ranks(), "ep plan: rank ", rank, " out of range [0, ", p.num_ranks(), ")");
  require(routing.ids.size() == size_t(routing.tokens) * routing.k, "ep plan: routing has ", routing.ids.size(),
          " ids for ", routing.tokens, " tokens x k=", routing.k);
  const int N = p.num_ranks(), E = p.num_experts();
  EpPlan plan;
  plan.rank = rank;
  plan.ranks = N;
  plan.tokens = routing.tokens;
  plan.k = routing.k;
  plan.num_experts = E;
  plan.num_local = p.num_local(rank);
  // Sorting by slot = sorting by (destination rank, local expert); make_dispatch_plan's stable scatter
  // keeps token order inside each slot.
  plan.by_slot = make_dispatch_plan(routing_in_slots(routing, p), E);
  plan.slot_counts = plan.by_slot.counts;
  plan.send_counts.assign(N, 0);
  plan.send_offsets.assign(N + 1, 0);
  for (int d = 0; d < N; ++d) {
    plan.send_offsets[d + 1] = plan.by_slot.offsets[p.first_slot(d + 1)];
    plan.send_counts[d] = plan.send_offsets[d + 1] - plan.send_offsets[d];
  }
  return plan;
}

void finish_ep_plan(EpPlan& plan, const Placement& p, std::span<const int> all) {
  const int N = p.num_ranks(), E = p.num_experts(), me = plan.rank, L = plan.num_local;
  require(plan.ranks == N && plan.num_experts == E, "ep plan: placement changed between the two steps");
  require(all.size() == size_t(N) * E, "ep plan: expected ", size_t(N) * E, " slot counts (", N, " ranks x ", E,
          " experts), got ", all.size());
  for (int s = 0; s < E; ++s)
    require(all[size_t(me) * E + s] == plan.slot_counts[s], "ep plan: rank ", me,
            "'s own counts came back changed from the exchange (ranks out of step?)");
  for (int v : all) require(v >= 0, "ep plan: negative row count ", v, " in the exchanged counts");

  plan.traffic.assign(size_t(N) * N, 0);
  for (int s = 0; s < N; ++s)
    for (int d = 0; d < N; ++d)
      for (int sl = p.first_slot(d); sl < p.first_slot(d + 1); ++sl) plan.traffic[size_t(s) * N + d] += all[size_t(s) * E + sl];

  // Receive side: rank s's block holds its rows for my slots, in slot (= local expert) order.
  const int my0 = p.first_slot(me);
  plan.recv_counts.assign(N, 0);
  plan.recv_offsets.assign(N + 1, 0);
  plan.local_counts.assign(L, 0);
  for (int s = 0; s < N; ++s) {
    plan.recv_counts[s] = plan.traffic[size_t(s) * N + me];
    plan.recv_offsets[s + 1] = plan.recv_offsets[s] + plan.recv_counts[s];
    for (int le = 0; le < L; ++le) plan.local_counts[le] += all[size_t(s) * E + my0 + le];
  }
  plan.local_offsets.assign(L + 1, 0);
  for (int le = 0; le < L; ++le) plan.local_offsets[le + 1] = plan.local_offsets[le] + plan.local_counts[le];

  const int R = plan.recv_rows();
  plan.recv_local_expert.resize(R);
  plan.recv_to_grouped.resize(R);
  plan.grouped_to_recv.resize(R);
  std::vector<int> cursor(plan.local_offsets.begin(), plan.local_offsets.end() - 1);
  int i = 0;
  for (int s = 0; s < N; ++s)
    for (int le = 0; le < L; ++le)
      for (int c = 0; c < all[size_t(s) * E + my0 + le]; ++c, ++i) {
        const int g = cursor[le]++;
        plan.recv_local_expert[i] = le;
        plan.recv_to_grouped[i] = g;
        plan.grouped_to_recv[g] = i;
      }
  plan.finished = true;
}

}  // namespace eplab
