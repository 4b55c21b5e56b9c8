#include "trace_follower.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sys/stat.h>

#include "util/check.hpp"

namespace eplab::viz {

TraceFollower::TraceFollower(std::string path, int fallback_experts, int fallback_hidden)
    : path_(std::move(path)), fallback_experts_(fallback_experts), fallback_hidden_(fallback_hidden) {}

void TraceFollower::add_error(const std::string& msg) {
  errors_.push_back("trace " + path_ + ": " + msg);
  if (errors_.size() > 200) errors_.erase(errors_.begin());  // a runaway writer must not eat the memory
}

int TraceFollower::poll() {
  if (path_.empty()) return 0;
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    std::string why = ::stat(path_.c_str(), &st) != 0 ? std::strerror(errno) : "not a regular file";
    std::string msg = "cannot read it (" + why + "); waiting for it to appear";
    if (msg != last_io_error_) add_error(msg);
    last_io_error_ = msg;
    return 0;
  }
  const std::uint64_t size = std::uint64_t(st.st_size);
  if (size < offset_) {  // rewritten by a new run: start over
    add_error("the file shrank (rewritten?): reading it again from the start");
    offset_ = 0;
    partial_.clear();
    line_no_ = 0;
    frames_.clear();
  }
  if (size == offset_) return 0;
  std::ifstream in(path_, std::ios::binary);
  if (!in) {
    std::string msg = std::string("cannot open it (") + std::strerror(errno) + ")";
    if (msg != last_io_error_) add_error(msg);
    last_io_error_ = msg;
    return 0;
  }
  last_io_error_.clear();
  in.seekg(std::streamoff(offset_));
  std::string chunk(size - offset_, '\0');
  in.read(chunk.data(), std::streamsize(chunk.size()));
  chunk.resize(std::size_t(in.gcount()));
  offset_ += chunk.size();
  partial_ += chunk;

  int added = 0;
  std::size_t start = 0;
  for (std::size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = partial_.substr(start, nl - start);
    ++line_no_;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are allowed
    try {
      RoutingFrame f;
      static_cast<TraceRecord&>(f) = parse_trace_line(line, fallback_experts_, fallback_hidden_);
      if (f.pieces.empty())  // the trace has no tokenizer text: show the ids
        for (int id : f.tokens) f.pieces.push_back(std::string("#").append(std::to_string(id)));
      frames_.push_back(std::move(f));
      ++added;
    } catch (const std::exception& e) {
      add_error(std::string("line ") + std::to_string(line_no_) + ": " + e.what());
    }
  }
  partial_.erase(0, start);
  return added;
}

void TraceFollower::finish() {
  if (path_.empty()) return;
  poll();
  if (partial_.find_first_not_of(" \t\r") != std::string::npos)
    add_error(std::string("line ") + std::to_string(line_no_ + 1) +
              " is incomplete (truncated trace? no newline at the end)");
  else if (frames_.empty() && errors_.empty())
    add_error("no routing steps in it (empty trace)");
}

}  // namespace eplab::viz
