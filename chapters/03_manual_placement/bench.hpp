// Chapter 03's --bench: the hub at Phi-tiny-MoE's layer shape (random bf16 weights, no checkpoint needed)
// for several token counts on GPUs; the first count is checked against the CPU reference.
#pragma once
#include <vector>

#include "device.hpp"
#include "options.hpp"

namespace eplab::ch03 {

// N devices, device g on GPU gpu_of[g]. Prints the table and the verdict line; returns the exit code.
int run_bench(const Options& opt, const DeviceChoice& dev, int N, const std::vector<int>& gpu_of);

}  // namespace eplab::ch03
