// Tensor parallelism for the MoE layer: every rank holds a 1/N slice of EVERY expert (rows [r I/N, (r+1) I/N)
// of w1 and w3, the same columns of w2) and the whole router, routes the same tokens, and computes a partial
// output; one all-reduce (reduce-scatter + all-gather) adds the N partials. SwiGLU acts element by element
// over the intermediate dimension, so a slice of it is an expert of width I/N: the partial is the reference
// layer run on the sliced weights, and the sum over slices is the full layer.
#pragma once
#include <span>
#include <vector>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "moe/reference.hpp"

namespace eplab {

// Rank `rank`'s slice of every expert (all experts held; inter = I / N). Throws eplab::Error (one line)
// when N does not divide I.
MoeLayerWeights tp_slice(const MoeLayerWeights& full, int rank, int ranks);

// Sums every rank's v [rows, cols] elementwise, in rank order, and gives the sum to every rank: each rank
// adds one block of rows (reduce-scatter), then the blocks are exchanged (all-gather). Host memory (MPI).
void allreduce_rows(dist::Communicator& comm, std::vector<float>& v, int rows, int cols);

struct TpTimes {
  double experts_ms = 0, allreduce_ms = 0;
};
// One TP forward over the SAME tokens on every rank (x [T, H]): route, this rank's partial, all-reduce.
MoeRefResult tp_forward(dist::Communicator& comm, const MoeLayerWeights& slice, std::span<const float> x, int T,
                        const MoeRefOptions& opt, TpTimes& times);

}  // namespace eplab
