#include "report.hpp"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "util/report.hpp"

namespace eplab {

std::uint64_t checksum(std::span<const float> v) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

std::string traffic_table(const EpPlan& plan, std::size_t row_bytes) {
  const int N = plan.ranks;
  std::vector<std::string> head{"rows (bytes)"};
  for (int d = 0; d < N; ++d) head.push_back(strf("to rank %d", d));
  head.push_back("sent");
  head.push_back("off-rank");
  Table t(head);
  for (int s = 0; s < N; ++s) {
    std::vector<std::string> row{strf("from rank %d", s)};
    long sent = 0, off = 0;
    for (int d = 0; d < N; ++d) {
      const long v = plan.traffic[std::size_t(s) * N + d];
      sent += v;
      if (d != s) off += v;
      row.push_back(strf("%ld (%s)", v, human_bytes(double(v) * row_bytes).c_str()));
    }
    row.push_back(strf("%ld (%s)", sent, human_bytes(double(sent) * row_bytes).c_str()));
    row.push_back(sent ? strf("%.0f%%", 100.0 * off / sent) : "-");
    t.add_row(row);
  }
  return t.str();
}

nlohmann::json traffic_json(const EpPlan& plan) {
  nlohmann::json m = nlohmann::json::array();
  for (int s = 0; s < plan.ranks; ++s)
    m.push_back(std::vector<int>(plan.traffic.begin() + std::size_t(s) * plan.ranks,
                                 plan.traffic.begin() + std::size_t(s + 1) * plan.ranks));
  return m;
}

nlohmann::json expert_map_json(const Placement& placement) {
  nlohmann::json m = nlohmann::json::array();
  for (int r = 0; r < placement.num_ranks(); ++r) m.push_back(placement.experts_of(r));
  return m;
}

nlohmann::json print_times_and_bandwidth(const StageStats& st, double raw_d, double raw_c, const EpPlan& plan,
                                         std::size_t dispatch_row_bytes, std::size_t combine_row_bytes, int iters,
                                         bool gpu) {
  const int N = plan.ranks;
  const double sum_max = std::max(st.route_ms + st.dispatch_ms + st.experts_ms + st.combine_ms, 1e-9);
  Table tt({"stage", "max over ranks ms", "mean over ranks ms", "share of max"});
  auto add = [&](const char* name, double mx, double mean) {
    tt.add_row({name, strf("%.3f", mx), strf("%.3f", mean), strf("%.0f%%", 100 * mx / sum_max)});
  };
  add("route", st.route_ms, st.mean.route_ms);
  add("dispatch", st.dispatch_ms, st.mean.dispatch_ms);
  add("experts", st.experts_ms, st.mean.experts_ms);
  add("combine", st.combine_ms, st.mean.combine_ms);
  tt.add_row({"whole forward", strf("%.3f", st.total_ms), strf("%.3f", st.mean.total_ms()), ""});
  std::printf("\ntime split, median of %d forwards (%s); waiting for a slower rank counts in dispatch and "
              "combine\n", iters, gpu ? "GPU, NCCL" : "CPU, MPI");
  std::fputs(tt.str().c_str(), stdout);

  const double Sd = mean_bytes_per_rank(plan, dispatch_row_bytes);
  const double Sc = mean_bytes_per_rank(plan, combine_row_bytes);
  const Bandwidth bd = bandwidth(Sd, st.dispatch_ms, N), bc = bandwidth(Sc, st.combine_ms, N);
  const Bandwidth both = bandwidth(Sd + Sc, st.dispatch_ms + st.combine_ms, N);
  const Bandwidth raw = bandwidth(Sd + Sc, raw_d + raw_c, N);
  Table bt({"exchange", "bytes/rank", "ms", "algbw GB/s", "busbw GB/s"});
  auto addb = [&](const char* name, const Bandwidth& b) {
    bt.add_row({name, human_bytes(b.bytes), strf("%.3f", b.ms), strf("%.3g", b.algbw_gbps), strf("%.3g", b.busbw_gbps)});
  };
  addb("dispatch", bd);
  addb("combine", bc);
  addb("dispatch+combine", both);
  addb("raw all-to-all-v, same bytes", raw);
  std::printf("\nbandwidth as nccl-tests reports all-to-all: algbw = bytes sent per rank / time, "
              "busbw = algbw * (N-1)/N\n");
  std::fputs(bt.str().c_str(), stdout);
  if (both.ms > 0)
    std::printf("dispatch+combine reach %.0f%% of the raw all-to-all-v's bandwidth (the rest is planning, "
                "count exchange, permutes and waiting for the slowest rank)\n",
                100.0 * (raw_d + raw_c) / (st.dispatch_ms + st.combine_ms));

  return {{"times_ms",
           {{"route", st.route_ms}, {"dispatch", st.dispatch_ms}, {"experts", st.experts_ms}, {"combine", st.combine_ms},
            {"total", st.total_ms}, {"raw_dispatch", raw_d}, {"raw_combine", raw_c}}},
          {"mean_times_ms",
           {{"route", st.mean.route_ms}, {"dispatch", st.mean.dispatch_ms}, {"experts", st.mean.experts_ms},
            {"combine", st.mean.combine_ms}}},
          {"busbw_gbps", {{"dispatch_combine", both.busbw_gbps}, {"raw", raw.busbw_gbps}}}};
}

}  // namespace eplab
