// One interface for the collectives expert parallelism needs, with two backends:
//   MPI   host buffers, MPI_Alltoallv            (laptops: `mpirun -np 4 ... --device cpu`)
//   NCCL  device buffers, grouped ncclSend/Recv  (one GPU per rank; the NCCL id is broadcast over MPI)
// Small host-side control messages (counts, flags, timings) always go over MPI, in both backends.
//
// Failing together. A rank that stops while the others wait in a collective would hang the job, so:
//  * all_or_none(comm, step) runs a set-up step on every rank, then agrees (one allgather) on whether
//    it worked everywhere. If it failed anywhere, EVERY rank throws a CollectiveError (its own message,
//    or which rank failed), and mpi_main ends every rank with exit code 2 after a clean MPI_Finalize.
//  * Any other error (in the middle of an exchange) is local: mpi_main prints it and calls
//    Communicator::abort, which aborts NCCL (ncclCommAbort) and then MPI_Abort: every rank dies.
//  * NCCL: sync() polls the stream and ncclCommGetAsyncError; a watchdog thread does the same while the
//    host is blocked elsewhere. An asynchronous NCCL error, or an exchange that does not finish within
//    EPLAB_COMM_TIMEOUT_S seconds (default 60), prints one line, aborts the NCCL communicator, and exits
//    non-zero; mpirun then takes the other ranks down.
//  * NCCL: the host-side collectives (barrier, allgather, bcast, gather, max, sum, over MPI) are watched
//    by the same thread with the same limit: ranks that call different collectives (a bug: a branch
//    taken on some ranks only) would otherwise wait in MPI forever with no NCCL work to time out.
//  * MPI: every wait (collectives, exchange, and mpi_main's barrier before MPI_Finalize) is posted
//    non-blocking and polled on the main thread with the same limit, EPLAB_COMM_TIMEOUT_S (default 60).
//    Past it the rank asks the others, over a private communicator, which wait they are in: the ranks
//    that do not answer are dead or stuck outside MPI. One line names them and MPI_Abort ends the job:
//      error: rank 0/3 (host): watchdog: waited 60 s in allgather (MPI) for rank 1, which does not answer: ...
//    (or, when every rank answers, which different collectives they wait in). mpi_communicator.cpp.
//  * A wait that is long on purpose (rank 0 checking against the CPU reference while the others wait
//    for its verdict) is bracketed by set_long_wait(true) / set_long_wait(false): no limit meanwhile.
//  * A rank that dies (crash, exit) makes mpirun kill the others ("mpirun noticed that process rank ...");
//    where it does not, the watchdog names it after the limit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "util/check.hpp"

struct CUstream_st;  // cudaStream_t without pulling the CUDA headers into host-only code

namespace eplab::dist {

// Thrown on every rank at once by all_or_none (so every rank can exit cleanly).
struct CollectiveError : Error {
  using Error::Error;
  bool print = true;  // false on ranks that stay quiet because rank 0 prints the same message
};

enum class Memory { Host, Device };

// One point-to-point message of `rows` rows, starting at row `offset` of the send or receive buffer.
struct Transfer {
  int peer = 0;
  std::size_t offset = 0, rows = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* backend() const = 0;  // "mpi" | "nccl"
  virtual Memory memory() const = 0;        // where alltoallv's buffers must live
  virtual std::string describe() const = 0;  // "NCCL 2.28.9 on GPU 0 (NVIDIA H200)", for the report

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // rank among the ranks of this node
  int local_size() const { return local_size_; }
  const std::string& host() const { return host_; }
  std::string who() const;  // "rank 1/4 (node0)"

  virtual void barrier() = 0;
  // Every rank passes n values (the same n everywhere); everyone gets size()*n, rank r's at [r*n, (r+1)*n).
  virtual std::vector<std::int64_t> allgather(std::span<const std::int64_t> mine) = 0;
  std::vector<int> allgather_int(std::span<const int> mine);
  virtual void bcast(void* host_buffer, std::size_t bytes, int root) = 0;
  // Host memory: every rank sends `bytes` bytes; root receives size()*bytes, rank r's at [r*bytes, ...).
  virtual void gather(const void* send, std::size_t bytes, void* recv_at_root, int root) = 0;
  virtual double max(double v) = 0;  // over all ranks
  virtual double sum(double v) = 0;

  // All-to-all-v of rows of `row_bytes` bytes. send holds send_counts[0] rows for rank 0, then
  // send_counts[1] rows for rank 1, ...; recv gets recv_counts[s] rows from each rank s, in rank order.
  // recv_counts[s] must equal rank s's send_counts[me]. Buffers live in memory(). NCCL: enqueued on
  // stream(), call sync() (or order later work on the stream) before reading recv.
  virtual void alltoallv(const void* send, std::span<const std::size_t> send_counts, void* recv,
                         std::span<const std::size_t> recv_counts, std::size_t row_bytes) = 0;
  // The general form: any number of messages per peer, each straight from/to its place in the buffers.
  // Messages between two ranks are matched in the order they are listed, so both sides must list the
  // same row counts in the same order. (NCCL: one group of ncclSend/ncclRecv; MPI: Isend/Irecv/Waitall.)
  virtual void exchange(const void* send, std::span<const Transfer> sends, void* recv,
                        std::span<const Transfer> recvs, std::size_t row_bytes) = 0;
  virtual void sync() {}                            // wait for every exchange issued so far
  virtual CUstream_st* stream() const { return nullptr; }  // NCCL: the stream exchanges run on
  virtual int device() const { return -1; }         // NCCL: the CUDA device of this rank
  // While on, host-side collectives are not timed out (see the top of this file).
  virtual void set_long_wait(bool on) { (void)on; }

  // Prints "error: <who>: <message>" and takes every rank down (MPI_Abort). Never returns.
  [[noreturn]] virtual void abort(const std::string& message, int code = 3) = 0;

 protected:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::string host_;
};

// MPI must be running (mpi_main starts it). Throws eplab::Error naming the failed MPI call.
std::unique_ptr<Communicator> make_mpi_communicator();

// One GPU per rank, chosen by local rank (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), the same number
// as OMPI_COMM_WORLD_LOCAL_RANK). More ranks on a node than GPUs is a CollectiveError on every rank.
// NCCL's environment (NCCL_NVLS_ENABLE, NCCL_DEBUG, ...) is left as the user set it.
std::unique_ptr<Communicator> make_nccl_communicator();
bool nccl_compiled();  // false when the build found no NCCL (make_nccl_communicator then throws)

// Runs step on every rank; then one allgather says whether it threw anywhere. If so, every rank throws
// CollectiveError: the failing ranks with their own message, the others naming the first failed rank.
// When every rank failed with the same message, only rank 0 prints it.
void all_or_none(Communicator& comm, const std::function<void()>& step);

// Every rank must run the same problem: each (name, value) is compared with rank 0's, all or none
// ("this rank's tokens is 5 but rank 0's is 4: every rank must run the same model and flags").
void require_same_on_all_ranks(Communicator& comm,
                               const std::vector<std::pair<const char*, std::int64_t>>& fingerprint);

// main() of an MPI program: MPI_Init_thread, body(), a watched barrier, MPI_Finalize. Error handling as
// described above:
// CollectiveError -> message, exit 2 on every rank; any other exception -> message and MPI_Abort(2).
// (Communicators living in body() are destroyed while the exception unwinds; the NCCL one then aborts
// its communicator instead of destroying it, so that nothing waits for a peer.)
int mpi_main(int argc, char** argv, const std::function<int()>& body);

}  // namespace eplab::dist
