// The engine check `ep_engine_checks --vary` (a GPU test of kernels/ep/ep_moe_gpu.hpp): one run proves that
// EpMoeGpu is right when T changes from call to call and differs between ranks, including T = 0 on some
// ranks and on all of them, and that two layers sharing one workspace (as chapter 05's 32 layers do) keep
// their own weights and routing.
//
// Schedule: a fixed list of calls; call c gives even ranks a[c] tokens and odd ranks b[c]. The sizes walk
// every expert strategy of grouped_experts (weight-stream <= 32 rows, cublas-grouped, cublas-streams
// >= 4096 rows), grow the buffers, shrink again, and hit the empty cases. Each call: every rank's tokens
// are its slice of one global batch (seeded by call), layer A and layer B run one after the other with
// time_stages off (work only queued, as in a model), then rank 0 checks both layers' outputs and
// routings for every token against the single-device CPU reference. Layer B's input is layer A's
// output, bf16, as in a model (so B's reference uses what A really produced on the GPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <cstdio>

#include "cuda_check.hpp"
#include "ep/ep_moe_gpu.hpp"
#include "ep_layer.hpp"
#include "moe/layer_check.hpp"
#include "moe/layer_problem.hpp"
#include "moe/reference.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

namespace {

struct DeviceRows {
  __nv_bfloat16* p = nullptr;
  explicit DeviceRows(std::size_t n) { CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * 2)); }
  ~DeviceRows() { cudaFree(p); }
  DeviceRows(const DeviceRows&) = delete;
  DeviceRows& operator=(const DeviceRows&) = delete;
};

// Gathers every rank's rows (T_r rows of `width` values, T_r may differ) into one global array on rank 0.
template <typename V>
std::vector<V> gather_rows(dist::Communicator& comm, const std::vector<V>& mine, const std::vector<int>& T, int width) {
  const int N = comm.size();
  const int Tmax = *std::max_element(T.begin(), T.end());
  std::vector<V> padded(std::size_t(Tmax) * width, V{});
  std::copy(mine.begin(), mine.end(), padded.begin());
  std::vector<V> all(comm.rank() == 0 ? padded.size() * N : 0);
  comm.gather(padded.data(), padded.size() * sizeof(V), all.data(), 0);
  std::vector<V> out;
  if (comm.rank() == 0)
    for (int r = 0; r < N; ++r)
      out.insert(out.end(), all.begin() + std::size_t(r) * Tmax * width,
                 all.begin() + (std::size_t(r) * Tmax + T[r]) * width);
  return out;
}

}  // namespace

bool run_ep_vary(dist::Communicator& comm, const Checkpoint& ckpt, const LayerOptions& lo, PlacementKind pkind,
                 EpLayout layout, int chunks, std::uint64_t seed) {
  const int rank = comm.rank(), N = comm.size();
  const std::vector<int> a{3, 0, 16, 200, 0, 2500, 1, 129, 33};
  const std::vector<int> b{0, 7, 16, 37, 0, 1800, 40, 0, 2};
  const int layers = ckpt.config().num_hidden_layers;
  const int la = lo.layer, lb = layers > 1 ? (lo.layer + 1) % layers : lo.layer;

  std::optional<Placement> placement;
  LayerProblem pa, pb;
  std::unique_ptr<EpMoeGpu> A, B;
  dist::all_or_none(comm, [&] {
    placement.emplace(pkind, ckpt.config().num_local_experts, N);
    LayerOptions o = lo;
    o.tokens = 1;
    pa = make_layer_problem(ckpt, o, seed, placement->experts_of(rank));
    o.layer = lb;
    pb = make_layer_problem(ckpt, o, seed, placement->experts_of(rank));
    const RouterCfg rc{pa.router, pa.top_k, pa.jitter_eps};
    A = std::make_unique<EpMoeGpu>(comm, *placement, pa.weights, rc, layout);
    B = std::make_unique<EpMoeGpu>(comm, *placement, pb.weights, rc, layout);
    A->set_chunks(chunks);
    B->set_chunks(chunks);
  });
  const int H = pa.weights.hidden, k = pa.top_k;
  const MoeLayerWeights full_a = rank == 0 ? load_moe_layer(ckpt, la) : MoeLayerWeights{};
  const MoeLayerWeights full_b = rank == 0 ? load_moe_layer(ckpt, lb) : MoeLayerWeights{};
  const MoeRefOptions ropt{{pa.router, k, pa.jitter_eps}, true};
  if (rank == 0)
    std::printf("vary: layers %d and %d share one workspace; %s layout, %d chunk(s), %s placement; %zu calls, T per "
                "rank alternating between even and odd ranks\n",
                la, lb, layout_name(layout), chunks, placement_name(pkind), a.size());

  bool all_pass = true;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(comm.stream());
  for (std::size_t c = 0; c < a.size(); ++c) {
    std::vector<int> T(N);
    int total = 0, first = 0;
    for (int r = 0; r < N; ++r) {
      T[r] = r % 2 == 0 ? a[c] : b[c];
      if (r < rank) first += T[r];
      total += T[r];
    }
    const int t = T[rank];
    // this call's global batch (same on every rank), this rank's slice
    LayerOptions o = lo;
    o.tokens = total;
    LayerProblem g = make_layer_problem(ckpt, o, seed + 1000 + c, {0});
    std::vector<bf16_bits> x(g.x_bf16.begin() + std::size_t(first) * H, g.x_bf16.begin() + std::size_t(first + t) * H);

    DeviceRows dx(std::size_t(t) * H), dy(std::size_t(t) * H), dz(std::size_t(t) * H);
    if (t) CUDA_CHECK(cudaMemcpy(dx.p, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    A->forward_device(dx.p, t, dy.p, false);  // queued only
    B->forward_device(dy.p, t, dz.p, false);  // reads A's output from the same stream
    std::vector<bf16_bits> ya(std::size_t(t) * H), yb(ya.size());
    CUDA_CHECK(cudaStreamSynchronize(s));
    if (t) {
      CUDA_CHECK(cudaMemcpy(ya.data(), dy.p, ya.size() * 2, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(yb.data(), dz.p, yb.size() * 2, cudaMemcpyDeviceToHost));
    }
    const Routing ra = A->routing(), rb = B->routing();  // A's after B ran: per-layer state
    require(ra.tokens == t && rb.tokens == t, "vary: routing() reports ", ra.tokens, "/", rb.tokens, " tokens, expected ", t);

    const auto ya_all = gather_rows(comm, ya, T, H), yb_all = gather_rows(comm, yb, T, H);
    const auto ia = gather_rows(comm, ra.ids, T, k), ib = gather_rows(comm, rb.ids, T, k);
    const auto wa = gather_rows(comm, ra.weights, T, k), wb = gather_rows(comm, rb.weights, T, k);
    int ok = 1;
    if (rank == 0) {
      std::string line = strf("vary call %zu: T per rank", c);
      for (int r = 0; r < N; ++r) line += strf(" %d", T[r]);
      for (int l = 0; l < 2; ++l) {
        const std::vector<float> in = bf16_to_float(std::span<const bf16_bits>(l == 0 ? g.x_bf16 : ya_all));
        const MoeRefResult ref = moe_layer_reference(l == 0 ? full_a : full_b, in, total, ropt);
        Routing rr;
        rr.tokens = total;
        rr.k = k;
        rr.ids = l == 0 ? ia : ib;
        rr.weights = l == 0 ? wa : wb;
        const std::vector<float> y = bf16_to_float(std::span<const bf16_bits>(l == 0 ? ya_all : yb_all));
        const LayerCheck chk = check_layer(ref, rr, y, H, pa.router, pa.jitter_eps, 1e-2);
        ok = ok && chk.pass;
        line += strf("; layer %d: %s %s", l == 0 ? la : lb, chk.pass ? "PASS" : "FAIL", chk.summary().c_str());
      }
      std::printf("%s\n", line.c_str());
    }
    comm.set_long_wait(true);  // rank 0's CPU reference may outlast the host-collective timeout
    comm.bcast(&ok, sizeof ok, 0);
    comm.set_long_wait(false);
    all_pass = all_pass && ok;
  }
  if (rank == 0)
    std::printf("%s ep_engine_checks --vary: N=%d %s %s, chunks %d, %zu calls x 2 layers\n",
                all_pass ? "CHECK PASS" : "CHECK FAIL", N, placement_name(pkind), layout_name(layout), chunks, a.size());
  return all_pass;
}

}  // namespace eplab
