#include "hub_layout.hpp"

#include <algorithm>

#include "util/check.hpp"

namespace eplab::ch03 {

int DeviceSlice::distinct_tokens(int k) const {
  std::vector<int> t;
  for (int a : assignment) t.push_back(a / k);
  std::sort(t.begin(), t.end());
  return int(std::unique(t.begin(), t.end()) - t.begin());
}

HubLayout make_hub_layout(const DispatchPlan& plan, const std::vector<std::vector<int>>& experts_of_device) {
  const int E = plan.num_experts;
  std::vector<int> holder(E, -1);
  for (int g = 0; g < int(experts_of_device.size()); ++g)
    for (int e : experts_of_device[g]) {
      require(e >= 0 && e < E, "placement names expert ", e, " but the layer has ", E, " experts");
      require(holder[e] < 0, "placement puts expert ", e, " on devices ", holder[e], " and ", g);
      holder[e] = g;
    }
  for (int e = 0; e < E; ++e) require(holder[e] >= 0, "placement leaves expert ", e, " on no device");

  HubLayout L;
  L.slot_of.assign(plan.rows(), -1);
  L.dev.resize(experts_of_device.size());
  int base = 0;
  for (size_t g = 0; g < experts_of_device.size(); ++g) {
    DeviceSlice& s = L.dev[g];
    s.experts = experts_of_device[g];
    std::sort(s.experts.begin(), s.experts.end());
    s.base = base;
    s.offsets.assign(1, 0);
    int local = 0;
    for (int e : s.experts) {
      // The plan already groups rows by expert (stable in token order); take expert e's run of rows.
      for (int row = plan.offsets[e]; row < plan.offsets[e + 1]; ++row, ++local) {
        const int a = plan.assignment[row];
        s.assignment.push_back(a);
        L.slot_of[a] = base + local;
      }
      s.offsets.push_back(local);
    }
    base += local;
  }
  L.total_rows = base;
  return L;
}

}  // namespace eplab::ch03
