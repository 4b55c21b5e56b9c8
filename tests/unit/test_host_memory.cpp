// common/util/host_memory.hpp against what the kernel reports elsewhere: /proc/meminfo's MemTotal for the
// machine, and a resident-set size that grows when this process touches 64 MiB of fresh memory.
#include <doctest/doctest.h>

#include <fstream>
#include <string>
#include <vector>

#include "util/host_memory.hpp"

using namespace eplab;

TEST_CASE("host_memory_bytes: physical memory, as /proc/meminfo's MemTotal says (within its reserved pages)") {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kib = 0;
  f >> key >> kib;  // "MemTotal:  24576000 kB" is the first line
  REQUIRE(key == "MemTotal:");
  const double total = host_memory_bytes();
  // MemTotal leaves out the kernel's reserved pages, so the physical page count is a little larger
  CHECK(total >= kib * 1024.0);
  CHECK(total <= kib * 1024.0 * 1.10);
}

TEST_CASE("process_rss_bytes: grows by about what this process touches") {
  const double before = process_rss_bytes();
  REQUIRE(before > 0);
  std::vector<char> block(64u << 20, 1);  // 64 MiB, every page written
  const double after = process_rss_bytes();
  CHECK(after - before >= 48.0 * (1 << 20));
  CHECK(block[block.size() / 2] == 1);
}
