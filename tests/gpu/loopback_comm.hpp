// N simulated ranks in ONE process on ONE GPU: a host thread per rank, each with its own stream, and a
// Communicator whose exchanges are device-to-device copies between the ranks' buffers. It lets a 1-GPU
// machine run the EP engine's multi-rank paths (pieces, segments, blocks from several peers) that NCCL
// would need one GPU per rank for (NCCL refuses two ranks on one GPU: "Duplicate GPU detected").
//
// Semantics follow the NCCL backend: buffers in device memory, exchanges queued on stream(), messages
// between two ranks matched in the order they are listed, sync() waits for the stream. Every exchange is
// a collective step of all ranks (as an NCCL group is): each rank publishes its send buffer, its lists
// and an event recorded after the work that filled the buffer; each receiver's stream waits for its
// senders' events and copies its messages in; then every sender's stream waits for the copies that read
// its buffer, so work queued after the exchange may overwrite it.
//
// run_loopback_ranks(N, body) starts the N threads on GPU 0 and returns when all are done; the first
// exception thrown by a rank is rethrown (the other ranks are stopped at their next collective).
#pragma once
#include <functional>

#include "dist/communicator.hpp"

namespace eplab::testing {

void run_loopback_ranks(int N, const std::function<void(dist::Communicator& comm)>& body);

}  // namespace eplab::testing
