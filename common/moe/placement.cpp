#include "moe/placement.hpp"

#include <algorithm>

#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

const char* placement_name(PlacementKind k) { return k == PlacementKind::Linear ? "linear" : "round-robin"; }

PlacementKind parse_placement(const std::string& name) {
  if (name == "linear") return PlacementKind::Linear;
  if (name == "round-robin" || name == "round_robin" || name == "roundrobin") return PlacementKind::RoundRobin;
  fail("unknown placement '", name, "' (use linear or round-robin)");
}

Placement::Placement(PlacementKind kind, int E, int N) : kind_(kind), num_experts_(E), num_ranks_(N) {
  require(E >= 1, "placement: the layer must have at least one expert, got ", E);
  require(N >= 1, "placement: need at least one rank, got ", N);
  require(N <= E, N, " ranks but the layer has only ", E,
          " experts: expert parallelism gives every rank at least one expert (run with -np <= ", E, ")");
  owner_.resize(E);
  local_.resize(E);
  experts_.assign(N, {});
  // vLLM's rule for uneven splits: the first E mod N ranks hold base+1 experts.
  const int base = E / N, extra = E % N;
  for (int r = 0; r < N; ++r) {
    const int n = base + (r < extra ? 1 : 0);
    for (int i = 0; i < n; ++i) {
      // linear: a contiguous block starting after the blocks of ranks < r.
      // round-robin: every N-th expert starting at r; ascending, so local index i.
      const int e = kind == PlacementKind::Linear ? r * base + std::min(r, extra) + i : r + i * N;
      owner_[e] = r;
      local_[e] = i;
      experts_[r].push_back(e);
    }
  }
  first_slot_.assign(N + 1, 0);
  for (int r = 0; r < N; ++r) first_slot_[r + 1] = first_slot_[r] + int(experts_[r].size());
  slot_.resize(E);
  at_slot_.resize(E);
  for (int e = 0; e < E; ++e) {
    slot_[e] = first_slot_[owner_[e]] + local_[e];
    at_slot_[slot_[e]] = e;
  }
}

int Placement::owner(int e) const {
  require(e >= 0 && e < num_experts_, "placement: expert ", e, " out of range [0, ", num_experts_, ")");
  return owner_[e];
}
int Placement::local_index(int e) const {
  require(e >= 0 && e < num_experts_, "placement: expert ", e, " out of range [0, ", num_experts_, ")");
  return local_[e];
}
const std::vector<int>& Placement::experts_of(int r) const {
  require(r >= 0 && r < num_ranks_, "placement: rank ", r, " out of range [0, ", num_ranks_, ")");
  return experts_[r];
}
int Placement::max_local() const { return (num_experts_ + num_ranks_ - 1) / num_ranks_; }
int Placement::global_id(int r, int local) const {
  const auto& ex = experts_of(r);
  require(local >= 0 && local < int(ex.size()), "placement: rank ", r, " has no local expert ", local);
  return ex[local];
}
int Placement::slot(int e) const {
  require(e >= 0 && e < num_experts_, "placement: expert ", e, " out of range [0, ", num_experts_, ")");
  return slot_[e];
}
int Placement::first_slot(int r) const {
  require(r >= 0 && r <= num_ranks_, "placement: rank ", r, " out of range [0, ", num_ranks_, "]");
  return first_slot_[r];
}
int Placement::expert_at_slot(int s) const {
  require(s >= 0 && s < num_experts_, "placement: slot ", s, " out of range [0, ", num_experts_, ")");
  return at_slot_[s];
}

std::string Placement::str() const {
  std::string s = strf("expert map (%s, %d experts on %d ranks, ", placement_name(kind_), num_experts_, num_ranks_);
  if (even())
    s += strf("%d per rank)\n", num_experts_ / num_ranks_);
  else
    s += num_experts_ % num_ranks_ == 1
             ? strf("uneven: rank 0 holds %d, the others %d)\n", max_local(), num_experts_ / num_ranks_)
             : strf("uneven: ranks 0-%d hold %d, the others %d)\n", num_experts_ % num_ranks_ - 1, max_local(),
                    num_experts_ / num_ranks_);
  const int w = num_ranks_ > 10 ? 2 : 1;
  for (int r = 0; r < num_ranks_; ++r) {
    s += strf("  rank %*d: experts", w, r);
    for (int e : experts_[r]) s += strf(" %d", e);
    s += "\n";
  }
  s += "  expert -> rank:";
  for (int e = 0; e < num_experts_; ++e) s += strf(" %d:%d", e, owner_[e]);
  s += "\n";
  return s;
}

}  // namespace eplab
