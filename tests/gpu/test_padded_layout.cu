// The padded expert layout of cublas-padded (kernels/padded_layout.cuh) against a CPU model of the layout:
// the dispatch plan comes from the CPU (common/moe/dispatch_plan.cpp), padded rows are computed here from
// the definition (expert e's m-th row at e * M_pad + m, padding rows zero), and every copy is compared bit
// for bit (the kernels only move bf16 values). The combine is compared with an fp32 CPU sum (1 bf16 ulp).
// Sizes cover T = 0 and 1, empty experts at both ends, the vector and the scalar (H % 8 != 0, unaligned)
// paths, and the fallback to the contiguous layout when M_pad exceeds the cap.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "kernel_test_util.cuh"
#include "moe/dispatch_plan.hpp"
#include "padded_layout.cuh"
#include "permute.cuh"

using namespace eplab;
using namespace eplab::test;

namespace {

// Routing of T tokens over E experts, top-k distinct ids drawn from `open` experts only (the others stay
// empty); `heavy` >= 0: every token's first choice is that expert.
Routing random_routing(Rng& rng, int T, int k, int E, const std::vector<int>& open, int heavy) {
  Routing r;
  r.tokens = T, r.k = k;
  for (int t = 0; t < T; ++t) {
    std::vector<int> chosen;
    if (heavy >= 0) chosen.push_back(heavy);
    while (int(chosen.size()) < k) {
      const int e = open[size_t(rng.next_u64() % open.size())];
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (int j = 0; j < k; ++j) {
      r.ids.push_back(chosen[size_t(j)]);
      r.weights.push_back(rng.uniform(0.1f, 1.f));
    }
  }
  return r;
}

// The padded layout from its definition: [n * m_pad, H], expert e's m-th row (plan order) at e * m_pad + m.
std::vector<bf16_bits> padded_cpu(const std::vector<bf16_bits>& rows_by_plan, const DispatchPlan& p, int m_pad,
                                  int H) {
  std::vector<bf16_bits> out(size_t(p.num_experts) * m_pad * H, bf16_bits(0));
  for (int e = 0; e < p.num_experts; ++e)
    for (int m = 0; m < p.counts[size_t(e)]; ++m)
      std::copy_n(&rows_by_plan[size_t(p.offsets[size_t(e)] + m) * H], H, &out[(size_t(e) * m_pad + m) * H]);
  return out;
}

std::string first_mismatch(const std::vector<bf16_bits>& got, const std::vector<bf16_bits>& want, int H) {
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i)
    if (got[i] != want[i]) {
      std::ostringstream os;
      os << "first mismatch at row " << i / size_t(H) << ", column " << i % size_t(H) << ": got 0x" << std::hex
         << got[i] << ", want 0x" << want[i];
      return os.str();
    }
  return got.size() == want.size() ? "" : "sizes differ";
}

void check_layout(int T, int k, int E, int H, const std::vector<int>& open, int heavy, int shift, std::uint64_t seed) {
  std::ostringstream what;
  what << "T=" << T << " k=" << k << " E=" << E << " H=" << H << " open experts " << open.size() << " heavy " << heavy
       << " pointer shift " << shift;
  INFO(what.str());
  Rng rng(seed);
  const Routing routing = random_routing(rng, T, k, E, open, heavy);
  const DispatchPlan plan = make_dispatch_plan(routing, E);
  const int rows = T * k;
  const Bf16Data x = random_bf16(rng, size_t(T) * H);
  const int m_pad = gpu::padded_rows_per_expert(plan.offsets.data(), E);
  {
    int most = 0;
    for (int c : plan.counts) most = std::max(most, c);
    REQUIRE(m_pad == (most + 63) / 64 * 64);
  }
  // The permuted rows in plan order (what permute_rows writes), from the definition.
  std::vector<bf16_bits> xp(size_t(rows) * H);
  for (int r = 0; r < rows; ++r)
    std::copy_n(&x.bits[size_t(plan.assignment[size_t(r)] / k) * H], H, &xp[size_t(r) * H]);

  Stream s;
  // Buffers with `shift` extra elements in front: shift 1 breaks 16-byte alignment (scalar kernels).
  auto with_shift = [&](const std::vector<bf16_bits>& v) {
    std::vector<bf16_bits> o(size_t(shift), bf16_bits(0));
    o.insert(o.end(), v.begin(), v.end());
    return o;
  };
  DevBuf<bf16_bits> d_x(with_shift(x.bits.empty() ? std::vector<bf16_bits>(1) : x.bits));
  DevBuf<int> d_off(plan.offsets), d_assign(plan.assignment.empty() ? std::vector<int>(1) : plan.assignment);
  DevBuf<int> d_row_of(plan.row_of.empty() ? std::vector<int>(1) : plan.row_of);
  DevBuf<int> d_ids(routing.ids.empty() ? std::vector<int>(1) : routing.ids);
  DevBuf<float> d_w(routing.weights.empty() ? std::vector<float>(1) : routing.weights);

  for (bool fits : {true, false}) {
    CAPTURE(fits);
    // Cap: just M_pad (fits), or one step below it (the contiguous fallback); M_pad 64 cannot go below.
    const int m_cap = fits ? std::max(m_pad, gpu::kPadMultiple) : m_pad - gpu::kPadMultiple;
    if (!fits && m_cap < gpu::kPadMultiple) continue;
    const size_t cap_rows = std::max<size_t>(size_t(rows), size_t(E) * m_cap);
    DevBuf<bf16_bits> d_xpad(cap_rows * H + size_t(shift) + 1);
    d_xpad.poison();
    device_sync();
    gpu::permute_rows_padded(as_bf16(d_x) + shift, d_off.get(), d_assign.get(), T, k, E, m_cap, H,
                             as_bf16(d_xpad) + shift, s);
    s.sync();
    std::vector<bf16_bits> got = d_xpad.download();
    got.erase(got.begin(), got.begin() + shift);
    const bool padded = m_pad > 0 && m_pad <= m_cap;
    const std::vector<bf16_bits> want = padded ? padded_cpu(xp, plan, m_pad, H) : xp;
    got.resize(want.size());
    CHECK_MESSAGE(got == want, (padded ? "padded" : "contiguous"), " permute: ", first_mismatch(got, want, H));

    // Combine from that layout: y[t] = sum_j w[t,j] * ypad[row of (t, j)], ypad random here.
    const int yrows = padded ? E * m_pad : rows;
    if (T == 0 || yrows == 0) continue;
    const Bf16Data yp = random_bf16(rng, size_t(yrows) * H);
    DevBuf<bf16_bits> d_yp(with_shift(yp.bits)), d_y(size_t(T) * H + size_t(shift));
    d_y.poison();
    device_sync();
    gpu::unpermute_combine_padded(as_bf16(d_yp) + shift, yrows, d_ids.get(), d_row_of.get(), d_off.get(),
                                  padded ? m_pad : 0, d_w.get(), T, k, E, H, as_bf16(d_y) + shift, s);
    s.sync();
    std::vector<bf16_bits> ybits = d_y.download();
    ybits.erase(ybits.begin(), ybits.begin() + shift);
    int bad = 0;
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < H; ++c) {
        float acc = 0.f;
        for (int j = 0; j < k; ++j) {
          const int a = t * k + j, r = plan.row_of[size_t(a)], e = routing.ids[size_t(a)];
          const int p = padded ? e * m_pad + (r - plan.offsets[size_t(e)]) : r;
          acc += routing.weights[size_t(a)] * yp.f[size_t(p) * H + c];
        }
        const float g = bf16_to_float(ybits[size_t(t) * H + c]);
        if (!(std::fabs(g - acc) <= std::ldexp(std::fabs(acc), -7) + 1e-6f) && bad++ < 3)
          FAIL_CHECK("combine y[", t, ", ", c, "] = ", g, ", want ", acc);
      }
    CHECK(bad == 0);
  }

  // pad_rows / unpad_rows: contiguous -> padded -> contiguous, bit for bit.
  if (rows > 0) {
    DevBuf<bf16_bits> d_xp(with_shift(xp)), d_pad(size_t(E) * m_pad * H + size_t(shift)), d_back(xp.size() + size_t(shift));
    d_pad.poison();
    d_back.poison();
    device_sync();
    gpu::pad_rows(as_bf16(d_xp) + shift, d_off.get(), E, m_pad, H, as_bf16(d_pad) + shift, s);
    gpu::unpad_rows(as_bf16(d_pad) + shift, d_off.get(), E, m_pad, rows, H, as_bf16(d_back) + shift, s);
    s.sync();
    std::vector<bf16_bits> pad = d_pad.download(), back = d_back.download();
    pad.erase(pad.begin(), pad.begin() + shift);
    back.erase(back.begin(), back.begin() + shift);
    const std::vector<bf16_bits> want = padded_cpu(xp, plan, m_pad, H);
    CHECK_MESSAGE(pad == want, "pad_rows: ", first_mismatch(pad, want, H));
    CHECK_MESSAGE(back == xp, "unpad_rows(pad_rows(x)) != x: ", first_mismatch(back, xp, H));
  }
}

}  // namespace

TEST_CASE("padded layout: M_pad and the cap on the host") {
  const std::vector<int> none = {0, 0, 0}, one = {0, 1, 1}, full = {0, 64, 64}, over = {0, 65, 65};
  CHECK(gpu::padded_rows_per_expert(none.data(), 2) == 0);
  CHECK(gpu::padded_rows_per_expert(one.data(), 2) == 64);
  CHECK(gpu::padded_rows_per_expert(full.data(), 2) == 64);
  CHECK(gpu::padded_rows_per_expert(over.data(), 2) == 128);
  CHECK(gpu::padded_capacity_per_expert(2.f, 16, 0) == 64);
  CHECK(gpu::padded_capacity_per_expert(2.f, 16, 512) == 64);
  CHECK(gpu::padded_capacity_per_expert(2.f, 16, 513) == 128);
  CHECK(gpu::padded_capacity_per_expert(2.f, 16, 8192) == 1024);
  CHECK(gpu::padded_capacity_per_expert(1.5f, 16, 32768) == 3072);
  CHECK_THROWS_AS(gpu::padded_capacity_per_expert(0.5f, 16, 100), Error);
}

TEST_CASE("padded layout: permute_rows_padded, unpermute_combine_padded, pad_rows/unpad_rows vs the definition") {
  std::vector<int> all(16), middle;
  for (int e = 0; e < 16; ++e) all[size_t(e)] = e;
  for (int e = 3; e < 13; ++e) middle.push_back(e);  // experts 0-2 and 13-15 empty
  std::uint64_t seed = 700;
  for (int shift : {0, 1})
    for (int H : {256, 100}) {
      check_layout(0, 2, 16, H, all, -1, shift, seed++);
      check_layout(1, 2, 16, H, all, -1, shift, seed++);
      check_layout(37, 2, 16, H, middle, -1, shift, seed++);
      check_layout(300, 2, 16, H, all, -1, shift, seed++);
      check_layout(300, 2, 16, H, middle, 7, shift, seed++);  // expert 7 gets every token: M_pad 320
      check_layout(90, 4, 16, H, all, -1, shift, seed++);
    }
}
