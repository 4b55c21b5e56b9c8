// Chapter 03's layout: which rows of the dispatch plan each device gets, in which order, and where each
// result lands in the hub's (device 0's) receive buffer. Computed once on the host from the plan and the
// placement, then handed to the gather, the copies and the combine (the "layout" step of DeepEP's Buffer).
//
//   hub send/receive buffer (device 0), one block per device, blocks in device order:
//   | dev 0 rows | dev 1 rows | dev 2 rows | ...           block g = rows for g's experts, expert by expert
//                  ^ base(1)
//   slot_of[t*k + j] = the row of that buffer where token t's j-th expert result comes back.
#pragma once
#include <vector>

#include "moe/dispatch_plan.hpp"

namespace eplab::ch03 {

struct DeviceSlice {
  std::vector<int> experts;    // global expert ids on this device, ascending: local expert i = experts[i]
  std::vector<int> offsets;    // [n+1] local expert i owns rows [offsets[i], offsets[i+1]) of the device's buffer
  std::vector<int> assignment;  // [rows] assignment t*k+j whose token row becomes local row r (token = a / k)
  int base = 0;                // first row of this device's block in the hub's send/receive buffers
  int rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int distinct_tokens(int k) const;  // a token whose two experts both live here is sent twice (see README)
};

struct HubLayout {
  std::vector<DeviceSlice> dev;
  std::vector<int> slot_of;  // [T*k] assignment -> row in the hub's receive buffer
  int total_rows = 0;
};

// experts_of_device[g] lists the experts device g holds; every expert must be held by exactly one device.
HubLayout make_hub_layout(const DispatchPlan& plan, const std::vector<std::vector<int>>& experts_of_device);

}  // namespace eplab::ch03
