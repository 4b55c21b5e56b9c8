#include "report.hpp"

#include <algorithm>
#include <cstdio>
#include <string>

#include "util/report.hpp"
#include "util/timer.hpp"

namespace eplab::ch03 {

HubTimes median_times(const std::vector<HubTimes>& runs) {
  HubTimes m = runs.front();
  auto med = [&](auto get) {
    std::vector<double> v;
    for (const HubTimes& r : runs) v.push_back(get(r));
    return median(v);
  };
  for (double HubTimes::*f : {&HubTimes::route_ms, &HubTimes::plan_ms, &HubTimes::spokes_ms, &HubTimes::combine_ms,
                              &HubTimes::total_ms})
    m.*f = med([&](const HubTimes& r) { return r.*f; });
  for (size_t g = 0; g < m.dev.size(); ++g)
    for (double DeviceTimes::*f : {&DeviceTimes::gather_ms, &DeviceTimes::copy_out_ms, &DeviceTimes::experts_ms,
                                   &DeviceTimes::copy_back_ms})
      m.dev[g].*f = med([&](const HubTimes& r) { return r.dev[g].*f; });
  return m;
}

double slowest(const HubTimes& t, double DeviceTimes::*stage) {
  double m = 0;
  for (const DeviceTimes& d : t.dev) m = std::max(m, d.*stage);
  return m;
}

void print_placement(const Placement& pl, const char* unit) {
  std::printf("placement %s: %d experts on %d %ss (%s)\n", placement_name(pl.kind()), pl.num_experts(),
              pl.num_ranks(), unit,
              pl.even() ? strf("%d each", pl.num_experts() / pl.num_ranks()).c_str()
                        : strf("uneven: the first %d hold %d, the rest %d", pl.num_experts() % pl.num_ranks(),
                               pl.max_local(), pl.max_local() - 1).c_str());
  for (int g = 0; g < pl.num_ranks(); ++g) {
    std::string ids;
    for (int e : pl.experts_of(g)) ids += strf(" %d", e);
    std::printf("  %s %d: experts%s\n", unit, g, ids.c_str());
  }
  std::string experts = "  expert:", owners = strf("  %-6s:", unit);
  for (int e = 0; e < pl.num_experts(); ++e) {
    experts += strf(" %2d", e);
    owners += strf(" %2d", pl.owner(e));
  }
  std::printf("%s\n%s\n", experts.c_str(), owners.c_str());
}

void print_devices(const HubRun& run, int k, const char* unit) {
  const HubLayout& L = run.layout;
  std::printf("\nper %s (a row = one (token, expert) pair; a token whose experts share a %s travels once per expert)\n",
              unit, unit);
  Table tab({unit, "experts", "rows", "share", "tokens", "gather ms", "copy out ms", "experts ms", "copy back ms",
             "copy GB/s"});
  for (size_t g = 0; g < L.dev.size(); ++g) {
    const DeviceSlice& s = L.dev[g];
    const DeviceTimes& d = run.times.dev[g];
    const bool stays = g == 0;  // device 0's rows never leave it: no copy to time
    const double bytes = 2.0 * s.rows() * run.row_bytes, copy_ms = d.copy_out_ms + d.copy_back_ms;
    tab.add_row({strf("%zu", g), strf("%zu", s.experts.size()), strf("%d", s.rows()),
                 strf("%.1f%%", L.total_rows ? 100.0 * s.rows() / L.total_rows : 0.0),
                 strf("%d", s.distinct_tokens(k)), strf("%.3f", d.gather_ms),
                 stays ? std::string("stays") : strf("%.3f", d.copy_out_ms), strf("%.3f", d.experts_ms),
                 stays ? std::string("stays") : strf("%.3f", d.copy_back_ms),
                 stays ? std::string("-") : strf("%.1f", copy_ms > 0 ? bytes / (copy_ms * 1e6) : 0.0)});
  }
  tab.print();
}

void print_split(const HubRun& run, const char* unit, int runs) {
  const HubTimes& t = run.times;
  const double out = double(run.bytes_out()), back = double(run.bytes_back());
  std::printf("\ntime split, median of %d run%s (ms)\n", runs, runs == 1 ? "" : "s");
  Table tab({"stage", "where", "ms"});
  const bool gpu = std::string(unit) == "GPU";
  tab.add_row({gpu ? "route: router GEMM + top-k + ids/w to host" : "route: router GEMM + top-k", strf("%s 0", unit),
               strf("%.3f", t.route_ms)});
  tab.add_row({"plan + index upload", "host", strf("%.3f", t.plan_ms)});
  tab.add_row({"gather (slowest)", strf("%s 0", unit), strf("%.3f", slowest(t, &DeviceTimes::gather_ms))});
  tab.add_row({"copy out (slowest)", strf("%s 0 -> g", unit), strf("%.3f", slowest(t, &DeviceTimes::copy_out_ms))});
  tab.add_row({"experts (slowest)", strf("each %s", unit), strf("%.3f", slowest(t, &DeviceTimes::experts_ms))});
  tab.add_row({"copy back (slowest)", strf("g -> %s 0", unit), strf("%.3f", slowest(t, &DeviceTimes::copy_back_ms))});
  tab.add_row({"spokes: first gather .. last result back", "all", strf("%.3f", t.spokes_ms)});
  tab.add_row({"combine", strf("%s 0", unit), strf("%.3f", t.combine_ms)});
  tab.add_row({"total (wall clock)", "", strf("%.3f", t.total_ms)});
  tab.print();
  const int own = run.layout.dev.empty() ? 0 : run.layout.dev[0].rows();
  std::printf("through %s 0: %s out + %s back = %s (%d of %d rows leave %s 0; its own %d stay)\n", unit,
              human_bytes(out).c_str(), human_bytes(back).c_str(), human_bytes(out + back).c_str(),
              run.layout.total_rows - own, run.layout.total_rows, unit, own);
}

nlohmann::json run_json(const HubRun& run, int k, const nlohmann::json& fields) {
  const HubTimes& t = run.times;
  nlohmann::json devs = nlohmann::json::array();
  for (size_t g = 0; g < run.layout.dev.size(); ++g) {
    const DeviceSlice& s = run.layout.dev[g];
    const DeviceTimes& d = t.dev[g];
    devs.push_back({{"experts", s.experts}, {"rows", s.rows()}, {"tokens", s.distinct_tokens(k)},
                    {"gather_ms", d.gather_ms}, {"copy_out_ms", d.copy_out_ms}, {"experts_ms", d.experts_ms},
                    {"copy_back_ms", d.copy_back_ms}});
  }
  nlohmann::json j = {{"route_ms", t.route_ms},     {"plan_ms", t.plan_ms},   {"spokes_ms", t.spokes_ms},
                      {"combine_ms", t.combine_ms}, {"total_ms", t.total_ms}, {"bytes_out", run.bytes_out()},
                      {"bytes_back", run.bytes_back()}, {"devices", devs}};
  j.update(fields);
  return j;
}

}  // namespace eplab::ch03
