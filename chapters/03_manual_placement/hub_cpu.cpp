#include "hub_cpu.hpp"

#include <algorithm>
#include <cstring>
#include <thread>

#include "moe/grouped_cpu.hpp"
#include "util/check.hpp"
#include "util/timer.hpp"

namespace eplab::ch03 {

HubCpu::HubCpu(std::span<const bf16_bits> gate, std::vector<MoeLayerWeights> dev_weights, RouterKind router,
               int top_k, float jitter_eps)
    : gate_(bf16_to_float(gate)), w_(std::move(dev_weights)), router_(router), k_(top_k), eps_(jitter_eps) {
  require(!w_.empty(), "HubCpu needs at least one device");
  H_ = w_[0].hidden;
  E_ = w_[0].num_experts;
  xp_.resize(w_.size());
  yp_.resize(w_.size());
}

HubRun HubCpu::forward(std::span<const float> x, int T) {
  const int H = H_, E = E_, k = k_, N = int(w_.size());
  require(x.size() == size_t(T) * H, "HubCpu::forward: x has ", x.size(), " values, expected ", size_t(T) * H);
  HubRun run;
  run.row_bytes = sizeof(float) * size_t(H);
  run.times.dev.resize(N);
  WallTimer total;

  // 1. Route on device 0: logits = x gate^T, then top-k (or sparsemixer).
  WallTimer t;
  std::vector<float> logits(size_t(T) * E);
  router_logits_cpu(x, gate_, T, H, E, logits);
  run.routing = route(router_, logits, T, E, k, eps_);
  run.times.route_ms = t.ms();

  // 2. Plan on the host: which rows go to which device, and where their results come back.
  t.reset();
  const DispatchPlan plan = make_dispatch_plan(run.routing, E);
  std::vector<std::vector<int>> experts_of(N);
  for (int g = 0; g < N; ++g) experts_of[g] = w_[g].expert_ids;
  run.layout = make_hub_layout(plan, experts_of);
  const HubLayout& L = run.layout;
  send_.resize(size_t(L.total_rows) * H);
  recv_.resize(size_t(L.total_rows) * H);
  run.times.plan_ms = t.ms();

  // 3. One host thread per device: gather on device 0, copy out, experts, copy back.
  t.reset();
  auto spoke = [&](int g) {
    const DeviceSlice& s = L.dev[g];
    DeviceTimes& dt = run.times.dev[g];
    const size_t bytes = size_t(s.rows()) * H * sizeof(float);
    // Device 0's own experts read and write the hub's buffers directly: its rows never travel.
    xp_[g].resize(size_t(s.rows()) * H);
    yp_[g].resize(size_t(s.rows()) * H);
    // data() + offset, not &v[offset]: with no tokens the buffers are empty, and v[0] of an empty vector is
    // undefined behaviour (the sanitizer build's 03_manual_placement_cpu_n3_T0 test).
    float* gathered = g == 0 ? xp_[g].data() : send_.data() + size_t(s.base) * H;
    float* result = g == 0 ? recv_.data() + size_t(s.base) * H : yp_[g].data();

    WallTimer st;
    for (int r = 0; r < s.rows(); ++r) std::memcpy(&gathered[size_t(r) * H], &x[size_t(s.assignment[r] / k) * H], H * 4);
    dt.gather_ms = st.ms();

    st.reset();
    if (g != 0 && bytes) std::memcpy(xp_[g].data(), gathered, bytes);  // stands in for cudaMemcpyPeerAsync
    dt.copy_out_ms = st.ms();

    st.reset();
    grouped_experts_cpu(w_[g], std::span<const float>(xp_[g].data(), size_t(s.rows()) * H), s.offsets,
                        std::span<float>(result, size_t(s.rows()) * H), /*round_h=*/false, /*threads=*/1);
    dt.experts_ms = st.ms();

    st.reset();
    if (g != 0 && bytes) std::memcpy(&recv_[size_t(s.base) * H], result, bytes);  // back to device 0
    dt.copy_back_ms = st.ms();
  };
  std::vector<std::thread> threads;
  for (int g = 0; g < N; ++g) threads.emplace_back(spoke, g);
  for (auto& th : threads) th.join();
  run.times.spokes_ms = t.ms();

  // 4. Combine on device 0: y[t] = sum_j w[t, j] * result of (t, j), in j order as the reference sums.
  t.reset();
  run.y.assign(size_t(T) * H, 0.f);
  for (int tok = 0; tok < T; ++tok)
    for (int j = 0; j < k; ++j) {
      const float w = run.routing.weight(tok, j);
      const float* src = &recv_[size_t(L.slot_of[size_t(tok) * k + j]) * H];
      float* dst = &run.y[size_t(tok) * H];
      for (int o = 0; o < H; ++o) dst[o] += w * src[o];
    }
  run.times.combine_ms = t.ms();
  run.times.total_ms = total.ms();
  return run;
}

}  // namespace eplab::ch03
