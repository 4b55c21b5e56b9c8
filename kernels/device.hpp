// Choosing where a chapter runs. `--device auto` takes the GPU when one works and otherwise the CPU,
// saying why; `--device gpu` on a machine without one is an error, not a crash.
#pragma once
#include <string>

namespace eplab {

enum class Backend { Cpu, Gpu };

struct DeviceChoice {
  Backend backend = Backend::Cpu;
  int gpu_count = 0;
  int gpu = 0;              // the GPU used (device ordinal)
  std::string description;  // "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB)" or "CPU (no GPU: <reason>)"
};

// flag: "auto" | "gpu" | "cpu". Never throws for "auto" or "cpu"; throws eplab::Error for "gpu" without one.
DeviceChoice choose_device(const std::string& flag, int gpu = 0);

// Number of usable GPUs (0 when the driver or runtime is missing) and, if 0, why.
int gpu_count(std::string* why = nullptr);

}  // namespace eplab
