// Expert placement: which rank (GPU) holds which expert of a layer, for expert parallelism.
//
// Two maps, as in vLLM's `determine_expert_map` / `--expert-placement-strategy`:
//   linear       rank r holds a contiguous block of experts       E=8, N=4: r0 {0,1}  r1 {2,3}  r2 {4,5}  r3 {6,7}
//   round-robin  expert e lives on rank e mod N                    E=8, N=4: r0 {0,4}  r1 {1,5}  r2 {2,6}  r3 {3,7}
//
// When N does not divide E we do what vLLM does: the first E mod N ranks take one expert more
// (E=16, N=3, linear: r0 {0..5}, r1 {6..10}, r2 {11..15}; round-robin gives the same sizes by itself).
// The busiest rank then sets the pace, so an uneven split costs about ceil(E/N)/(E/N) in expert time.
// N > E is an error: a rank with no expert would have nothing to compute.
//
// A rank's experts are kept in ascending global id; an expert's *local index* is its position there.
// The *slot* of an expert is its position in rank-major order (rank 0's experts, then rank 1's, ...):
// sorting rows by slot groups them by destination rank, then by local expert, which is exactly the
// order an all-to-all dispatch sends them in. For the linear map slot == expert id.
//
// Replicas (load balancing, chapter 06): a third kind is built from an explicit physical -> logical map
// (EPLB's phy2log): S >= E physical slots, S / N on each rank in order, slot s holding a copy of logical
// expert phy2log[s]; a hot expert may have several slots. A row routed to expert e then goes to one of
// its replicas, slot_for(e, t) = replicas(e)[t mod count], t the token's index on its rank (vLLM uses the
// flat (token, choice) position instead; both need no state), and everything downstream (plan, dispatch,
// experts, combine) works on slots. With few tokens per rank the spread is uneven: a rank with one token
// always picks the first replica. Without
// replicas S = E and every expert has exactly one slot.
#pragma once
#include <string>
#include <vector>

namespace eplab {

enum class PlacementKind { Linear, RoundRobin, Map };  // Map: from_slots (replicas allowed)
const char* placement_name(PlacementKind k);            // "linear" | "round-robin"
PlacementKind parse_placement(const std::string& name);  // throws eplab::Error on anything else

class Placement {
 public:
  // Throws eplab::Error when num_ranks > num_experts or either is < 1.
  Placement(PlacementKind kind, int num_experts, int num_ranks);
  // phy2log[s]: the logical expert in physical slot s; S = phy2log.size() must be a multiple of N (rank r
  // holds slots [r*S/N, (r+1)*S/N)), every id in [0, num_experts), every expert in at least one slot.
  // Throws eplab::Error (one line) otherwise.
  static Placement from_slots(std::vector<int> phy2log, int num_experts, int num_ranks);

  PlacementKind kind() const { return kind_; }
  int num_experts() const { return num_experts_; }
  int num_ranks() const { return num_ranks_; }
  bool even() const { return num_slots() % num_ranks_ == 0; }

  // With replicas, owner / local_index / slot name the expert's FIRST replica.
  int owner(int expert) const;                      // the rank that holds `expert`
  int local_index(int expert) const;                // its index among its owner's experts
  // The logical expert of each of the rank's slots, in slot order (ascending ids without replicas).
  const std::vector<int>& experts_of(int rank) const;
  int num_local(int rank) const { return int(experts_of(rank).size()); }  // slots on the rank
  int max_local() const;                            // slots on the busiest rank
  int global_id(int rank, int local) const;         // inverse of (owner, local_index)

  int slot(int expert) const;            // position in rank-major order (see above)
  int first_slot(int rank) const;        // slot of the rank's local expert 0; first_slot(N) = num_slots()
  int expert_at_slot(int slot) const;    // the logical expert in a slot (phy2log)

  int num_slots() const { return int(at_slot_.size()); }  // S: E without replicas
  bool has_replicas() const { return num_slots() > num_experts_; }
  const std::vector<int>& replicas(int expert) const;     // its slots, ascending (one without replicas)
  int max_replicas() const { return max_replicas_; }
  int slot_for(int expert, int token) const;              // replicas(expert)[token mod count]

  // "expert map (round-robin, 16 experts on 4 ranks, 4 per rank)" then one line per rank, then
  // "expert -> rank" as a row, ready to print.
  std::string str() const;

 private:
  Placement(PlacementKind kind, int num_experts, int num_ranks, std::vector<int> phy2log);
  void index_slots();  // owner_, local_, slot_, replicas_ from at_slot_ and first_slot_

  PlacementKind kind_;
  int num_experts_, num_ranks_, max_replicas_ = 1;
  std::vector<int> owner_, local_, slot_, at_slot_, first_slot_;
  std::vector<std::vector<int>> experts_, replicas_;
};

}  // namespace eplab
