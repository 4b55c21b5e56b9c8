// Chapter 04's printed tables and JSON: the traffic matrix, the time split over ranks, the bandwidth as
// nccl-tests reports it, and the output checksum. Rank 0 prints; nothing here moves data between ranks.
#pragma once
#include <cstdint>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "ep_stats.hpp"
#include "moe/ep_plan.hpp"
#include "moe/placement.hpp"

namespace eplab {

// Rows (and bytes) sent from every rank to every rank in the last forward, with the off-rank share.
std::string traffic_table(const EpPlan& plan, std::size_t row_bytes);
nlohmann::json traffic_json(const EpPlan& plan);
nlohmann::json expert_map_json(const Placement& placement);  // [rank] -> its experts

// The stage split (max and mean over ranks) and the bandwidth of dispatch, combine and the raw
// all-to-all-v of the same bytes. Returns the measured figures for the JSON report.
nlohmann::json print_times_and_bandwidth(const StageStats& st, double raw_dispatch_ms, double raw_combine_ms,
                                         const EpPlan& plan, std::size_t dispatch_row_bytes,
                                         std::size_t combine_row_bytes, int iters, bool gpu);

// FNV-1a over the bytes of the output: equal outputs, equal checksums (the N- and placement-independence
// tests compare this line across runs).
std::uint64_t checksum(std::span<const float> v);

}  // namespace eplab
