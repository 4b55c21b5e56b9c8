// The routing trace: JSON lines, one per (generation step, MoE layer), that chapter 05 (--trace) and
// viz_make_trace write and the visualizer reads. The format is specified in visualizer/README.md
// ("Trace format"); this is its one writer and one line reader.
//
//   TraceRecord       one line as data: which tokens were routed to which experts with which multipliers,
//                     and (optional) the run's expert map, each token's source rank, router probabilities
//   to_trace_line     record -> one line (no newline). Multipliers and probabilities are written as the
//                     shortest decimal that reads back to the same float ("0.71", not "0.7099999785"), so
//                     parse_trace_line(to_trace_line(r)) gives r back bit for bit.
//   parse_trace_line  one line -> record; throws eplab::Error with a one-line reason for anything wrong
//   TraceWriter       a file of lines, each flushed as it is written (a visualizer in follow mode shows a
//                     running job)
//
// Writer and reader apply the same rules (check_trace_record): a record the writer accepts, the reader
// accepts.
#pragma once
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "moe/routing.hpp"

namespace eplab {

struct TraceRecord {
  int step = 0;         // generation step (0 = prefill)
  int layer = 0;        // MoE layer, >= 0
  int ep_size = 0;      // ranks of the run; 0 = not given
  int num_experts = 0;  // E; 0 = not given
  int hidden = 0;       // hidden size (bytes per dispatched row = hidden * 2 in bf16); 0 = not given
  std::vector<int> tokens;           // [T] token ids
  std::vector<std::string> pieces;   // [T] the tokenizer's text of each token, or empty
  Routing routing;                   // [T, k] expert ids (choice order) and multipliers
  std::vector<int> rank_of_expert;   // [E] rank holding each expert, or empty (needs ep_size)
  std::vector<int> rank_of_token;    // [T] rank each token starts on, or empty
  std::vector<float> probs;          // [T, E] router probabilities, or empty (needs num_experts)
  int T() const { return routing.tokens; }
};

// Throws eplab::Error (one line) when the record breaks the format's rules: sizes that disagree with T, k
// or E, negative or out-of-range expert ids and ranks, rank_of_expert without ep_size, non-finite numbers.
void check_trace_record(const TraceRecord& r);

// One line, no newline. Throws eplab::Error (check_trace_record) for a record that breaks the rules.
// Fields that are 0 / empty are left out.
std::string to_trace_line(const TraceRecord& r);

// fallback_experts / fallback_hidden: what num_experts / hidden are when the line does not say, or says 0 (the
// loaded model's shape; 0 = unknown). num_experts is otherwise rank_of_expert's length, else the largest id + 1.
// Missing pieces stay empty.
TraceRecord parse_trace_line(const std::string& line, int fallback_experts = 0, int fallback_hidden = 0);

// Every line of a whole trace file in order (empty lines skipped), parsed, handed to fn with its line number.
// Throws eplab::Error (one line) "<what> <path>: cannot open the file" or "<what> <path> line N: <reason>";
// what names the flag, e.g. "--trace". (The visualizer's follower reads a growing file its own way.)
void read_trace_file(const std::string& path, const std::string& what,
                     const std::function<void(const TraceRecord&, int line)>& fn);

class TraceWriter {
 public:
  TraceWriter() = default;
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;
  ~TraceWriter();

  // Truncates the file (a new run rewrites it; a follower then reads it again from the start), or appends.
  // Throws eplab::Error naming the file when it cannot be opened.
  void open(const std::string& path, bool append = false);
  bool active() const { return f_ != nullptr; }
  const std::string& path() const { return path_; }
  std::int64_t lines() const { return lines_; }

  // Writes one line and flushes it. Throws eplab::Error naming the file, the step and the layer for a
  // record that breaks the rules, and naming the file when the write fails.
  void write(const TraceRecord& r);

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
  std::int64_t lines_ = 0;
};

}  // namespace eplab
