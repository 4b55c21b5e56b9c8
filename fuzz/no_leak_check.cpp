// Sanitizer build only (-DEPLAB_SANITIZE, fuzz/README.md): compiled into the binaries whose libraries unload
// code that allocated memory still held at exit, which LeakSanitizer then reports with no module name (so no
// suppression can match it):
//  - every binary that links eplab_dist, that is every binary that starts Open MPI (its MCA components are
//    dlclose'd at MPI_Finalize, and Open MPI, hwloc and PMIx keep memory until exit);
//  - the visualizer's GL app (Mesa's GL driver, loaded and unloaded by libGL).
// These binaries skip the leak check at exit; AddressSanitizer and UBSan stay on. Every other binary (unit tests,
// chapters 00-03, tools, the headless visualizer tools) is leak-checked. An ASAN_OPTIONS or LSAN_OPTIONS that
// sets detect_leaks overrides this.
extern "C" __attribute__((visibility("default"), used)) const char* __lsan_default_options() {
  return "detect_leaks=0";
}
