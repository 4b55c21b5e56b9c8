// What chapter 03 prints and saves: the placement map, the per-device table, the time split, the JSON.
// `unit` is "GPU" on GPUs and "device" for the CPU's simulated devices.
#pragma once
#include <vector>

#include <nlohmann/json.hpp>

#include "hub.hpp"
#include "moe/placement.hpp"

namespace eplab::ch03 {

// The median of every stage over several runs (each stage separately: the stages' medians need not
// come from one run).
HubTimes median_times(const std::vector<HubTimes>& runs);
// Runs forward() `warmups` times untimed, then `iters` times; returns the last run, its times replaced by
// the median over the timed runs.
template <typename Forward>
HubRun median_run(int warmups, int iters, Forward&& forward) {
  for (int w = 0; w < warmups; ++w) forward();
  HubRun run;
  std::vector<HubTimes> times;
  for (int it = 0; it < iters; ++it) {
    run = forward();
    times.push_back(run.times);
  }
  run.times = median_times(times);
  return run;
}

// The slowest device's time of one stage, e.g. slowest(t, &DeviceTimes::experts_ms).
double slowest(const HubTimes& t, double DeviceTimes::*stage);

void print_placement(const Placement& pl, const char* unit);
// One row per device: its experts, rows, distinct tokens, and its stage times.
void print_devices(const HubRun& run, int k, const char* unit);
// The stages in the order they run, and the bytes that went through device 0.
void print_split(const HubRun& run, const char* unit, int runs);

// The run's times and bytes, per device too, with `fields` added at the top level.
nlohmann::json run_json(const HubRun& run, int k, const nlohmann::json& fields = nlohmann::json::object());

}  // namespace eplab::ch03
