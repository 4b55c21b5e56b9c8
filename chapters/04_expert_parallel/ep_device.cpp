#include "ep_device.hpp"

#include <cstdio>
#include <span>

#include "device.hpp"
#include "util/report.hpp"

namespace eplab {

bool choose_ep_gpu(dist::Communicator& mpi, const std::string& device) {
  if (device == "gpu") return true;
  if (device == "cpu") return false;
  std::string reason;
  const int n = gpu_count(&reason);
  int ok = dist::nccl_compiled() && n >= mpi.local_size();
  if (!dist::nccl_compiled()) reason = "this build has no NCCL";
  else if (n > 0 && n < mpi.local_size()) reason = strf("%d ranks on this node but %d GPU(s)", mpi.local_size(), n);
  const auto all = mpi.allgather_int(std::span<const int>(&ok, 1));
  for (int r = 0; r < mpi.size(); ++r)
    if (!all[r]) {
      if (mpi.rank() == 0)
        std::printf("device: CPU, MPI backend (--device auto: %s)\n",
                    r == mpi.rank() ? reason.c_str() : strf("rank %d has no GPU of its own", r).c_str());
      return false;
    }
  return true;
}

}  // namespace eplab
