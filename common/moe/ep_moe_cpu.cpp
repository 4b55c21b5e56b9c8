#include "moe/ep_moe_cpu.hpp"

#include <algorithm>
#include <thread>

#include "moe/grouped_cpu.hpp"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {

RowRange rows_of(int rank, int ranks, int T) {
  const int base = T / ranks, extra = T % ranks;
  return {rank * base + std::min(rank, extra), base + (rank < extra ? 1 : 0)};
}

std::vector<std::int64_t> EpMoeCounts::rank_rows(int layer) const {
  const auto& m = traffic.at(layer);
  int N = 0;
  while (std::size_t(N) * N < m.size()) ++N;
  std::vector<std::int64_t> r(N, 0);
  for (int s = 0; s < N; ++s)
    for (int d = 0; d < N; ++d) r[d] += m[std::size_t(s) * N + d];
  return r;
}

std::int64_t EpMoeCounts::off_rank_rows(int layer) const {
  const auto& m = traffic.at(layer);
  int N = 0;
  while (std::size_t(N) * N < m.size()) ++N;
  std::int64_t off = 0;
  for (int s = 0; s < N; ++s)
    for (int d = 0; d < N; ++d)
      if (s != d) off += m[std::size_t(s) * N + d];
  return off;
}

namespace {

std::vector<std::size_t> to_sizes(const std::vector<int>& v) { return {v.begin(), v.end()}; }

std::vector<dist::Transfer> to_transfers(const std::vector<EpPlan::Segment>& segs) {
  std::vector<dist::Transfer> t;
  t.reserve(segs.size());
  for (const auto& s : segs) t.push_back({s.peer, std::size_t(s.offset), std::size_t(s.rows)});
  return t;
}

}  // namespace

EpMoeCpuBlock::EpMoeCpuBlock(dist::Communicator& comm, const Placement& placement,
                             std::shared_ptr<const std::vector<MoeLayerWeights>> layers, const MoeRefOptions& opt,
                             EpInput input, int threads, EpExchangeOptions exchange)
    : comm_(comm), placement_(placement), layers_(std::move(layers)), opt_(opt), input_(input), threads_(threads),
      ex_(exchange) {
  require(layers_ != nullptr && !layers_->empty(), "EpMoeCpuBlock: no layer weights");
  require(comm.memory() == dist::Memory::Host, "EpMoeCpuBlock needs a host-memory (MPI) communicator, got ",
          comm.backend());
  require(placement.num_ranks() == comm.size(), "EpMoeCpuBlock: the placement is for ", placement.num_ranks(),
          " ranks but the job has ", comm.size());
  const std::vector<int>& mine = placement.experts_of(comm.rank());
  for (const MoeLayerWeights& w : *layers_) {
    require(w.num_experts == placement.num_experts(), "EpMoeCpuBlock: layer ", w.layer, " has ", w.num_experts,
            " experts but the placement has ", placement.num_experts());
    require(w.expert_ids == mine, "EpMoeCpuBlock: layer ", w.layer, " holds ", w.num_held(),
            " experts that are not this rank's placement (load the model with the placement's experts)");
    gates_.push_back(bf16_to_float(std::span<const bf16_bits>(w.gate)));
  }
  if (threads_ <= 0)  // one MPI rank stands for one GPU: split this node's cores between its ranks
    threads_ = std::max(1, int(std::thread::hardware_concurrency()) / std::max(1, comm.local_size()));
  const std::size_t L = layers_->size(), N = comm.size();
  counts_.expert_rows.assign(L, std::vector<std::int64_t>(placement.num_experts(), 0));
  counts_.traffic.assign(L, std::vector<std::int64_t>(N * N, 0));
}

MoeBlockOutput EpMoeCpuBlock::forward(int layer, std::span<const float> x, int T) {
  require(layer >= 0 && layer < int(layers_->size()), "EpMoeCpuBlock: layer ", layer, " out of range");
  const MoeLayerWeights& w = (*layers_)[layer];
  const int H = w.hidden, E = w.num_experts, k = opt_.router.top_k, N = comm_.size(), me = comm_.rank();
  require(T >= 0 && x.size() == std::size_t(T) * H, "EpMoeCpuBlock: x has ", x.size(), " values, expected T*H = ",
          std::size_t(T) * H);
  const RowRange mine = input_ == EpInput::Replicated ? rows_of(me, N, T) : RowRange{0, T};
  const int Tm = mine.count;
  const std::span<const float> xm = x.subspan(std::size_t(mine.first) * H, std::size_t(Tm) * H);
  WallTimer clk;
  auto lap = [&](double& ms) {
    ms += clk.ms();
    clk.reset();
  };

  // --- route my rows: the router is replicated, so no one needs to be asked
  Routing r{Tm, k, {}, {}};
  if (Tm > 0) {
    std::vector<float> logits(std::size_t(Tm) * E);
    router_logits_cpu(xm, gates_[layer], Tm, H, E, logits);
    r = route(opt_.router.kind, logits, Tm, E, k, opt_.router.jitter_eps);
  }
  lap(times_.route_ms);

  // --- dispatch: plan, exchange the counts (everyone learns what it receives), then the rows
  plan_ = make_ep_send_plan(r, placement_, me);
  const std::vector<std::int64_t> sc(plan_.slot_counts.begin(), plan_.slot_counts.end());
  const std::vector<std::int64_t> all64 = comm_.allgather(sc);
  const std::vector<int> all(all64.begin(), all64.end());
  finish_ep_plan(plan_, placement_, all);
  const int S = plan_.send_rows(), R = plan_.recv_rows();
  const bool b16 = ex_.bf16_dispatch, direct = ex_.layout == EpLayout::Direct;
  const std::size_t SH = std::size_t(S) * H, RH = std::size_t(R) * H;
  if (b16) {
    send_bf16_.resize(SH);
    recv_bf16_.resize(RH);
  } else {
    send_.resize(SH);
    recv_.resize(RH);
  }
  for (int i = 0; i < S; ++i) {
    const float* src = &xm[std::size_t(plan_.send_token(i)) * H];
    if (b16)
      for (int c = 0; c < H; ++c) send_bf16_[std::size_t(i) * H + c] = float_to_bf16(src[c]);
    else
      std::copy_n(src, H, &send_[std::size_t(i) * H]);
  }
  const void* sendp = b16 ? static_cast<const void*>(send_bf16_.data()) : send_.data();
  void* recvp = b16 ? static_cast<void*>(recv_bf16_.data()) : recv_.data();
  const std::size_t row_bytes = H * (b16 ? sizeof(bf16_bits) : sizeof(float));
  if (direct)  // segments land in expert order already
    comm_.exchange(sendp, to_transfers(plan_.send_segments), recvp, to_transfers(plan_.recv_segments), row_bytes);
  else
    comm_.alltoallv(sendp, to_sizes(plan_.send_counts), recvp, to_sizes(plan_.recv_counts), row_bytes);
  xg_.resize(RH);  // permute layout: (source, local expert) order -> grouped by local expert
  for (int g = 0; g < R; ++g) {
    const std::size_t from = std::size_t(direct ? g : plan_.grouped_to_recv[g]) * H;
    float* to = &xg_[std::size_t(g) * H];
    if (b16)
      for (int c = 0; c < H; ++c) to[c] = bf16_to_float(recv_bf16_[from + c]);
    else
      std::copy_n(&recv_[from], H, to);
  }
  lap(times_.dispatch_ms);

  // --- my experts: local expert e owns grouped rows [local_offsets[e], local_offsets[e+1])
  yg_.assign(std::size_t(R) * H, 0.f);
  grouped_experts_cpu(w, xg_, plan_.local_offsets, yg_, opt_.round_h_to_bf16, threads_);
  lap(times_.experts_ms);

  // --- combine: rows go home the way they came; the weighted sum on the rank that routed the token
  yret_.resize(SH);
  if (direct) {
    comm_.exchange(yg_.data(), to_transfers(plan_.recv_segments), yret_.data(), to_transfers(plan_.send_segments),
                   H * sizeof(float));
  } else {
    yrecv_.resize(RH);
    for (int i = 0; i < R; ++i)
      std::copy_n(&yg_[std::size_t(plan_.recv_to_grouped[i]) * H], H, &yrecv_[std::size_t(i) * H]);
    comm_.alltoallv(yrecv_.data(), to_sizes(plan_.recv_counts), yret_.data(), to_sizes(plan_.send_counts),
                    H * sizeof(float));
  }
  MoeBlockOutput out;
  const std::size_t y_rows = input_ == EpInput::Replicated ? std::size_t(T) : std::size_t(Tm);
  out.y.assign(y_rows * H, 0.f);
  float* ym = out.y.data() + (input_ == EpInput::Replicated ? std::size_t(mine.first) * H : 0);
  for (int t = 0; t < Tm; ++t)
    for (int j = 0; j < k; ++j) {  // j from 0, as moe_layer_reference sums: the same bits
      const float g = r.weight(t, j);
      const float* row = &yret_[std::size_t(plan_.returned_row(t, j)) * H];
      float* o = ym + std::size_t(t) * H;
      for (int c = 0; c < H; ++c) o[c] += g * row[c];
    }
  lap(times_.combine_ms);

  // --- replicated attention needs every row's output on every rank: all-gather y and the routing
  if (input_ == EpInput::Replicated) {
    out.routing = Routing{T, k, std::vector<int>(std::size_t(T) * k), std::vector<float>(std::size_t(T) * k)};
    std::copy(r.ids.begin(), r.ids.end(), out.routing.ids.begin() + std::size_t(mine.first) * k);
    std::copy(r.weights.begin(), r.weights.end(), out.routing.weights.begin() + std::size_t(mine.first) * k);
    std::vector<dist::Transfer> sends, recvs;
    for (int p = 0; p < N; ++p) {
      if (p == me) continue;
      const RowRange rr = rows_of(p, N, T);
      sends.push_back({p, 0, std::size_t(Tm)});  // my block, from offset 0 of each send buffer
      recvs.push_back({p, std::size_t(rr.first), std::size_t(rr.count)});
    }
    comm_.exchange(ym, sends, out.y.data(), recvs, H * sizeof(float));
    comm_.exchange(r.ids.data(), sends, out.routing.ids.data(), recvs, k * sizeof(int));
    comm_.exchange(r.weights.data(), sends, out.routing.weights.data(), recvs, k * sizeof(float));
  } else {
    out.routing = std::move(r);
  }
  lap(times_.gather_ms);

  // --- statistics (the same on every rank: built from the all-gathered counts)
  auto& er = counts_.expert_rows[layer];  // per logical expert: every replica's rows from every rank
  const int slots = placement_.num_slots();
  for (int e = 0; e < E; ++e)
    for (int s = 0; s < N; ++s)
      for (int slot : placement_.replicas(e)) er[e] += all[std::size_t(s) * slots + slot];
  auto& tr = counts_.traffic[layer];
  for (std::size_t i = 0; i < tr.size(); ++i) tr[i] += plan_.traffic[i];
  ++times_.forwards;
  return out;
}

}  // namespace eplab
