// What every fuzz target shares: a private scratch directory (the readers take paths, so each input is
// written to a file first), and the rules of the game: bad input may throw eplab::Error and nothing else, with a
// message of one line. Any other exception, a crash, a sanitizer report, a hang or a runaway allocation is a
// finding.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace eplab::fuzz {

// A directory of its own per process (libFuzzer's -jobs/-fork run several), removed at exit.
class ScratchDir {
 public:
  static ScratchDir& get() {
    static ScratchDir d;
    return d;
  }
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  // Writes the bytes to <dir>/<name> (replacing it); returns the path.
  std::string write(const std::string& name, std::string_view bytes) const {
    const std::string p = file(name);
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), std::streamsize(bytes.size()));
    out.close();
    if (!out) {
      std::fprintf(stderr, "fuzz: cannot write %s\n", p.c_str());
      std::abort();  // the harness, not the code under test, is broken
    }
    return p;
  }
  // A subdirectory of the scratch directory, created empty.
  std::string subdir(const std::string& name) const {
    const auto p = path_ / name;
    std::filesystem::remove_all(p);
    std::filesystem::create_directories(p);
    return p.string();
  }

 private:
  ScratchDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "eplab_fuzz_XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) {
      std::perror("fuzz: mkdtemp");
      std::abort();
    }
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::filesystem::path path_;
};

inline std::string_view as_view(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// An oracle that does not hold: report it the way a sanitizer would (libFuzzer saves the input).
[[noreturn]] inline void broken(const char* what) {
  std::fprintf(stderr, "fuzz: oracle failed: %s\n", what);
  std::abort();
}

// DESIGN.md: bad input gets a clear one-line error. A message with a line break (e.g. a name copied from the
// file unescaped) breaks that promise and the one-line logs of the tests and the visualizer.
template <typename E>
void one_line(const E& e) {
  const char* m = e.what();
  for (const char* p = m; *p; ++p)
    if (*p == '\n' || *p == '\r') {
      std::fprintf(stderr, "fuzz: an error message spans lines: %s\n", m);
      std::abort();
    }
  if (!*m) broken("an empty error message");
}

}  // namespace eplab::fuzz
