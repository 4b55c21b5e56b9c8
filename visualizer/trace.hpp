// The routing trace: JSON lines, one per (step, layer), written by chapter 05 (and by viz_make_trace).
// The format is specified in visualizer/README.md ("Trace format"). Reading it:
//
//   parse_trace_line   one line -> RoutingFrame; throws eplab::Error naming what is wrong
//   TraceFollower      tails a file that another process is still writing ("follow mode"): each poll()
//                      reads only the bytes added since the last one, parses complete lines, and keeps
//                      a trailing partial line until its newline arrives. A bad line is reported (line
//                      number and reason) and skipped; the good ones stay. A file that shrinks (rewritten
//                      by a new run) is read again from the start.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "routing_frame.hpp"

namespace eplab::viz {

// fallback_experts / fallback_hidden: used when the line has no "num_experts" / "hidden" (the loaded
// model's shape; 0 = unknown).
RoutingFrame parse_trace_line(const std::string& line, int fallback_experts, int fallback_hidden);

// One trace line (no newline) for a frame: what viz_make_trace writes and what chapter 05 should write.
// Fields the frame does not know (rank_of_expert, ep_size, probs) are left out when empty / 0.
std::string to_trace_line(const RoutingFrame& f);

class TraceFollower {
 public:
  TraceFollower() = default;
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
