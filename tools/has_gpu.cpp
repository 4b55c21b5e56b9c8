// Exit 0 when a CUDA GPU is usable, 1 otherwise (prints why). Used by tests to skip GPU runs visibly.
#include <cstdio>
#include <cstring>
#include <string>

#include "device.hpp"

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("usage: has_gpu\n"
                  "Prints how many CUDA GPUs are usable (\"N GPU(s)\") and exits 0, or prints why none is\n"
                  "(\"no GPU: ...\") and exits 1. The tests use it to skip GPU runs (ctest: Skipped).\n");
      return 0;
    }
    std::fprintf(stderr, "error: unknown argument '%s' (see --help)\n", argv[i]);
    return 2;
  }
  std::string why;
  const int n = eplab::gpu_count(&why);
  if (n > 0) {
    std::printf("%d GPU(s)\n", n);
    return 0;
  }
  std::printf("no GPU: %s\n", why.c_str());
  return 1;
}
