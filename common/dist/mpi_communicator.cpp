// The MPI backend (host buffers), the all-or-none agreement, and mpi_main.
// The C API only: the deprecated C++ bindings header does not compile warning-free.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <climits>
#include <cstdio>
#include <functional>
#include <map>
#include <new>

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

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    int inited = 0;
    MPI_Initialized(&inited);
    require(inited, "MPI is not initialised (the program must run its body through eplab::dist::mpi_main)");
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

  void barrier() override { MPI_CHECK(MPI_Barrier(comm_)); }

  std::vector<std::int64_t> allgather(std::span<const std::int64_t> mine) override {
    std::vector<std::int64_t> all(mine.size() * size_);
    MPI_CHECK(MPI_Allgather(mine.data(), to_int(mine.size(), "allgather count"), MPI_INT64_T, all.data(),
                            int(mine.size()), MPI_INT64_T, comm_));
    return all;
  }

  void bcast(void* buf, std::size_t bytes, int root) override {
    MPI_CHECK(MPI_Bcast(buf, to_int(bytes, "bcast bytes"), MPI_BYTE, root, comm_));
  }
  void gather(const void* send, std::size_t bytes, void* recv, int root) override {
    MPI_CHECK(MPI_Gather(send, to_int(bytes, "gather bytes"), MPI_BYTE, recv, int(bytes), MPI_BYTE, root, comm_));
  }
  double max(double v) override {
    double r = 0;
    MPI_CHECK(MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, comm_));
    return r;
  }
  double sum(double v) override {
    double r = 0;
    MPI_CHECK(MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_SUM, comm_));
    return r;
  }

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
    MPI_CHECK(MPI_Alltoallv(send, scount.data(), sdisp.data(), row, recv, rcount.data(), rdisp.data(), row, comm_));
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
    MPI_CHECK(MPI_Waitall(int(req.size()), req.data(), MPI_STATUSES_IGNORE));
  }

  [[noreturn]] void abort(const std::string& message, int code) override {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s: %s\n", who().c_str(), message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm_, code);
    std::_Exit(code);  // MPI_Abort does not return; this only keeps [[noreturn]] honest
  }

 private:
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
  MPI_Finalize();
  return code;
}

}  // namespace eplab::dist
