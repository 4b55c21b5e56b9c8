#include "ep_stats.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "util/timer.hpp"

namespace eplab {

StageStats time_forwards(EpLayer& layer, dist::Communicator& comm, int iters) {
  std::vector<double> r, d, e, c, t, mr, md, me, mc;
  const double N = comm.size();
  for (int i = 0; i < iters; ++i) {
    comm.barrier();
    const EpTimes x = layer.forward();
    r.push_back(comm.max(x.route_ms));
    d.push_back(comm.max(x.dispatch_ms));
    e.push_back(comm.max(x.experts_ms));
    c.push_back(comm.max(x.combine_ms));
    t.push_back(comm.max(x.total_ms()));
    mr.push_back(comm.sum(x.route_ms) / N);
    md.push_back(comm.sum(x.dispatch_ms) / N);
    me.push_back(comm.sum(x.experts_ms) / N);
    mc.push_back(comm.sum(x.combine_ms) / N);
  }
  StageStats s{median(r), median(d), median(e), median(c), median(t), {}};
  s.mean.route_ms = median(mr);
  s.mean.dispatch_ms = median(md);
  s.mean.experts_ms = median(me);
  s.mean.combine_ms = median(mc);
  return s;
}

std::pair<double, double> time_raw_exchange(EpLayer& layer, dist::Communicator& comm, int iters) {
  std::vector<double> a, b;
  for (int i = 0; i < iters; ++i) {
    const auto [x, y] = layer.raw_exchange_ms();
    a.push_back(comm.max(x));
    b.push_back(comm.max(y));
  }
  return {median(a), median(b)};
}

TimelineStats time_timeline(EpLayer& layer, dist::Communicator& comm, int iters) {
  TimelineStats out;
  std::vector<std::vector<double>> r0, mx;  // [mark][forward]
  for (int i = 0; i < iters; ++i) {
    comm.barrier();
    const EpTimeline tl = layer.timeline_forward();
    // Every rank records the same marks (they depend on the layout and chunks only): one allgather of
    // nanoseconds per forward gives rank 0's marks and the max over ranks.
    std::vector<std::int64_t> ns;
    for (const auto& m : tl) ns.push_back(std::llround(m.second * 1e6));
    const std::vector<std::int64_t> all = comm.allgather(ns);
    if (i == 0) {
      for (const auto& m : tl) out.marks.push_back(m.first);
      r0.resize(tl.size());
      mx.resize(tl.size());
    }
    for (std::size_t m = 0; m < tl.size(); ++m) {
      std::int64_t hi = all[m];
      for (int r = 1; r < comm.size(); ++r) hi = std::max(hi, all[std::size_t(r) * tl.size() + m]);
      r0[m].push_back(double(all[m]) * 1e-6);
      mx[m].push_back(double(hi) * 1e-6);
    }
  }
  for (std::size_t m = 0; m < out.marks.size(); ++m) {
    out.rank0_ms.push_back(median(r0[m]));
    out.max_ms.push_back(median(mx[m]));
  }
  return out;
}

Bandwidth bandwidth(double bytes, double ms, int N) {
  Bandwidth b;
  b.bytes = bytes;
  b.ms = ms;
  if (ms > 0) {
    b.algbw_gbps = bytes / (ms * 1e-3) / 1e9;
    b.busbw_gbps = b.algbw_gbps * double(N - 1) / N;
  }
  return b;
}

double mean_bytes_per_rank(const EpPlan& plan, std::size_t row_bytes) {
  double rows = 0;
  for (int v : plan.traffic) rows += v;
  return plan.ranks ? rows * double(row_bytes) / plan.ranks : 0.0;
}

Routing gather_routing(dist::Communicator& comm, const Routing& mine) {
  const int N = comm.size();
  Routing all;
  all.tokens = N * mine.tokens;
  all.k = mine.k;
  if (comm.rank() == 0) {
    all.ids.resize(std::size_t(N) * mine.ids.size());
    all.weights.resize(all.ids.size());
  }
  comm.gather(mine.ids.data(), mine.ids.size() * sizeof(int), all.ids.data(), 0);
  comm.gather(mine.weights.data(), mine.weights.size() * sizeof(float), all.weights.data(), 0);
  return all;
}

}  // namespace eplab
