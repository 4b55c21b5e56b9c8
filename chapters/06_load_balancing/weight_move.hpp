// Rebalancing moves weights: after EPLB picks a new map, every rank must hold the experts of its new slots.
// An expert the rank already holds is copied locally; one it lacks is sent by a rank that held it (the
// expert's first replica in the old map), one message per (source, destination, expert), all in one exchange.
#pragma once
#include <cstdint>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/placement.hpp"

namespace eplab {

struct MoveStats {
  double ms = 0;                     // the whole move on this rank (packing, exchange, unpacking)
  std::int64_t local = 0, received = 0, sent = 0;  // experts copied here / received / sent by this rank
  double bytes_received = 0;
};

// mine: this rank's weights under `from` (weights_for_slots order). Returns them under `to`. Collective.
// A device communicator (NCCL) moves device buffers: the packed weights are staged through the GPU.
MoeLayerWeights move_expert_weights(dist::Communicator& comm, const MoeLayerWeights& mine, const Placement& from,
                                    const Placement& to, MoveStats& stats);

}  // namespace eplab
