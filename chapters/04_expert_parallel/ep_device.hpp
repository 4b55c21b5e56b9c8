// Where an EP chapter runs: --device auto|gpu|cpu -> the NCCL path (one GPU per rank) or the MPI path on
// the CPU, the same answer on every rank. Chapters 04 and 06 use it.
#pragma once
#include <string>

#include "dist/communicator.hpp"

namespace eplab {

// gpu: yes; cpu: no; auto: yes when NCCL is built and every rank has a GPU of its own (rank 0 says why not).
bool choose_ep_gpu(dist::Communicator& mpi, const std::string& device);

}  // namespace eplab
