// Simulated ranks on one GPU (see loopback_comm.hpp).
#include "loopback_comm.hpp"

#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_check.hpp"

namespace eplab::testing {
namespace {

// Thrown in the ranks that are stopped because another rank failed (not the error to report).
struct Stopped : Error {
  using Error::Error;
};

// What the ranks share: a barrier that fails everyone once one rank has failed, and the slots each rank
// publishes in a collective step.
struct Hub {
  explicit Hub(int n) : N(n), posts(n), values(n), bytes(n) {}
  const int N;

  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  long generation = 0;
  bool failed = false;

  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    if (failed) throw Stopped("stopped: another simulated rank failed");
    const long gen = generation;
    if (++arrived == N) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return generation != gen || failed; });
    if (generation == gen) throw Stopped("stopped: another simulated rank failed");
  }
  void fail() {
    std::lock_guard<std::mutex> lock(mu);
    failed = true;
    cv.notify_all();
  }

  struct Post {
    const char* send = nullptr;
    std::vector<dist::Transfer> sends;
    cudaEvent_t ready = nullptr, done = nullptr;  // the rank's own events, created once
  };
  std::vector<Post> posts;
  std::vector<std::vector<std::int64_t>> values;
  std::vector<std::vector<char>> bytes;
};

class LoopbackComm final : public dist::Communicator {
 public:
  LoopbackComm(Hub& hub, int rank) : hub_(hub) {
    rank_ = rank;
    size_ = hub.N;
    local_rank_ = rank;
    local_size_ = hub.N;
    host_ = "loopback";
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  ~LoopbackComm() override {
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
    cudaStreamDestroy(stream_);
  }

  const char* backend() const override { return "loopback"; }
  dist::Memory memory() const override { return dist::Memory::Device; }
  std::string describe() const override { return std::to_string(size_) + " simulated ranks on GPU 0"; }
  CUstream_st* stream() const override { return stream_; }
  int device() const override { return 0; }
  void sync() override { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  void barrier() override { hub_.wait(); }
  std::vector<std::int64_t> allgather(std::span<const std::int64_t> mine) override {
    hub_.values[rank_].assign(mine.begin(), mine.end());
    hub_.wait();
    std::vector<std::int64_t> all;
    for (const auto& v : hub_.values) {
      require(v.size() == mine.size(), who(), ": allgather of different lengths");
      all.insert(all.end(), v.begin(), v.end());
    }
    hub_.wait();
    return all;
  }
  void bcast(void* buffer, std::size_t n, int root) override {
    if (rank_ == root) hub_.bytes[root].assign(static_cast<char*>(buffer), static_cast<char*>(buffer) + n);
    hub_.wait();
    if (rank_ != root) std::memcpy(buffer, hub_.bytes[root].data(), n);
    hub_.wait();
  }
  void gather(const void* send, std::size_t n, void* recv_at_root, int root) override {
    hub_.bytes[rank_].assign(static_cast<const char*>(send), static_cast<const char*>(send) + n);
    hub_.wait();
    if (rank_ == root)
      for (int r = 0; r < size_; ++r) std::memcpy(static_cast<char*>(recv_at_root) + r * n, hub_.bytes[r].data(), n);
    hub_.wait();
  }
  double max(double v) override {
    double m = v;
    for (double x : all_doubles(v)) m = x > m ? x : m;
    return m;
  }
  double sum(double v) override {
    double s = 0;
    for (double x : all_doubles(v)) s += x;
    return s;
  }

  void alltoallv(const void* send, std::span<const std::size_t> send_counts, void* recv,
                 std::span<const std::size_t> recv_counts, std::size_t row_bytes) override {
    require(send_counts.size() == std::size_t(size_) && recv_counts.size() == std::size_t(size_), who(),
            ": alltoallv needs one count per rank");
    std::vector<dist::Transfer> sends, recvs;
    std::size_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      if (send_counts[p]) sends.push_back({p, so, send_counts[p]});
      if (recv_counts[p]) recvs.push_back({p, ro, recv_counts[p]});
      so += send_counts[p];
      ro += recv_counts[p];
    }
    exchange(send, sends, recv, recvs, row_bytes);
  }

  void exchange(const void* send, std::span<const dist::Transfer> sends, void* recv,
                std::span<const dist::Transfer> recvs, std::size_t row_bytes) override {
    for (const auto& t : sends) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    for (const auto& t : recvs) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    // step 1: publish the send side, after the work that filled it
    CUDA_CHECK(cudaEventRecord(ready_, stream_));
    Hub::Post& mine = hub_.posts[rank_];
    mine.send = static_cast<const char*>(send);
    mine.sends.assign(sends.begin(), sends.end());
    mine.ready = ready_;
    mine.done = done_;
    hub_.wait();
    // step 2: pull my messages, matched per peer in the order both sides listed them
    std::vector<std::size_t> next(size_, 0);  // per sender: where to look for its next message to me
    std::vector<bool> waited(size_, false);
    auto next_to_me = [&](int p) -> const dist::Transfer* {
      const std::vector<dist::Transfer>& ss = hub_.posts[p].sends;
      while (next[p] < ss.size() && ss[next[p]].peer != rank_) ++next[p];
      return next[p] < ss.size() ? &ss[next[p]++] : nullptr;
    };
    for (const dist::Transfer& t : recvs) {
      const dist::Transfer* s = next_to_me(t.peer);
      require(s != nullptr, who(), ": expects a message of ", t.rows, " rows from rank ", t.peer, " that it never posted");
      require(s->rows == t.rows, who(), ": expects ", t.rows, " rows from rank ", t.peer, " but it sends ", s->rows);
      if (!waited[t.peer]) CUDA_CHECK(cudaStreamWaitEvent(stream_, hub_.posts[t.peer].ready, 0));
      waited[t.peer] = true;
      CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(recv) + t.offset * row_bytes,
                                 hub_.posts[t.peer].send + s->offset * row_bytes, t.rows * row_bytes,
                                 cudaMemcpyDeviceToDevice, stream_));
    }
    for (int p = 0; p < size_; ++p)
      require(next_to_me(p) == nullptr, who(), ": rank ", p, " sends a message this rank does not receive");
    CUDA_CHECK(cudaEventRecord(done_, stream_));
    hub_.wait();
    // step 3: later work on my stream may overwrite my send buffer only after every reader has copied it
    for (int p = 0; p < size_; ++p)
      if (p != rank_) CUDA_CHECK(cudaStreamWaitEvent(stream_, hub_.posts[p].done, 0));
  }

  [[noreturn]] void abort(const std::string& message, int code) override {
    std::fprintf(stderr, "error: %s: %s\n", who().c_str(), message.c_str());
    std::exit(code);
  }

 private:
  std::vector<double> all_doubles(double v) {
    std::int64_t bits;
    std::memcpy(&bits, &v, sizeof v);
    const std::vector<std::int64_t> all = allgather(std::span<const std::int64_t>(&bits, 1));
    std::vector<double> out(all.size());
    std::memcpy(out.data(), all.data(), all.size() * sizeof(double));
    return out;
  }

  Hub& hub_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
};

}  // namespace

void run_loopback_ranks(int N, const std::function<void(dist::Communicator& comm)>& body) {
  require(N >= 1, "run_loopback_ranks: N must be >= 1");
  Hub hub(N);
  std::vector<std::exception_ptr> errors(N);
  std::vector<std::thread> threads;
  for (int r = 0; r < N; ++r)
    threads.emplace_back([&, r] {
      try {
        CUDA_CHECK(cudaSetDevice(0));
        LoopbackComm comm(hub, r);
        body(comm);
      } catch (const Stopped&) {
        // stopped because another rank failed: that rank's error is the one reported
      } catch (...) {
        errors[r] = std::current_exception();
        hub.fail();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace eplab::testing
