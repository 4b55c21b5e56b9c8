// How much host memory there is, and how much this process holds: the checks before a large allocation
// (chapter 04's global batch) and the memory tables (chapter 05's CPU path). Linux; 0 where unreadable.
#pragma once

namespace eplab {

double host_memory_bytes();  // physical memory of this machine (sysconf)
double process_rss_bytes();  // resident memory of this process (VmRSS in /proc/self/status)

}  // namespace eplab
