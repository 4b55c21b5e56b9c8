// An expert-parallel MoE block on the CPU: PhimoeCpuModel's MoeBlock over a Communicator (MPI ranks).
//
// Each rank holds the router of every layer and only its own experts (Placement). One forward:
//
//   x[T,H] ─ my rows ─▶ route (replicated router) ─▶ EP plan (ep_plan.hpp) ── slot counts: allgather
//          ─▶ all-to-all-v dispatch: rows to the ranks that own their experts ─▶ permute by local expert
//          ─▶ local SwiGLU experts (grouped_experts_cpu) ─▶ all-to-all-v back ─▶ y[t] = Σ_j w[t,j]·out[t,j]
//
// Which rows are "mine" depends on how the model around the block runs attention:
//  * EpInput::Replicated  every rank runs attention for the whole batch and calls forward() with the same T
//    rows. Rank r takes the contiguous block rows_of(r) (T/N rows, the first T mod N ranks one more),
//    routes and dispatches only those, and at the end every rank's outputs (and routings) are
//    all-gathered, so every rank returns the full y[T,H]: the next layer's replicated attention needs it.
//  * EpInput::Local       data-parallel: every rank passes its own rows (T may differ per rank, or be 0)
//    and gets back the output of those rows only (chapter 04's set-up). No all-gather.
//
// Rows travel as fp32 both ways by default: the model around the block is fp32, and with the same
// arithmetic in the same order as moe_layer_reference (router in double, experts with fp32 sums in c order,
// Σ_j from j = 0) the output is bit-identical to the single-process LocalMoeBlock, so greedy tokens do not
// depend on the EP size or the placement. EpExchangeOptions picks chapter 04's variants: the direct layout,
// and bf16 rows on the way out (exact when the tokens are bf16 already; the same bytes as the GPU path).
//
// Every rank must call forward() for every layer in the same order (it is collective). Errors in the
// middle of an exchange are local: mpi_main aborts the job (see dist/communicator.hpp).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "dist/communicator.hpp"
#include "model/phimoe_cpu.hpp"
#include "moe/ep_plan.hpp"
#include "moe/placement.hpp"
#include "util/bf16.hpp"

namespace eplab {

enum class EpInput { Replicated, Local };

// Wall time of each stage, summed over every forward() so far (this rank).
struct EpMoeTimes {
  double route_ms = 0, dispatch_ms = 0, experts_ms = 0, combine_ms = 0, gather_ms = 0;
  int forwards = 0;
  double total_ms() const { return route_ms + dispatch_ms + experts_ms + combine_ms + gather_ms; }
};

// Rows (token choices) summed over every forward() so far, per layer. The same on every rank.
struct EpMoeCounts {
  std::vector<std::vector<std::int64_t>> expert_rows;  // [L][E] rows computed by each expert
  std::vector<std::vector<std::int64_t>> traffic;      // [L][N*N] dispatch rows from rank s to rank d at s*N+d
  std::vector<std::int64_t> rank_rows(int layer) const;  // [N] rows each rank's experts computed (column sums)
  std::int64_t off_rank_rows(int layer) const;           // rows that crossed to another rank (off-diagonal)
};

// How rows travel (chapter 04 shows both layouts; chapter 05 uses the defaults).
struct EpExchangeOptions {
  EpLayout layout = EpLayout::Permute;
  // Dispatch rows as bf16 (half the bytes). Exact only when x is bf16-representable; the combine stays fp32.
  bool bf16_dispatch = false;
};

// The block rows of a replicated batch of T rows on rank r of N: [first, first + count).
struct RowRange {
  int first = 0, count = 0;
};
RowRange rows_of(int rank, int ranks, int T);

class EpMoeCpuBlock : public MoeBlock {
 public:
  // layers: per layer the router and exactly placement.experts_of(comm.rank()) (PhimoeCpuModel::moe_weights()
  // of a model loaded with those experts). Throws eplab::Error when a layer holds other experts.
  // threads: for the local experts (0: this node's cores split between its ranks).
  EpMoeCpuBlock(dist::Communicator& comm, const Placement& placement,
                std::shared_ptr<const std::vector<MoeLayerWeights>> layers, const MoeRefOptions& opt,
                EpInput input = EpInput::Replicated, int threads = 0, EpExchangeOptions exchange = {});

  // Replicated: y and routing for all T rows. Local: for this rank's T rows.
  MoeBlockOutput forward(int layer, std::span<const float> x, int T) override;

  const EpMoeTimes& times() const { return times_; }
  const EpMoeCounts& counts() const { return counts_; }
  const EpPlan& last_plan() const { return plan_; }  // the plan of the last forward (this rank's rows)

 private:
  dist::Communicator& comm_;
  const Placement& placement_;
  std::shared_ptr<const std::vector<MoeLayerWeights>> layers_;
  std::vector<std::vector<float>> gates_;  // [L] router weights widened to fp32 once
  MoeRefOptions opt_;
  EpInput input_;
  int threads_;
  EpExchangeOptions ex_;
  EpMoeTimes times_;
  EpMoeCounts counts_;
  EpPlan plan_;
  std::vector<float> send_, recv_, xg_, yg_, yrecv_, yret_;
  std::vector<bf16_bits> send_bf16_, recv_bf16_;  // the dispatch buffers when ex_.bf16_dispatch
};

}  // namespace eplab
