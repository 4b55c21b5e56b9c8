// Aligned text tables for the terminal and a JSON sink for --json.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace eplab {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add_row(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  // Right-aligns every column but the first; columns are as wide as their widest cell.
  std::string str() const;
  void print() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// printf-style formatting into a std::string.
std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// 1536 -> "1.50 KiB", 5.5e9 -> "5.12 GiB".
std::string human_bytes(double bytes);
// 5.51e6 -> "5.51 M", 3.755e9 -> "3.755 B".
std::string human_count(double n);

// Writes json to path (pretty-printed); throws eplab::Error if the file cannot be written.
void write_json(const std::string& path, const nlohmann::json& j);
// Reads a JSON file. Throws eplab::Error (one line) "<what>: cannot open <path>" or "<what> <path>: not valid
// JSON (...)"; what names the flag or thing, e.g. "--peer-json".
nlohmann::json read_json(const std::string& path, const std::string& what);

// Throws eplab::Error (one line naming `flag` and the path) unless a file can be written at path: its folder
// exists and is writable, and path is not a folder or a read-only file. Checked before a run, so that a
// typo in --json FILE fails at once, not after minutes of work.
void require_writable_file(const std::string& flag, const std::string& path);

}  // namespace eplab
