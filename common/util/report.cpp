#include "util/report.hpp"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <unistd.h>

#include "util/check.hpp"

namespace eplab {

std::string Table::str() const {
  std::vector<size_t> width(header_.size(), 0);
  auto widen = [&](const std::vector<std::string>& r) {
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], r[c].size());
  };
  widen(header_);
  for (const auto& r : rows_) widen(r);
  std::string out;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < r.size() ? r[c] : "";
      const std::string pad(width[c] - std::min(width[c], cell.size()), ' ');
      out += c == 0 ? cell + pad : "  " + pad + cell;
    }
    out += '\n';
  };
  line(header_);
  size_t total = 0;
  for (auto w : width) total += w + 2;
  out += std::string(total >= 2 ? total - 2 : 0, '-') + '\n';
  for (const auto& r : rows_) line(r);
  return out;
}

void Table::print() const { std::cout << str(); }

std::string strf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char buf[1024];
  int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) return {};
  if (size_t(n) < sizeof buf) return std::string(buf, size_t(n));
  std::string big(size_t(n) + 1, '\0');
  va_start(ap, fmt);
  std::vsnprintf(big.data(), big.size(), fmt, ap);
  va_end(ap);
  big.resize(size_t(n));
  return big;
}

std::string human_bytes(double b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024.0 && u < 4) { b /= 1024.0; ++u; }
  return u == 0 ? strf("%.0f B", b) : strf("%.2f %s", b, unit[u]);
}

std::string human_count(double n) {
  if (n >= 1e9) return strf("%.3f B", n / 1e9);
  if (n >= 1e6) return strf("%.2f M", n / 1e6);
  if (n >= 1e3) return strf("%.1f K", n / 1e3);
  return strf("%.0f", n);
}

nlohmann::json read_json(const std::string& path, const std::string& what) {
  std::ifstream f(path);
  require(bool(f), what, ": cannot open ", path);
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail(what, " ", path, ": not valid JSON (", e.what(), ")");
  }
}

void write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  require(bool(f), "cannot write JSON to ", path);
  f << j.dump(2) << '\n';
  require(bool(f), "failed while writing JSON to ", path);
}

void require_writable_file(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  require(!path.empty(), flag, " needs a file name");
  std::error_code ec;
  const fs::path p(path);
  require(!fs::is_directory(p, ec), flag, " ", path, ": is a folder, not a file");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  require(fs::exists(dir, ec), flag, " ", path, ": folder '", dir.string(), "' does not exist (create it first)");
  require(fs::is_directory(dir, ec), flag, " ", path, ": '", dir.string(), "' is not a folder");
  if (fs::exists(p, ec))
    require(::access(path.c_str(), W_OK) == 0, flag, " ", path, ": the file is not writable");
  else
    require(::access(dir.c_str(), W_OK | X_OK) == 0, flag, " ", path, ": folder '", dir.string(),
            "' is not writable");
}

}  // namespace eplab
