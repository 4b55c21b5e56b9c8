#include "weight_move.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <vector>

#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab {
namespace {

// One expert as one "row" of the exchange: w1, w3, w2 back to back (3 * I * H bf16).
void pack(const MoeLayerWeights& w, int i, bf16_bits* out) {
  const std::size_t per = std::size_t(w.inter) * w.hidden;
  for (const std::vector<bf16_bits>* t : {&w.w1, &w.w3, &w.w2}) {
    std::copy_n(t->begin() + std::ptrdiff_t(std::size_t(i) * per), per, out);
    out += per;
  }
}

// Who sends expert e to rank d: its first replica's rank in the old map (every rank computes the same).
struct Message {
  int src, dst, expert;
};
std::vector<Message> plan_moves(const Placement& from, const Placement& to) {
  std::vector<Message> m;
  for (int d = 0; d < to.num_ranks(); ++d) {
    std::vector<int> need = to.experts_of(d);
    std::sort(need.begin(), need.end());
    need.erase(std::unique(need.begin(), need.end()), need.end());
    const std::vector<int>& had = from.experts_of(d);
    for (int e : need)
      if (std::find(had.begin(), had.end(), e) == had.end()) m.push_back({from.owner(e), d, e});
  }
  return m;  // ordered by (destination, expert): both ends of a pair list their messages in the same order
}

}  // namespace

MoeLayerWeights move_expert_weights(dist::Communicator& comm, const MoeLayerWeights& mine, const Placement& from,
                                    const Placement& to, MoveStats& stats) {
  const int me = comm.rank();
  require(mine.expert_ids == from.experts_of(me), "move_expert_weights: rank ", me,
          " does not hold the old map's experts");
  WallTimer clk;
  const std::size_t row = 3 * std::size_t(mine.inter) * mine.hidden;  // bf16 values per expert
  const std::vector<Message> moves = plan_moves(from, to);
  std::vector<dist::Transfer> sends, recvs;
  std::vector<int> send_expert, recv_expert;
  for (const Message& m : moves) {
    if (m.src == me && m.dst != me) {
      sends.push_back({m.dst, send_expert.size(), 1});
      send_expert.push_back(m.expert);
    }
    if (m.dst == me) {
      require(m.src != me, "move_expert_weights: rank ", me, " both lacks and holds expert ", m.expert);
      recvs.push_back({m.src, recv_expert.size(), 1});
      recv_expert.push_back(m.expert);
    }
  }
  std::vector<bf16_bits> out(send_expert.size() * row), in(recv_expert.size() * row);
  for (std::size_t i = 0; i < send_expert.size(); ++i) {
    const auto it = std::find(mine.expert_ids.begin(), mine.expert_ids.end(), send_expert[i]);
    pack(mine, int(it - mine.expert_ids.begin()), &out[i * row]);
  }
  const std::size_t row_bytes = row * sizeof(bf16_bits);
  if (comm.memory() == dist::Memory::Host) {
    comm.exchange(out.data(), sends, in.data(), recvs, row_bytes);
  } else {  // NCCL moves device memory
    DeviceBuffer<bf16_bits> d_out(std::max<std::size_t>(out.size(), 1)), d_in(std::max<std::size_t>(in.size(), 1));
    if (!out.empty()) CUDA_CHECK(cudaMemcpy(d_out.get(), out.data(), out.size() * 2, cudaMemcpyHostToDevice));
    comm.exchange(d_out.get(), sends, d_in.get(), recvs, row_bytes);
    comm.sync();
    if (!in.empty()) CUDA_CHECK(cudaMemcpy(in.data(), d_in.get(), in.size() * 2, cudaMemcpyDeviceToHost));
  }

  // The new slots, in order: from what this rank held, or from what it received.
  MoeLayerWeights next;
  next.layer = mine.layer;
  next.hidden = mine.hidden;
  next.inter = mine.inter;
  next.num_experts = mine.num_experts;
  next.gate = mine.gate;
  const std::size_t per = std::size_t(mine.inter) * mine.hidden;
  std::vector<bf16_bits> buf(row);
  for (int e : to.experts_of(me)) {
    const auto held = std::find(mine.expert_ids.begin(), mine.expert_ids.end(), e);
    const bf16_bits* src = nullptr;
    if (held != mine.expert_ids.end()) {
      pack(mine, int(held - mine.expert_ids.begin()), buf.data());
      src = buf.data();
      ++stats.local;
    } else {
      const auto got = std::find(recv_expert.begin(), recv_expert.end(), e);
      require(got != recv_expert.end(), "move_expert_weights: rank ", me, " received no copy of expert ", e);
      src = &in[std::size_t(got - recv_expert.begin()) * row];
    }
    next.expert_ids.push_back(e);
    next.w1.insert(next.w1.end(), src, src + per);
    next.w3.insert(next.w3.end(), src + per, src + 2 * per);
    next.w2.insert(next.w2.end(), src + 2 * per, src + 3 * per);
  }
  stats.received += std::int64_t(recv_expert.size());
  stats.sent += std::int64_t(send_expert.size());
  stats.bytes_received += double(in.size()) * sizeof(bf16_bits);
  stats.ms += clk.ms();
  return next;
}

}  // namespace eplab
