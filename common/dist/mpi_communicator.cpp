// The MPI backend (host buffers), its watchdog, the all-or-none agreement, and mpi_main.
// The C API only: the deprecated C++ bindings header does not compile warning-free.
//
// The watchdog. MPI's blocking collectives wait forever for a rank that never joins, so this backend
// never blocks inside MPI: every collective is posted non-blocking (MPI_Iallgather, MPI_Ialltoallv, ...)
// and completed by watched_wait(), which polls MPI_Testall on the calling thread (the main one: MPI runs
// FUNNELED) with a deadline of EPLAB_COMM_TIMEOUT_S seconds (default 60, as the NCCL backend). Past it,
// the rank finds out whom it waits for: it asks every other rank over a private communicator, and ranks
// that are themselves in a watched wait answer at once (which wait they are in); the ranks that stay
// silent for a second are dead, or stuck outside MPI. One line names them, and MPI_Abort takes the job
// down:
//   error: rank 0/3 (host): watchdog: waited 60 s in allgather (MPI) for rank 1, which does not answer: ...
// If every rank answers, they wait in different collectives (a bug: a branch taken on some ranks only),
// and the line says which. set_long_wait(true) lifts the deadline for a wait that is long on purpose.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <array>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <new>
#include <thread>

#include "dist/communicator.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab::dist {

namespace {

void mpi_check(int rc, const char* call, const std::string& who) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail(who, ": ", call, " failed: ", msg);
}
#define MPI_CHECK(call) mpi_check((call), #call, who())

int to_int(std::size_t v, const char* what) {
  require(v <= std::size_t(INT_MAX), "MPI backend: ", what, " ", v, " does not fit MPI's int counts (use fewer tokens)");
  return int(v);
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---- The watchdog (see the top of this file) ----------------------------------------------------------

// The waits it watches, by name: a number travels in the answers.
enum Op : std::int64_t { kNoOp, kBarrier, kAllgather, kBcast, kGather, kMax, kSum, kAlltoallv, kExchange, kFinal };
constexpr const char* kOpNames[] = {"no wait",    "barrier",        "allgather", "bcast",
                                    "gather",     "allreduce(max)", "allreduce(sum)", "alltoallv",
                                    "exchange",   "the final barrier before MPI_Finalize"};
const char* op_name(std::int64_t op) {
  return op >= 0 && op < std::int64_t(std::size(kOpNames)) ? kOpNames[op] : "an unknown wait";
}
constexpr int kAsk = 1, kAnswer = 2;  // message tags on Watch::ctl
constexpr double kAnswerGraceS = 1;   // how long a rank past its deadline waits for the others' answers

// One per process: the ranks' questions and answers travel on ctl, so that every watched wait of the
// process (any communicator, and mpi_main's final barrier) answers them.
struct Watch {
  MPI_Comm ctl = MPI_COMM_NULL;  // a private copy of the world: only the watchdog's messages
  double timeout_s = 60;
  std::int64_t op = kNoOp, seq = 0;  // the wait in progress, and the number of watched waits so far
} g_watch;

// Collective over MPI_COMM_WORLD (MPI_Comm_dup): mpi_main calls it right after MPI_Init_thread.
void watch_start() {
  if (g_watch.ctl != MPI_COMM_NULL) return;
  if (const char* t = std::getenv("EPLAB_COMM_TIMEOUT_S"); t && std::atof(t) > 0) g_watch.timeout_s = std::atof(t);
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &g_watch.ctl), "MPI_Comm_dup", "MPI");
  MPI_Comm_set_errhandler(g_watch.ctl, MPI_ERRORS_RETURN);
}

// Answers every question waiting on ctl with the wait this rank is in. Errors are ignored: the asker
// is about to abort the job anyway.
void answer_questions() {
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kAsk, g_watch.ctl, &flag, &st) != MPI_SUCCESS || !flag) return;
    std::int64_t q = 0;
    MPI_Recv(&q, 1, MPI_INT64_T, st.MPI_SOURCE, kAsk, g_watch.ctl, MPI_STATUS_IGNORE);
    const std::array<std::int64_t, 2> a = {g_watch.op, g_watch.seq};
    MPI_Send(a.data(), 2, MPI_INT64_T, st.MPI_SOURCE, kAnswer, g_watch.ctl);  // the asker runs MPI: it receives
  }
}

std::string rank_list(const std::vector<int>& r) {
  std::string s = r.size() == 1 ? "rank " : "ranks ";
  for (std::size_t i = 0; i < r.size(); ++i)
    s += (i == 0 ? "" : i + 1 == r.size() ? " and " : ", ") + std::to_string(r[i]);
  return s;
}

// Past the deadline: ask the others which wait they are in, name the ranks that do not answer (or the
// collectives the answering ones wait in), and take the job down. Never returns.
[[noreturn]] void watchdog_fires(const std::string& who, double waited_s) {
  int me = 0, n = 1;
  MPI_Comm_rank(g_watch.ctl, &me);
  MPI_Comm_size(g_watch.ctl, &n);
  std::vector<std::array<std::int64_t, 2>> ans(n);
  std::vector<MPI_Request> req(n, MPI_REQUEST_NULL);
  for (int p = 0; p < n; ++p)
    if (p != me) MPI_Irecv(ans[p].data(), 2, MPI_INT64_T, p, kAnswer, g_watch.ctl, &req[p]);
  // Non-blocking sends, never waited for: a rank that does not run MPI must not hold this one up.
  for (int p = 0; p < n; ++p) {
    if (p == me) continue;
    MPI_Request ask = MPI_REQUEST_NULL;
    if (MPI_Isend(&g_watch.seq, 1, MPI_INT64_T, p, kAsk, g_watch.ctl, &ask) == MPI_SUCCESS) MPI_Request_free(&ask);
  }
  std::vector<bool> answered(n, false);
  answered[me] = true;
  const std::int64_t until = now_ns() + std::int64_t(kAnswerGraceS * 1e9);
  int pending = n - 1;
  while (pending > 0 && now_ns() < until) {
    for (int p = 0; p < n; ++p) {
      int done = 0;
      if (answered[p] || MPI_Test(&req[p], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done) continue;
      answered[p] = true;
      --pending;
    }
    answer_questions();  // the others past their deadline ask us too
    std::this_thread::yield();
  }
  std::vector<int> silent;
  std::string elsewhere;
  for (int p = 0; p < n; ++p) {
    if (!answered[p]) {
      silent.push_back(p);
    } else if (p != me && (ans[p][0] != g_watch.op || ans[p][1] != g_watch.seq)) {
      elsewhere += strf("%srank %d in %s #%lld", elsewhere.empty() ? "" : ", ", p, op_name(ans[p][0]),
                        (long long)ans[p][1]);
    }
  }
  const char* op = op_name(g_watch.op);
  std::string why;
  if (!silent.empty())
    why = strf("waited %.0f s in %s (MPI) for %s, which %s not answer: dead, or stuck outside MPI", waited_s, op,
               rank_list(silent).c_str(), silent.size() == 1 ? "does" : "do");
  else if (!elsewhere.empty())
    why = strf("waited %.0f s in %s #%lld (MPI); every rank answers, but %s: the ranks do not call the same "
               "collectives in the same order",
               waited_s, op, (long long)g_watch.seq, elsewhere.c_str());
  else
    why = strf("waited %.0f s in %s (MPI); every rank answers from the same wait, but MPI made no progress",
               waited_s, op);
  std::fflush(stdout);
  std::fprintf(stderr, "error: %s: watchdog: %s (EPLAB_COMM_TIMEOUT_S sets the limit)\n", who.c_str(), why.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 3);
  std::_Exit(3);
}

// Completes n requests, polling on this thread; past the deadline (unless long_wait) the watchdog fires.
// who() is called only for a message.
template <typename Who>
void watched_wait(MPI_Request* req, int n, Op op, bool long_wait, const Who& who) {
  g_watch.op = op;
  ++g_watch.seq;
  const std::int64_t start = now_ns();
  std::vector<MPI_Status> st(n);
  for (;;) {
    int done = 0;
    if (int rc = MPI_Testall(n, req, &done, st.data()); rc != MPI_SUCCESS) {
      if (rc == MPI_ERR_IN_STATUS)  // the first failed request says why
        for (const MPI_Status& s : st)
          if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) {
            rc = s.MPI_ERROR;
            break;
          }
      char msg[MPI_MAX_ERROR_STRING] = {};
      int len = 0;
      MPI_Error_string(rc, msg, &len);
      fail(who(), ": MPI failed to complete the ", op_name(op), ": ", msg,
           " (do all ranks call the same collectives, with matching counts, in the same order?)");
    }
    if (done) break;
    if (g_watch.ctl != MPI_COMM_NULL) {
      answer_questions();
      const double waited_s = double(now_ns() - start) * 1e-9;
      if (!long_wait && waited_s > g_watch.timeout_s) watchdog_fires(who(), waited_s);
    }
    std::this_thread::yield();  // as Open MPI's own blocking waits do when ranks share cores
  }
  g_watch.op = kNoOp;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    int inited = 0;
    MPI_Initialized(&inited);
    require(inited, "MPI is not initialised (the program must run its body through eplab::dist::mpi_main)");
    watch_start();  // mpi_main started it already; a program without mpi_main gets it here
    // A private copy of the world: our collectives cannot match anybody else's messages.
    mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup", "MPI");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    // Ranks sharing memory = ranks on one node; the same numbering as OMPI_COMM_WORLD_LOCAL_RANK.
    MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node_));
    MPI_Comm_rank(node_, &local_rank_);
    MPI_Comm_size(node_, &local_size_);
    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int len = 0;
    MPI_Get_processor_name(name, &len);
    host_ = std::string(name, len);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& [bytes, type] : row_types_) MPI_Type_free(&type);
    MPI_Comm_free(&node_);
    MPI_Comm_free(&comm_);
  }

  const char* backend() const override { return "mpi"; }
  Memory memory() const override { return Memory::Host; }
  std::string describe() const override {
    char v[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int len = 0;
    MPI_Get_library_version(v, &len);
    std::string s(v, len);
    if (auto nl = s.find_first_of(",\n"); nl != std::string::npos) s.resize(nl);
    return "MPI (" + s + "), host buffers";
  }

  // Each collective is posted non-blocking and completed by wait() (the watchdog: top of this file).
  void barrier() override {
    MPI_Request r;
    MPI_CHECK(MPI_Ibarrier(comm_, &r));
    wait(&r, 1, kBarrier);
  }

  std::vector<std::int64_t> allgather(std::span<const std::int64_t> mine) override {
    std::vector<std::int64_t> all(mine.size() * size_);
    MPI_Request r;
    MPI_CHECK(MPI_Iallgather(mine.data(), to_int(mine.size(), "allgather count"), MPI_INT64_T, all.data(),
                             int(mine.size()), MPI_INT64_T, comm_, &r));
    wait(&r, 1, kAllgather);
    return all;
  }

  void bcast(void* buf, std::size_t bytes, int root) override {
    MPI_Request r;
    MPI_CHECK(MPI_Ibcast(buf, to_int(bytes, "bcast bytes"), MPI_BYTE, root, comm_, &r));
    wait(&r, 1, kBcast);
  }
  void gather(const void* send, std::size_t bytes, void* recv, int root) override {
    MPI_Request r;
    MPI_CHECK(MPI_Igather(send, to_int(bytes, "gather bytes"), MPI_BYTE, recv, int(bytes), MPI_BYTE, root, comm_, &r));
    wait(&r, 1, kGather);
  }
  double max(double v) override { return allreduce(v, MPI_MAX, kMax); }
  double sum(double v) override { return allreduce(v, MPI_SUM, kSum); }
  void set_long_wait(bool on) override { long_wait_ = on; }

  void alltoallv(const void* send, std::span<const std::size_t> sc, void* recv, std::span<const std::size_t> rc,
                 std::size_t row_bytes) override {
    require(sc.size() == std::size_t(size_) && rc.size() == std::size_t(size_), who(), ": alltoallv needs ", size_,
            " send and receive counts, got ", sc.size(), " and ", rc.size());
    require(row_bytes > 0, "alltoallv: row_bytes must be > 0");
    // Counts in rows of one contiguous datatype, so MPI's int counts reach 2^31 rows, not 2^31 bytes.
    MPI_Datatype row = row_type(row_bytes);
    std::vector<int> scount(size_), sdisp(size_), rcount(size_), rdisp(size_);
    std::size_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      scount[p] = to_int(sc[p], "send rows");
      rcount[p] = to_int(rc[p], "receive rows");
      sdisp[p] = to_int(so, "send offset");
      rdisp[p] = to_int(ro, "receive offset");
      so += sc[p];
      ro += rc[p];
    }
    MPI_Request r;
    MPI_CHECK(MPI_Ialltoallv(send, scount.data(), sdisp.data(), row, recv, rcount.data(), rdisp.data(), row, comm_, &r));
    wait(&r, 1, kAlltoallv);
  }

  void exchange(const void* send, std::span<const Transfer> sends, void* recv, std::span<const Transfer> recvs,
                std::size_t row_bytes) override {
    MPI_Datatype row = row_type(row_bytes);
    std::vector<MPI_Request> req;
    req.reserve(sends.size() + recvs.size());
    // Receives first, so a message that arrives early lands in its buffer instead of being queued.
    for (const Transfer& t : recvs) {
      require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
      if (!t.rows) continue;
      req.emplace_back();
      MPI_CHECK(MPI_Irecv(static_cast<char*>(recv) + t.offset * row_bytes, to_int(t.rows, "receive rows"), row, t.peer,
                          0, comm_, &req.back()));
    }
    for (const Transfer& t : sends) {
      require(t.peer >= 0 && t.peer < size_, who(), ": exchange names rank ", t.peer);
      if (!t.rows) continue;
      req.emplace_back();
      MPI_CHECK(MPI_Isend(static_cast<const char*>(send) + t.offset * row_bytes, to_int(t.rows, "send rows"), row,
                          t.peer, 0, comm_, &req.back()));
    }
    wait(req.data(), int(req.size()), kExchange);
  }

  [[noreturn]] void abort(const std::string& message, int code) override {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s: %s\n", who().c_str(), message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm_, code);
    std::_Exit(code);  // MPI_Abort does not return; this only keeps [[noreturn]] honest
  }

 private:
  void wait(MPI_Request* req, int n, Op op) { watched_wait(req, n, op, long_wait_, [this] { return who(); }); }
  double allreduce(double v, MPI_Op mop, Op op) {
    double r = 0;
    MPI_Request q;
    MPI_CHECK(MPI_Iallreduce(&v, &r, 1, MPI_DOUBLE, mop, comm_, &q));
    wait(&q, 1, op);
    return r;
  }

  MPI_Datatype row_type(std::size_t bytes) {
    auto it = row_types_.find(bytes);
    if (it != row_types_.end()) return it->second;
    MPI_Datatype t;
    MPI_CHECK(MPI_Type_contiguous(to_int(bytes, "row bytes"), MPI_BYTE, &t));
    MPI_CHECK(MPI_Type_commit(&t));
    row_types_[bytes] = t;
    return t;
  }

  MPI_Comm comm_ = MPI_COMM_NULL, node_ = MPI_COMM_NULL;
  std::map<std::size_t, MPI_Datatype> row_types_;
  bool long_wait_ = false;  // set_long_wait: this communicator's waits have no deadline
};

}  // namespace

std::string Communicator::who() const { return strf("rank %d/%d (%s)", rank_, size_, host_.c_str()); }

std::vector<int> Communicator::allgather_int(std::span<const int> mine) {
  std::vector<std::int64_t> m(mine.begin(), mine.end());
  std::vector<std::int64_t> all = allgather(m);
  return std::vector<int>(all.begin(), all.end());
}

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

void all_or_none(Communicator& comm, const std::function<void()>& step) {
  std::string err;
  bool failed = false;
  try {
    step();
  } catch (const std::bad_alloc&) {
    failed = true;
    err = kOutOfHostMemory;
  } catch (const std::exception& e) {
    failed = true;
    err = e.what();
  }
  // Each rank sends -1 (fine) or a hash of its message, so we can also tell "everybody, same reason".
  const std::int64_t mine = failed ? std::int64_t(std::hash<std::string>{}(err) & 0x7fffffffffffffffull) : -1;
  const std::vector<std::int64_t> all = comm.allgather(std::span<const std::int64_t>(&mine, 1));
  int first = -1;
  bool same_everywhere = true;
  for (int r = 0; r < comm.size(); ++r) {
    if (all[r] >= 0 && first < 0) first = r;
    same_everywhere &= all[r] >= 0 && all[r] == all[0];
  }
  if (first < 0) return;
  if (same_everywhere) {
    CollectiveError e(comm.size() > 1 ? err + strf(" [on all %d ranks]", comm.size()) : err);
    e.print = comm.rank() == 0;
    throw e;
  }
  if (failed) throw CollectiveError(comm.who() + ": " + err);
  throw CollectiveError(strf("%s: stopping because rank %d failed (its error is above)", comm.who().c_str(), first));
}

void require_same_on_all_ranks(Communicator& comm,
                               const std::vector<std::pair<const char*, std::int64_t>>& fingerprint) {
  all_or_none(comm, [&] {
    std::vector<std::int64_t> mine;
    for (const auto& f : fingerprint) mine.push_back(f.second);
    const std::vector<std::int64_t> all = comm.allgather(mine);  // rank 0's values come first
    for (std::size_t f = 0; f < mine.size(); ++f)
      require(mine[f] == all[f], "this rank's ", fingerprint[f].first, " is ", mine[f], " but rank 0's is ", all[f],
              ": every rank must run the same model and flags");
  });
}

int mpi_main(int argc, char** argv, const std::function<int()>& body) {
  int provided = 0;
  // FUNNELED: only the main thread calls MPI (the NCCL watchdog thread never does).
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "error: MPI_Init_thread failed (is Open MPI installed? start with mpirun -np N)\n");
    return 2;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int code = 0;
  try {
    watch_start();
    code = body();
  } catch (const CollectiveError& e) {
    if (e.print) std::fprintf(stderr, "error: %s\n", e.what());
    code = 2;
  } catch (const std::exception& e) {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const bool oom = dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
    std::fprintf(stderr, "error: rank %d/%d: %s\n", rank, size, oom ? kOutOfHostMemory : e.what());
    std::fflush(stderr);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, 2);  // the others may be waiting for us: take them down
    code = 2;
  }
  std::fflush(stdout);
  // MPI_Finalize waits for every rank, without a limit: meet in a watched barrier first, so that a rank
  // that stalls after its last collective is named instead of hanging the others here.
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1 && g_watch.ctl != MPI_COMM_NULL) {
    MPI_Request r;
    if (MPI_Ibarrier(MPI_COMM_WORLD, &r) == MPI_SUCCESS)
      watched_wait(&r, 1, kFinal, false, [size] {
        int rank = 0, len = 0;
        char host[MPI_MAX_PROCESSOR_NAME] = {};
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        MPI_Get_processor_name(host, &len);
        return strf("rank %d/%d (%s)", rank, size, host);
      });
  }
  if (g_watch.ctl != MPI_COMM_NULL) MPI_Comm_free(&g_watch.ctl);
  MPI_Finalize();
  return code;
}

}  // namespace eplab::dist
