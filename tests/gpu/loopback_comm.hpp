// N simulated ranks in ONE process on ONE GPU: a host thread per rank, each with its own stream, and a
// Communicator whose exchanges are device-to-device copies between the ranks' buffers. It lets a 1-GPU
// machine run the EP engine's multi-rank paths (pieces, segments, blocks from several peers) that NCCL
// would need one GPU per rank for (NCCL refuses two ranks on one GPU: "Duplicate GPU detected").
//
// Semantics follow the NCCL backend: buffers in device memory, exchanges queued on stream(), sync() waits
// for the stream, and the messages between two ranks are matched in the order they were posted, whatever
// exchange call posted them (a rank with nothing to send or receive may skip a call). A receiver's stream
// waits for its sender's work before copying; a sender's exchange call returns once every one of its
// messages has been taken, and its stream then waits for those copies, so work queued after the call may
// overwrite the send buffer (as after an NCCL group). The host-side collectives (barrier, allgather, ...)
// are barriers of all ranks.
//
// run_loopback_ranks(N, body) starts the N threads on GPU 0 and returns when all are done; the first
// exception thrown by a rank is rethrown (the other ranks are stopped at their next collective).
#pragma once
#include <functional>

#include "dist/communicator.hpp"

namespace eplab::testing {

void run_loopback_ranks(int N, const std::function<void(dist::Communicator& comm)>& body);

}  // namespace eplab::testing
