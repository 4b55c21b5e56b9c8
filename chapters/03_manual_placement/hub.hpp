// What one forward of chapter 03's hub-and-spoke MoE layer returns, on the CPU simulation and on GPUs.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "hub_layout.hpp"
#include "moe/routing.hpp"

namespace eplab::ch03 {

// Time of each stage, milliseconds. Per device: the stages that device's host thread drives.
struct DeviceTimes {
  double gather_ms = 0;     // pick the device's rows out of x, on device 0
  double copy_out_ms = 0;   // device 0 -> device g (0 for device 0 itself: its rows never leave)
  double experts_ms = 0;    // the device's experts on its rows
  double copy_back_ms = 0;  // device g -> device 0
};

struct HubTimes {
  double route_ms = 0;    // router GEMM + top-k on device 0 (GPU: + reading the routing back to the host)
  double plan_ms = 0;     // host: dispatch plan, layout, index upload
  double spokes_ms = 0;   // from the first gather to the last result back on device 0 (the devices overlap)
  double combine_ms = 0;  // weighted sum per token on device 0
  double total_ms = 0;    // wall clock of the whole forward
  std::vector<DeviceTimes> dev;
};

struct HubRun {
  Routing routing;       // as device 0 computed it
  std::vector<float> y;  // [T, H]
  HubLayout layout;
  HubTimes times;
  std::size_t row_bytes = 0;  // bytes of one activation row as it travels (fp32 on the CPU, bf16 on GPUs)
  // Bytes that leave device 0 and come back to it: every row of a device other than 0, both ways.
  std::size_t bytes_out() const {
    std::size_t rows = 0;
    for (std::size_t g = 1; g < layout.dev.size(); ++g) rows += layout.dev[g].rows();
    return rows * row_bytes;
  }
  std::size_t bytes_back() const { return bytes_out(); }
};

}  // namespace eplab::ch03
