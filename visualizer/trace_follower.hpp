// Follow mode: reads a routing trace (JSON lines, common/moe/routing_trace.hpp; format in README.md, "Trace
// format") that another process may still be writing.
//
// TraceFollower tails the file: each poll() reads only the bytes added since the last one, parses complete
// lines (parse_trace_line), and keeps a trailing partial line until its newline arrives. A bad line is
// reported (line number and reason) and skipped; the good ones stay. A file that shrinks (rewritten by a
// new run) is read again from the start.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "routing_frame.hpp"

namespace eplab::viz {

class TraceFollower {
 public:
  TraceFollower() = default;
  // fallback_experts / fallback_hidden: the loaded model's E and hidden size, used when a line does not
  // say (0 = unknown).
  TraceFollower(std::string path, int fallback_experts, int fallback_hidden);
  // Reads what was appended; returns how many frames were added. Never throws: problems go to errors().
  int poll();
  // For one-shot runs (--screenshot): a partial last line is then an error (a truncated trace).
  void finish();

  const std::string& path() const { return path_; }
  const std::vector<RoutingFrame>& frames() const { return frames_; }
  const std::vector<std::string>& errors() const { return errors_; }  // "trace F: line N: ..." each
  std::int64_t lines_read() const { return line_no_; }
  bool active() const { return !path_.empty(); }

 private:
  void add_error(const std::string& msg);
  std::string path_;
  int fallback_experts_ = 0, fallback_hidden_ = 0;
  std::uint64_t offset_ = 0;
  std::string partial_;
  std::int64_t line_no_ = 0;
  std::vector<RoutingFrame> frames_;
  std::vector<std::string> errors_;
  std::string last_io_error_;
};

}  // namespace eplab::viz
