// Exit 0 when a CUDA GPU is usable, 1 otherwise (prints why). Used by tests to skip GPU runs visibly.
#include <cstdio>
#include <string>

#include "device.hpp"

int main() {
  std::string why;
  const int n = eplab::gpu_count(&why);
  if (n > 0) {
    std::printf("%d GPU(s)\n", n);
    return 0;
  }
  std::printf("no GPU: %s\n", why.c_str());
  return 1;
}
