// The NCCL backend: device buffers, all-to-all-v as one group of ncclSend/ncclRecv per peer.
//
// Set-up: GPU = local rank (checked against the GPU count on every rank first), ncclUniqueId from rank 0
// broadcast over MPI, ncclCommInitRank. Host-side control (counts, flags, timings) stays on MPI.
// Robustness: see communicator.hpp (sync() polls ncclCommGetAsyncError; a watchdog thread aborts the
// communicator when an exchange, or a host-side MPI collective, outlives EPLAB_COMM_TIMEOUT_S).
#include "dist/communicator.hpp"

#if EPLAB_HAVE_NCCL
#include <cuda_runtime.h>
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

#include "util/report.hpp"
#endif

namespace eplab::dist {

#if !EPLAB_HAVE_NCCL

bool nccl_compiled() { return false; }
std::unique_ptr<Communicator> make_nccl_communicator() {
  fail("this build has no NCCL (CMake did not find nccl.h / libnccl); use --device cpu or install NCCL and rebuild");
}

#else

bool nccl_compiled() { return true; }

namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* nccl_hint(ncclResult_t r) {
  switch (r) {
    case ncclSystemError:
    case ncclRemoteError:
      return " (a peer died or the network failed; rerun with NCCL_DEBUG=WARN for details)";
    case ncclUnhandledCudaError:
      return " (a CUDA call inside NCCL failed; check the GPU with nvidia-smi)";
    case ncclInvalidUsage:
    case ncclInvalidArgument:
      return " (a bug in how NCCL is called: counts or buffers that disagree between ranks?)";
    default:
      return "";
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator() : host_comm_(make_mpi_communicator()) {
    rank_ = host_comm_->rank();
    size_ = host_comm_->size();
    local_rank_ = host_comm_->local_rank();
    local_size_ = host_comm_->local_size();
    host_ = host_comm_->host();
    if (const char* t = std::getenv("EPLAB_COMM_TIMEOUT_S")) timeout_s_ = std::atof(t) > 0 ? std::atof(t) : timeout_s_;

    // 1. One GPU per rank on this node: every rank checks, every rank fails together.
    all_or_none(*host_comm_, [&] {
      int n = 0;
      const cudaError_t e = cudaGetDeviceCount(&n);
      require(e == cudaSuccess && n > 0, "no usable GPU on ", host_, " (", cudaGetErrorString(e),
              "): the NCCL backend needs one GPU per rank (use --device cpu for the MPI backend)");
      require(local_size_ <= n, local_size_, " ranks on node ", host_, " but only ", n,
              " GPU(s): NCCL expert parallelism needs one GPU per rank (use at most ", n,
              " ranks per node, or --device cpu)");
      device_ = local_rank_;
      cuda(cudaSetDevice(device_), "cudaSetDevice");
      cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      cudaDeviceProp prop{};
      cuda(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
      gpu_name_ = prop.name;
    });

    // One rank has no peer to talk to: no NCCL communicator (it would only hold NCCL's buffers, ~0.5 GiB),
    // no watchdog; its messages to itself are device copies on the stream (self_copy).
    if (size_ == 1) return;

    // 2. The unique id: made by rank 0, broadcast over MPI.
    ncclUniqueId id{};
    all_or_none(*host_comm_, [&] {
      if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    });
    host_comm_->bcast(&id, sizeof id, 0);

    // 3. The communicator. The watchdog already runs: an init that waits forever for a peer is caught.
    watchdog_ = std::thread([this] { watchdog_loop(); });
    busy_since_ns_ = now_ns();
    try {
      check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    } catch (...) {
      stop_watchdog();
      throw;
    }
    comm_ready_ = true;
    busy_since_ns_ = 0;
  }

  ~NcclCommunicator() override {
    stop_watchdog();
    if (comm_) {
      if (std::uncaught_exceptions() > 0) {
        // Unwinding after an error: a peer may never come; abort instead of waiting for it.
        ncclCommAbort(comm_);
      } else {
        cudaStreamSynchronize(stream_);
        ncclCommFinalize(comm_);
        ncclCommDestroy(comm_);
      }
    }
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* backend() const override { return "nccl"; }
  Memory memory() const override { return Memory::Device; }
  std::string describe() const override {
    if (!comm_)
      return strf("one rank, no peers (device copies, NCCL not needed), GPU %d (%s)", device_, gpu_name_.c_str());
    int v = 0;
    ncclGetVersion(&v);
    const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
    return strf("NCCL %d.%d.%d, device buffers, GPU %d (%s), NCCL_NVLS_ENABLE=%s", v / 10000, (v / 100) % 100,
                v % 100, device_, gpu_name_.c_str(), nvls ? nvls : "unset");
  }
  CUstream_st* stream() const override { return stream_; }
  int device() const override { return device_; }

  // Host-side control over MPI, each call watched (HostWait) so that a collective no peer joins ends
  // the job after the timeout instead of hanging it.
  void barrier() override {
    HostWait w(*this, "barrier");
    host_comm_->barrier();
  }
  std::vector<std::int64_t> allgather(std::span<const std::int64_t> mine) override {
    HostWait w(*this, "allgather");
    return host_comm_->allgather(mine);
  }
  void bcast(void* buf, std::size_t bytes, int root) override {
    HostWait w(*this, "bcast");
    host_comm_->bcast(buf, bytes, root);
  }
  void gather(const void* send, std::size_t bytes, void* recv, int root) override {
    HostWait w(*this, "gather");
    host_comm_->gather(send, bytes, recv, root);
  }
  double max(double v) override {
    HostWait w(*this, "allreduce(max)");
    return host_comm_->max(v);
  }
  double sum(double v) override {
    HostWait w(*this, "allreduce(sum)");
    return host_comm_->sum(v);
  }
  void set_long_wait(bool on) override {  // the MPI communicator under the host collectives watches them too
    long_wait_ = on;
    host_comm_->set_long_wait(on);
  }

  void alltoallv(const void* send, std::span<const std::size_t> sc, void* recv, std::span<const std::size_t> rc,
                 std::size_t row_bytes) override {
    require(sc.size() == std::size_t(size_) && rc.size() == std::size_t(size_), who(), ": alltoallv needs ", size_,
            " send and receive counts, got ", sc.size(), " and ", rc.size());
    if (busy_since_ns_ == 0) busy_since_ns_ = now_ns();
    auto* s = static_cast<const char*>(send);
    auto* r = static_cast<char*>(recv);
    if (!comm_) {  // one rank: its rows to itself
      require(sc[0] == rc[0], who(), ": alltoallv sends ", sc[0], " rows to itself but expects ", rc[0]);
      self_copy(r, s, sc[0] * row_bytes);
      return;
    }
    std::size_t so = 0, ro = 0;
    // One group: NCCL schedules all sends and receives together, so no pair of ranks can deadlock on
    // the order of their point-to-point calls. Empty pairs are skipped on both sides (counts agree).
    in_group([&] {
      for (int p = 0; p < size_; ++p) {
        if (sc[p]) check(ncclSend(s + so * row_bytes, sc[p] * row_bytes, ncclUint8, p, comm_, stream_), "ncclSend");
        if (rc[p]) check(ncclRecv(r + ro * row_bytes, rc[p] * row_bytes, ncclUint8, p, comm_, stream_), "ncclRecv");
        so += sc[p];
        ro += rc[p];
      }
    });
  }

  void exchange(const void* send, std::span<const Transfer> sends, void* recv, std::span<const Transfer> recvs,
                std::size_t row_bytes) override {
    for (const Transfer& t : sends) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    for (const Transfer& t : recvs) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    if (!comm_) {  // one rank: the i-th message to itself is the i-th one it receives
      require(sends.size() == recvs.size(), who(), ": exchange posts ", sends.size(), " messages to itself but ",
              recvs.size(), " receives");
      for (std::size_t i = 0; i < sends.size(); ++i) {
        require(sends[i].rows == recvs[i].rows, who(), ": exchange message ", i, " sends ", sends[i].rows,
                " rows to itself but receives ", recvs[i].rows);
        self_copy(static_cast<char*>(recv) + recvs[i].offset * row_bytes,
                  static_cast<const char*>(send) + sends[i].offset * row_bytes, sends[i].rows * row_bytes);
      }
      return;
    }
    if (busy_since_ns_ == 0) busy_since_ns_ = now_ns();
    in_group([&] {
      for (const Transfer& t : sends)
        if (t.rows)
          check(ncclSend(static_cast<const char*>(send) + t.offset * row_bytes, t.rows * row_bytes, ncclUint8, t.peer,
                         comm_, stream_),
                "ncclSend");
      for (const Transfer& t : recvs)
        if (t.rows)
          check(ncclRecv(static_cast<char*>(recv) + t.offset * row_bytes, t.rows * row_bytes, ncclUint8, t.peer,
                         comm_, stream_),
                "ncclRecv");
    });
  }

  // Runs enqueue() between ncclGroupStart and ncclGroupEnd. Arguments are validated before the group opens;
  // an NCCL call that fails inside it leaves a half-posted group that cannot be closed safely (ending it would
  // launch the posted half, which waits for peers that never match it), so that ends the process with one line
  // (and mpirun takes the other ranks down) instead of throwing past an open group.
  template <typename Fn>
  void in_group(Fn&& enqueue) {
    check(ncclGroupStart(), "ncclGroupStart");
    try {
      enqueue();
    } catch (const std::exception& e) {
      die(e.what(), false);
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  void sync() override {
    for (;;) {
      const cudaError_t st = cudaStreamQuery(stream_);
      if (st == cudaSuccess) break;
      if (st != cudaErrorNotReady) die(strf("CUDA error while waiting for the stream: %s", cudaGetErrorString(st)), false);
      ncclResult_t async = ncclSuccess;
      if (comm_) ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress)
        die(strf("NCCL asynchronous error: %s%s", ncclGetErrorString(async), nccl_hint(async)), false);
      const std::int64_t since = busy_since_ns_;
      if (since && double(now_ns() - since) * 1e-9 > timeout_s_)
        die(strf("an exchange has not finished after %.0f s: a peer rank is dead or stuck (EPLAB_COMM_TIMEOUT_S "
                 "sets the limit)", timeout_s_),
            false);
      std::this_thread::yield();
    }
    busy_since_ns_ = 0;
  }

  [[noreturn]] void abort(const std::string& message, int code) override {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s: %s\n", who().c_str(), message.c_str());
    std::fflush(stderr);
    stop_watchdog();
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  // Marks the main thread as blocked in a host-side (MPI) collective for the watchdog.
  struct HostWait {
    NcclCommunicator& c;
    HostWait(NcclCommunicator& comm, const char* op) : c(comm) {
      c.host_op_ = op;
      c.host_since_ns_ = now_ns();
    }
    ~HostWait() { c.host_since_ns_ = 0; }
    HostWait(const HostWait&) = delete;
    HostWait& operator=(const HostWait&) = delete;
  };

  void cuda(cudaError_t e, const char* call) {
    if (e != cudaSuccess) fail(who(), ": ", call, " failed: ", cudaGetErrorString(e));
  }
  void check(ncclResult_t r, const char* call) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    const char* last = ncclGetLastError(comm_);
    fail(who(), ": ", call, " failed: ", ncclGetErrorString(r), (last && *last) ? std::string(" (") + last + ")" : "",
         nccl_hint(r));
  }

  // Ends the process with one line, from the main thread (MPI_Abort) or the watchdog (_Exit: only the
  // main thread may call MPI). Either way mpirun then stops every other rank.
  [[noreturn]] void die(const std::string& why, bool from_watchdog) {
    std::call_once(die_once_, [&] {
      std::fflush(stdout);
      std::fprintf(stderr, "error: %s: %s; aborting the NCCL communicator\n", who().c_str(), why.c_str());
      std::fflush(stderr);
      // ncclCommAbort may itself wait (on a stuck proxy thread or kernel): the exit must not depend on it.
      std::thread([] {
        std::this_thread::sleep_for(std::chrono::seconds(10));
        std::_Exit(3);
      }).detach();
      if (comm_ready_) ncclCommAbort(comm_);
      if (!from_watchdog) MPI_Abort(MPI_COMM_WORLD, 3);
      std::_Exit(3);
    });
    std::_Exit(3);
  }

  void watchdog_loop() {
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (stop_) break;
      if (comm_ready_) {
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(comm_, &async);
        if (async != ncclSuccess && async != ncclInProgress)
          die(strf("NCCL asynchronous error (watchdog): %s%s", ncclGetErrorString(async), nccl_hint(async)), true);
      }
      // The main thread's sync() reports a timeout itself; we step in only when it is blocked elsewhere
      // (inside ncclCommInitRank, ncclGroupEnd or a blocking CUDA call), hence the extra grace.
      const std::int64_t since = busy_since_ns_;
      if (since && double(now_ns() - since) * 1e-9 > timeout_s_ + 5)
        die(strf("no progress for %.0f s (watchdog): a peer rank is dead or stuck (EPLAB_COMM_TIMEOUT_S sets "
                 "the limit)", timeout_s_ + 5),
            true);
      // A host-side collective (MPI) that no peer joins: a dead/stuck peer, or ranks that do not call the
      // same collectives in the same order (a bug). Only the main thread may call MPI, so we _Exit and
      // let mpirun take the other ranks down.
      const std::int64_t host_since = host_since_ns_;
      if (host_since && !long_wait_ && double(now_ns() - host_since) * 1e-9 > timeout_s_)
        die(strf("waited %.0f s in the host-side %s (MPI) for the other ranks (watchdog): a peer rank is dead "
                 "or stuck, or the ranks do not call the same collectives in the same order "
                 "(EPLAB_COMM_TIMEOUT_S sets the limit)",
                 timeout_s_, host_op_.load()),
            true);
    }
  }
  void self_copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpyAsync");
  }

  void stop_watchdog() {
    stop_ = true;
    if (watchdog_.joinable() && watchdog_.get_id() != std::this_thread::get_id()) watchdog_.join();
  }

  std::unique_ptr<Communicator> host_comm_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int device_ = -1;
  std::string gpu_name_;
  double timeout_s_ = 60;
  std::atomic<std::int64_t> busy_since_ns_{0};  // start of the oldest unfinished exchange; 0 = idle
  std::atomic<std::int64_t> host_since_ns_{0};  // start of the host collective the main thread is in; 0 = none
  std::atomic<const char*> host_op_{""};          // its name, for the message
  std::atomic<bool> long_wait_{false};           // set_long_wait: host collectives are not timed out
  std::atomic<bool> comm_ready_{false}, stop_{false};
  std::thread watchdog_;
  std::once_flag die_once_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator() { return std::make_unique<NcclCommunicator>(); }

#endif

}  // namespace eplab::dist
