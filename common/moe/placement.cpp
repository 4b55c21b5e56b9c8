#include "moe/placement.hpp"

#include <algorithm>

#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

const char* placement_name(PlacementKind k) {
  switch (k) {
    case PlacementKind::Linear: return "linear";
    case PlacementKind::RoundRobin: return "round-robin";
    case PlacementKind::Map: return "map";
  }
  return "?";
}

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
  for (int r = 0; r < N; ++r) at_slot_.insert(at_slot_.end(), experts_[r].begin(), experts_[r].end());
  index_slots();
}

Placement::Placement(PlacementKind kind, int E, int N, std::vector<int> phy2log)
    : kind_(kind), num_experts_(E), num_ranks_(N), at_slot_(std::move(phy2log)) {
  const int S = int(at_slot_.size());
  require(E >= 1, "placement: the layer must have at least one expert, got ", E);
  require(N >= 1, "placement: need at least one rank, got ", N);
  require(S >= E, "placement map: ", S, " slots cannot hold ", E, " experts");
  require(S % N == 0, "placement map: ", S, " slots do not split evenly over ", N, " ranks");
  std::vector<int> seen(E, 0);
  for (int s = 0; s < S; ++s) {
    require(at_slot_[s] >= 0 && at_slot_[s] < E, "placement map: slot ", s, " holds expert ", at_slot_[s],
            ", outside [0, ", E, ")");
    ++seen[at_slot_[s]];
  }
  for (int e = 0; e < E; ++e) require(seen[e] > 0, "placement map: expert ", e, " has no slot");
  experts_.assign(N, {});
  first_slot_.assign(N + 1, 0);
  for (int r = 0; r < N; ++r) {
    first_slot_[r + 1] = (r + 1) * (S / N);
    experts_[r].assign(at_slot_.begin() + first_slot_[r], at_slot_.begin() + first_slot_[r + 1]);
  }
  index_slots();
}

Placement Placement::from_slots(std::vector<int> phy2log, int num_experts, int num_ranks) {
  return Placement(PlacementKind::Map, num_experts, num_ranks, std::move(phy2log));
}

void Placement::index_slots() {
  const int E = num_experts_, S = num_slots();
  owner_.assign(E, -1);
  local_.assign(E, -1);
  slot_.assign(E, -1);
  replicas_.assign(E, {});
  for (int r = 0; r < num_ranks_; ++r)
    for (int s = first_slot_[r]; s < first_slot_[r + 1]; ++s) {
      const int e = at_slot_[s];
      if (slot_[e] < 0) {  // the first replica names the expert's owner, local index and slot
        owner_[e] = r;
        local_[e] = s - first_slot_[r];
        slot_[e] = s;
      }
      replicas_[e].push_back(s);
    }
  max_replicas_ = 1;
  for (const auto& r : replicas_) max_replicas_ = std::max(max_replicas_, int(r.size()));
  (void)S;
}

const std::vector<int>& Placement::replicas(int e) const {
  require(e >= 0 && e < num_experts_, "placement: expert ", e, " out of range [0, ", num_experts_, ")");
  return replicas_[e];
}

int Placement::slot_for(int e, int token) const {
  const std::vector<int>& r = replicas(e);
  return r[std::size_t(token) % r.size()];
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
int Placement::max_local() const {
  int m = 0;
  for (const auto& ex : experts_) m = std::max(m, int(ex.size()));
  return m;
}
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
  require(s >= 0 && s < num_slots(), "placement: slot ", s, " out of range [0, ", num_slots(), ")");
  return at_slot_[s];
}

std::string Placement::str() const {
  std::string s = strf("expert map (%s, %d experts on %d ranks, ", placement_name(kind_), num_experts_, num_ranks_);
  if (kind_ == PlacementKind::Map)
    s += strf("%d slots: %d per rank, %d replicas)\n", num_slots(), num_slots() / num_ranks_,
              num_slots() - num_experts_);
  else if (even())
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
  for (int e = 0; e < num_experts_; ++e) {
    s += strf(" %d:%d", e, owner_[e]);
    for (std::size_t i = 1; i < replicas_[e].size(); ++i) {  // further replicas: "+rank"
      int r = 0;
      while (first_slot_[r + 1] <= replicas_[e][i]) ++r;
      s += strf("+%d", r);
    }
  }
  s += "\n";
  return s;
}

}  // namespace eplab
