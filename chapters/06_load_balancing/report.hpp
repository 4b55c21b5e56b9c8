// Chapter 06's tables and JSON: the measured load per expert, and the before/after comparison.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "balance_run.hpp"
#include "moe/eplb.hpp"
#include "moe/placement.hpp"
#include "skewed_tokens.hpp"

namespace eplab {

std::string join_ints(const std::vector<int>& v);  // "3, 7"

// Tokens per expert over the window, hottest first, with the replicas EPLB gave each.
std::string expert_load_table(const std::vector<double>& tokens, const std::vector<int>& replicas);

struct BalanceReport {
  std::string text;     // the before/after table, ready to print
  std::string summary;  // one line: "max/mean 2.31 -> 1.07"
  double imbalance_before = 1, imbalance_after = 1, balancedness_before = 1, balancedness_after = 1;
};
// Rows per rank, balancedness (mean/max) and max/mean, the slowest rank's experts and total time, and the
// memory of the slots (expert_bytes each).
BalanceReport balance_report(const PhaseResult& a, const PhaseResult& b, const Placement& before,
                             const Placement& after, bool gpu, double expert_bytes);

nlohmann::json balance_json(const BalanceReport& r, const PhaseResult& a, const PhaseResult& b, const EplbPlan& plan,
                            const Skew& skew, int ranks, int tokens, int steps, bool gpu, bool pass);

}  // namespace eplab
