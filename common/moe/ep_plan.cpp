#include "moe/ep_plan.hpp"

#include <algorithm>

#include "moe/ep_types.hpp"

#include "util/check.hpp"

namespace eplab {

Routing routing_in_slots(const Routing& r, const Placement& p) {
  Routing s = r;
  for (std::size_t i = 0; i < s.ids.size(); ++i) {
    int& id = s.ids[i];
    require(id >= 0 && id < p.num_experts(), "routing names expert ", id, " but the placement has ", p.num_experts(),
            " experts");
    id = p.slot_for(id, int(i / std::size_t(std::max(r.k, 1))));  // with replicas: by the token's index
  }
  return s;
}

namespace {

// Send counts, offsets and segments from the rows per slot alone.
void set_send_side(EpPlan& plan, const Placement& p) {
  const int N = p.num_ranks(), S = p.num_slots();
  std::vector<int> slot_offsets(S + 1, 0);
  for (int s = 0; s < S; ++s) slot_offsets[s + 1] = slot_offsets[s] + plan.slot_counts[s];
  plan.send_counts.assign(N, 0);
  plan.send_offsets.assign(N + 1, 0);
  plan.send_segments.clear();
  for (int d = 0; d < N; ++d) {
    plan.send_offsets[d + 1] = slot_offsets[p.first_slot(d + 1)];
    plan.send_counts[d] = plan.send_offsets[d + 1] - plan.send_offsets[d];
    for (int s = p.first_slot(d); s < p.first_slot(d + 1); ++s)
      if (plan.slot_counts[s] > 0) plan.send_segments.push_back({d, slot_offsets[s], plan.slot_counts[s]});
  }
}

EpPlan empty_plan(const Placement& p, int rank) {
  require(rank >= 0 && rank < p.num_ranks(), "ep plan: rank ", rank, " out of range [0, ", p.num_ranks(), ")");
  EpPlan plan;
  plan.rank = rank;
  plan.ranks = p.num_ranks();
  plan.num_experts = p.num_experts();
  plan.num_slots = p.num_slots();
  plan.num_local = p.num_local(rank);
  return plan;
}

}  // namespace

EpPlan make_ep_send_plan(const Routing& routing, const Placement& p, int rank) {
  require(routing.ids.size() == size_t(routing.tokens) * routing.k, "ep plan: routing has ", routing.ids.size(),
          " ids for ", routing.tokens, " tokens x k=", routing.k);
  EpPlan plan = empty_plan(p, rank);
  plan.tokens = routing.tokens;
  plan.k = routing.k;
  // Sorting by slot = sorting by (destination rank, local expert); make_dispatch_plan's stable scatter
  // keeps token order inside each slot.
  plan.by_slot = make_dispatch_plan(routing_in_slots(routing, p), p.num_slots());
  plan.slot_counts = plan.by_slot.counts;
  set_send_side(plan, p);
  return plan;
}

EpPlan make_ep_counts_plan(const Placement& p, int rank, std::span<const int> slot_counts) {
  require(slot_counts.size() == size_t(p.num_slots()), "ep plan: expected ", p.num_slots(), " slot counts, got ",
          slot_counts.size());
  EpPlan plan = empty_plan(p, rank);
  plan.slot_counts.assign(slot_counts.begin(), slot_counts.end());
  for (int c : plan.slot_counts) require(c >= 0, "ep plan: negative row count ", c);
  set_send_side(plan, p);
  return plan;
}

void finish_ep_plan(EpPlan& plan, const Placement& p, std::span<const int> all, EpRowMaps row_maps) {
  const int N = p.num_ranks(), E = p.num_slots(), me = plan.rank, L = plan.num_local;  // E: slots here
  require(plan.ranks == N && plan.num_slots == E, "ep plan: placement changed between the two steps");
  require(all.size() == size_t(N) * E, "ep plan: expected ", size_t(N) * E, " slot counts (", N, " ranks x ", E,
          " slots), got ", all.size());
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
  const bool maps = row_maps == EpRowMaps::Build;
  plan.recv_local_expert.resize(maps ? R : 0);
  plan.recv_to_grouped.resize(maps ? R : 0);
  plan.grouped_to_recv.resize(maps ? R : 0);
  std::vector<int> cursor(plan.local_offsets.begin(), plan.local_offsets.end() - 1);
  plan.recv_segments.clear();
  int i = 0;
  for (int s = 0; s < N; ++s)
    for (int le = 0; le < L; ++le) {
      const int rows = all[size_t(s) * E + my0 + le];
      if (rows > 0) plan.recv_segments.push_back({s, cursor[le], rows});
      if (!maps) {
        cursor[le] += rows;
        continue;
      }
      for (int c = 0; c < rows; ++c, ++i) {
        const int g = cursor[le]++;
        plan.recv_local_expert[i] = le;
        plan.recv_to_grouped[i] = g;
        plan.grouped_to_recv[g] = i;
      }
    }
  plan.finished = true;
}

const char* layout_name(EpLayout l) {
  switch (l) {
    case EpLayout::Permute: return "permute";
    case EpLayout::Direct: return "direct";
    case EpLayout::InPlace: return "inplace";
  }
  return "?";
}

EpLayout parse_layout(const std::string& s) {
  if (s == "permute") return EpLayout::Permute;
  if (s == "direct") return EpLayout::Direct;
  if (s == "inplace") return EpLayout::InPlace;
  fail("unknown --layout '", s, "' (use permute, direct or inplace)");
}

}  // namespace eplab
