// Fuzz target: the routing-trace line reader (common/moe/routing_trace.cpp, parse_trace_line).
//
// Input: one trace line (any bytes). Parsed three times: with no fallback shape, and as the visualizer does
// with a loaded model's shape (16 experts, hidden 64; and 4 experts, hidden 0).
// What must hold: parse_trace_line throws eplab::Error or returns a record that check_trace_record accepts,
// that to_trace_line writes (writer and reader share their rules), and that reads back from that line bit for
// bit (the header's promise: parse_trace_line(to_trace_line(r)) == r).
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.hpp"
#include "moe/routing_trace.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i])) return false;
  return true;
}

bool same(const TraceRecord& a, const TraceRecord& b) {
  return a.step == b.step && a.layer == b.layer && a.ep_size == b.ep_size && a.num_experts == b.num_experts &&
         a.hidden == b.hidden && a.tokens == b.tokens && a.pieces == b.pieces && a.routing.tokens == b.routing.tokens &&
         a.routing.k == b.routing.k && a.routing.ids == b.routing.ids &&
         same_floats(a.routing.weights, b.routing.weights) && a.rank_of_expert == b.rank_of_expert &&
         a.rank_of_token == b.rank_of_token && same_floats(a.probs, b.probs);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string line(fuzz::as_view(data, size));
  const struct { int experts, hidden; } fallbacks[] = {{0, 0}, {16, 64}, {4, 0}};
  for (const auto& fb : fallbacks) {
    TraceRecord r;
    try {
      r = parse_trace_line(line, fb.experts, fb.hidden);
    } catch (const Error& e) {
      fuzz::one_line(e);
      continue;
    }
    check_trace_record(r);                    // what the reader returns obeys the rules
    const std::string out = to_trace_line(r);  // so the writer takes it
    if (!same(parse_trace_line(out, fb.experts, fb.hidden), r))
      fuzz::broken("parse_trace_line(to_trace_line(r)) differs from r");
  }
  return 0;
}
