// GPU tests: doctest over the CUDA kernels, each checked against the CPU reference in common/moe.
// Without a usable GPU the binary says so on stdout and exits 77, which ctest reports as Skipped
// (SKIP_RETURN_CODE in tests/CMakeLists.txt), so `make test` passes visibly on a laptop.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <string>

#include "device.hpp"

int main(int argc, char** argv) {
  std::string why;
  if (eplab::gpu_count(&why) == 0) {
    std::printf("SKIPPED gpu_tests: no GPU (%s)\n", why.c_str());
    return 77;
  }
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  return ctx.run();
}
