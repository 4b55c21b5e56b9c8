#include "ep_stats.hpp"

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
  s.mean = {median(mr), median(md), median(me), median(mc)};
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

}  // namespace eplab
