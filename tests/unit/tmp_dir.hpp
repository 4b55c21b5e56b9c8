// A fresh, empty temporary directory per object, removed with it: for the unit tests that write files.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace eplab::testing {

struct TmpDir {
  std::filesystem::path path;
  TmpDir() {
    static int n = 0;  // with the pid: unique within and across test processes
    path = std::filesystem::temp_directory_path() /
           ("eplab_unit_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TmpDir() { std::filesystem::remove_all(path); }
  TmpDir(const TmpDir&) = delete;
  TmpDir& operator=(const TmpDir&) = delete;

  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes text to a file in the directory; returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name) << text;
    return file(name);
  }
};

}  // namespace eplab::testing
