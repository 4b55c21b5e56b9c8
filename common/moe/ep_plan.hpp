// The expert-parallel dispatch plan of one rank: which rows it sends to which rank, what it receives,
// and how the rows come back. Pure host code; the MPI and NCCL paths of chapter 04 both follow it.
//
// Built in two steps, because a rank learns what it *receives* only from the other ranks' counts:
//
//  1. make_ep_send_plan(routing, placement, rank)            local, from this rank's routing alone
//       Every expert id is relabelled to its slot (placement.hpp: rank-major order), and the ordinary
//       dispatch plan (make_dispatch_plan) is built over slots. Its rows are then grouped by destination
//       rank, then by local expert on that rank, then by token (stable): the all-to-all send buffer.
//       slot_counts[s] (rows for each slot) is what the rank announces to the others.
//  2. finish_ep_plan(plan, placement, all_slot_counts)      after an allgather of every rank's slot_counts
//       Rows from rank s arrive as one block, ordered by local expert; so the receiver knows the local
//       expert of every row without any id travelling with it. The local permute regroups the received
//       rows by local expert (all sources), stable: source rank, then the source's order.
//
//   send row i       carries token by_slot.assignment[i] / k to rank dest(i)
//   recv row i       came from the rank whose block holds i; local expert recv_local_expert[i]
//   grouped row g    = recv row grouped_to_recv[g]; local expert e owns [local_offsets[e], local_offsets[e+1])
//   combine          the reverse all-to-all returns row i to the same place in the send buffer, so the
//                    output of (token t, choice j) is returned row by_slot.row_of[t*k + j]
//
// Segments (the "direct" layout). The send buffer is cut at every (destination rank, local expert)
// boundary, and rank s's rows for my local expert e have a known place in my expert-grouped buffer
// (stable order: source rank, then the source's order). Sending one message per non-empty segment and
// receiving each straight into that place gives the grouped buffer with no local permute; the combine
// sends the segments back the same way. Messages between one pair of ranks are matched in the order
// they are posted (NCCL and MPI both guarantee this), so both sides list segments in local-expert order.
#pragma once
#include <span>
#include <vector>

#include "moe/dispatch_plan.hpp"
#include "moe/placement.hpp"

namespace eplab {

// How the rows of an EP exchange travel: one all-to-all-v per direction plus a local permute on the
// receiver (Permute, the textbook flow), or one message per segment received straight into expert
// order (Direct, see "Segments" above), or (InPlace, GPU only: kernels/ep/ep_moe_gpu.hpp) one message per
// peer and the experts run straight on the arrival buffer, one GEMM group per (source rank, local expert)
// segment, with this rank's own rows never entering the exchange. The CPU block treats InPlace as Permute.
enum class EpLayout { Permute, Direct, InPlace };

struct EpPlan {
  struct Segment {
    int peer = 0;    // the other rank
    int offset = 0;  // first row in this rank's buffer (send buffer / expert-grouped buffer)
    int rows = 0;    // > 0: empty segments are left out on both sides
  };

  int rank = 0, ranks = 0, tokens = 0, k = 0, num_experts = 0, num_local = 0;
  int num_slots = 0;  // = num_experts without replicas (placement.hpp); every per-slot array has this size

  // --- step 1: the send side
  DispatchPlan by_slot;            // make_dispatch_plan over slot ids (num_slots "experts")
  std::vector<int> slot_counts;    // [S] rows this rank sends to each slot (= by_slot.counts)
  std::vector<int> send_counts;    // [N] rows to each rank
  std::vector<int> send_offsets;   // [N+1] exclusive prefix sum: rank d's rows are [send_offsets[d], send_offsets[d+1])

  // --- step 2: the receive side
  std::vector<int> traffic;            // [N*N] rows sent from rank s to rank d at [s*N + d]
  std::vector<int> recv_counts;        // [N] rows from each rank
  std::vector<int> recv_offsets;       // [N+1]
  // The per-row maps: empty when finish_ep_plan ran with EpRowMaps::Skip.
  std::vector<int> recv_local_expert;  // [R] local expert index of each received row
  std::vector<int> local_counts;       // [n_local] rows per local expert, all sources together
  std::vector<int> local_offsets;      // [n_local+1]
  std::vector<int> recv_to_grouped;    // [R] received row -> row of the expert-grouped buffer
  std::vector<int> grouped_to_recv;    // [R] the inverse
  std::vector<Segment> send_segments;  // send buffer, by (destination, local expert); peer = destination
  std::vector<Segment> recv_segments;  // grouped buffer, by (source, local expert); peer = source
  bool finished = false;

  int send_rows() const { return tokens * k; }
  int recv_rows() const { return recv_offsets.empty() ? 0 : recv_offsets.back(); }
  // The returned row that holds the output of token t's j-th choice (after the reverse exchange).
  int returned_row(int t, int j) const { return by_slot.row_of[size_t(t) * k + j]; }
  int send_token(int send_row) const { return by_slot.assignment[send_row] / k; }
};

// The routing with every expert id replaced by its slot (weights unchanged); with replicas, token t's
// choice of expert e goes to placement.slot_for(e, t).
Routing routing_in_slots(const Routing& routing, const Placement& placement);

EpPlan make_ep_send_plan(const Routing& routing, const Placement& placement, int rank);

// Step 1 when the dispatch plan over slots was built elsewhere (on the GPU, by build_dispatch_plan on
// slot ids): only the rows per slot are known here. by_slot stays empty; everything else is the same.
EpPlan make_ep_counts_plan(const Placement& placement, int rank, std::span<const int> slot_counts);

// Whether finish_ep_plan fills the per-row maps (recv_local_expert, recv_to_grouped, grouped_to_recv:
// R entries each). Only the Permute layout reads them; the others need the counts and segments alone,
// and skipping the maps keeps the host's part of the dispatch O(N * E) instead of O(R). (On the GPU
// path this host work sits between the count exchange and the row exchange: at 32768 received rows
// the maps cost ~0.1 ms there.)
enum class EpRowMaps { Build, Skip };

// all_slot_counts: [N * S], rank s's slot_counts at [s*S, (s+1)*S) (an allgather of slot_counts).
// Throws eplab::Error if the counts disagree with this rank's own (a sign of ranks out of step).
void finish_ep_plan(EpPlan& plan, const Placement& placement, std::span<const int> all_slot_counts,
                    EpRowMaps row_maps = EpRowMaps::Build);

}  // namespace eplab
