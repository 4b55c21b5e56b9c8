// Simulated ranks on one GPU (see loopback_comm.hpp).
#include "loopback_comm.hpp"

#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
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

// What the ranks share: a barrier that fails everyone once one rank has failed, the slots of the host-side
// collectives, and a mailbox per ordered pair of ranks for the exchanges.
struct Hub {
  explicit Hub(int n) : N(n), box(std::size_t(n) * n), values(n), bytes(n) {}
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
    // A rank that never joins (it returned, or it waits in another collective) ends the run, not hangs it.
    if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return generation != gen || failed; }))
      fail_locked("simulated ranks: waited 60 s in a host-side collective that not every rank joined");
    if (generation == gen) throw Stopped("stopped: another simulated rank failed");
  }
  void fail() {
    std::lock_guard<std::mutex> lock(mu);
    failed = true;
    cv.notify_all();
  }

  // One message from rank s to rank d: box[s * N + d] holds them in the order s posted them.
  struct Event {  // a CUDA event shared by the messages of one exchange call
    cudaEvent_t e = nullptr;
    Event() { CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
    ~Event() { cudaEventDestroy(e); }
  };
  struct Message {
    const char* src = nullptr;
    std::size_t rows = 0, row_bytes = 0;
    std::shared_ptr<Event> ready;  // recorded by the sender after the work that filled src
    std::shared_ptr<Event> done;   // recorded by the receiver after its copy (set when taken)
    bool taken = false;
  };
  std::vector<std::deque<std::shared_ptr<Message>>> box;

  // Waits (host) until pred() holds; throws Stopped when another rank failed or after the timeout (a
  // message that is never matched: the two sides disagree, which NCCL would turn into a hang).
  template <typename Pred>
  void wait_for(std::unique_lock<std::mutex>& lock, Pred pred, const std::string& what) {
    if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return pred() || failed; }))
      fail_locked("simulated ranks: waited 60 s for " + what);
    if (failed && !pred()) throw Stopped("stopped: another simulated rank failed");
  }
  [[noreturn]] void fail_locked(const std::string& why) {
    failed = true;
    cv.notify_all();
    throw Error(why);
  }
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
  }
  ~LoopbackComm() override {
    cudaStreamSynchronize(stream_);
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

  // Messages between two ranks are matched in the order they were posted, whatever exchange call posted
  // them (as NCCL matches sends and receives per pair), so a rank may skip a call in which it has nothing
  // to send or receive. A call posts its sends, takes its receives (waiting on the host until each
  // sender has posted), then waits until its own sends were taken: as with NCCL, the work queued after
  // the call on this stream runs after every message of the call has been delivered.
  void exchange(const void* send, std::span<const dist::Transfer> sends, void* recv,
                std::span<const dist::Transfer> recvs, std::size_t row_bytes) override {
    for (const auto& t : sends) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    for (const auto& t : recvs) require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
    auto ready = std::make_shared<Hub::Event>();
    CUDA_CHECK(cudaEventRecord(ready->e, stream_));
    std::vector<std::shared_ptr<Hub::Message>> posted;
    std::unique_lock<std::mutex> lock(hub_.mu);
    for (const dist::Transfer& t : sends) {
      auto m = std::make_shared<Hub::Message>();
      m->src = static_cast<const char*>(send) + t.offset * row_bytes;
      m->rows = t.rows;
      m->row_bytes = row_bytes;
      m->ready = ready;
      hub_.box[std::size_t(rank_) * size_ + t.peer].push_back(m);
      posted.push_back(m);
    }
    hub_.cv.notify_all();
    for (const dist::Transfer& t : recvs) {
      auto& q = hub_.box[std::size_t(t.peer) * size_ + rank_];
      hub_.wait_for(lock, [&] { return !q.empty(); }, who() + "'s message from rank " + std::to_string(t.peer));
      std::shared_ptr<Hub::Message> m = q.front();
      q.pop_front();
      if (m->rows * m->row_bytes != t.rows * row_bytes)
        hub_.fail_locked(who() + ": expects " + std::to_string(t.rows) + " rows of " + std::to_string(row_bytes) +
                         " bytes from rank " + std::to_string(t.peer) + " but it sends " + std::to_string(m->rows) +
                         " of " + std::to_string(m->row_bytes));
      CUDA_CHECK(cudaStreamWaitEvent(stream_, m->ready->e, 0));
      CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(recv) + t.offset * row_bytes, m->src, t.rows * row_bytes,
                                 cudaMemcpyDeviceToDevice, stream_));
      m->done = std::make_shared<Hub::Event>();
      CUDA_CHECK(cudaEventRecord(m->done->e, stream_));
      m->taken = true;
      hub_.cv.notify_all();
    }
    for (const std::shared_ptr<Hub::Message>& m : posted) {
      hub_.wait_for(lock, [&] { return m->taken; }, who() + "'s message of " + std::to_string(m->rows) + " rows to be taken");
      CUDA_CHECK(cudaStreamWaitEvent(stream_, m->done->e, 0));
    }
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
