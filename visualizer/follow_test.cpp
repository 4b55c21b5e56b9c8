// viz_follow_test: follow mode against a trace that grows while it is read, on a real model.
//
// Expected values come from LiveRouter (the CPU routing of common/), not from the trace reader: every
// layer's routing of the prompt is written as trace lines, appended to the file a few bytes at a time
// (lines cut in the middle, as a running writer leaves them), and TraceFollower::poll() runs after each
// piece. Checks: a frame appears exactly when its newline has arrived, and every field round-trips
// (ids and multipliers exactly); a line that is not JSON is reported with its line number
// and skipped while later lines still arrive; a rewritten (shrunk) file is read again from the start;
// finish() reports a cut last line. Prints one line per check, ends with CHECK PASS / CHECK FAIL.
#include <cstdio>
#include <fstream>
#include <string>

#include "live_router.hpp"
#include "moe/routing_trace.hpp"
#include "trace_follower.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

namespace {
bool same(const eplab::viz::RoutingFrame& a, const eplab::viz::RoutingFrame& b) {
  if (a.step != b.step || a.layer != b.layer || a.tokens != b.tokens || a.pieces != b.pieces ||
      a.routing.ids != b.routing.ids || a.routing.k != b.routing.k || a.rank_of_expert != b.rank_of_expert ||
      a.ep_size != b.ep_size || a.num_experts != b.num_experts || a.hidden != b.hidden)
    return false;
  return a.routing.weights == b.routing.weights;  // the writer's decimals read back to the very same floats
}
void append(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::app | std::ios::binary);
  f << bytes;
}
}  // namespace

int main(int argc, char** argv) {
  return eplab::run_main([&] {
    CLI::App app{"Follow-mode test of the visualizer's trace reader"};
    std::string model = eplab::default_model_dir(), out = "follow_test.jsonl";
    app.add_option("--model", model, "checkpoint directory")->capture_default_str();
    app.add_option("--out", out, "scratch trace file")->capture_default_str();
    if (auto rc = eplab::parse_cli(app, argc, argv)) return *rc;

    eplab::viz::LiveRouter router(model);
    const auto& c = router.config();
    std::vector<eplab::viz::RoutingFrame> want;
    std::string text;
    for (int step = 0; step < 2; ++step)
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        auto f = router.route_prompt(step ? "a second step routes other words" : "follow mode reads lines as they come", l);
        f.step = step;
        f.ep_size = 4;
        f.probs.clear();
        for (int e = 0; e < c.num_local_experts; ++e) f.rank_of_expert.push_back(e % 4);
        want.push_back(f);
        text += eplab::to_trace_line(f) + "\n";
      }

    bool ok = true;
    auto check = [&](bool pass, const std::string& what) {
      std::printf("%s %s\n", pass ? "ok  " : "FAIL", what.c_str());
      ok = ok && pass;
    };
    std::remove(out.c_str());
    eplab::viz::TraceFollower tf(out, c.num_local_experts, c.hidden_size);
    tf.poll();
    check(tf.frames().empty() && !tf.errors().empty(), "missing file: no frames, an error, no crash");

    // Grow the file 97 bytes at a time; after each piece, the frames must be exactly the complete lines.
    std::ofstream(out, std::ios::trunc).close();
    bool in_step = true;
    for (std::size_t pos = 0; pos < text.size(); pos += 97) {
      append(out, text.substr(pos, 97));
      tf.poll();
      const std::size_t end = std::min(text.size(), pos + 97);
      std::size_t complete = 0;
      for (std::size_t i = 0; i < end; ++i) complete += text[i] == '\n';
      in_step = in_step && tf.frames().size() == complete;
    }
    check(in_step, "frames appear exactly when their line is complete (" + std::to_string(text.size()) + " bytes in 97-byte pieces)");
    bool equal = tf.frames().size() == want.size();
    for (std::size_t i = 0; equal && i < want.size(); ++i) equal = same(tf.frames()[i], want[i]);
    check(equal, std::to_string(want.size()) + " frames equal the CPU routing they were written from");

    const std::size_t errs = tf.errors().size();
    append(out, "{\"step\": 9, this is not json\n");
    append(out, eplab::to_trace_line(want[0]) + "\n");
    tf.poll();
    const bool reported = tf.errors().size() == errs + 1 &&
                          tf.errors().back().find("line " + std::to_string(want.size() + 1) + ": not valid JSON") != std::string::npos;
    check(reported && tf.frames().size() == want.size() + 1, "a bad line is reported with its number, later lines still arrive");

    std::ofstream(out, std::ios::trunc) << eplab::to_trace_line(want[1]) << "\n";
    tf.poll();
    check(tf.frames().size() == 1 && same(tf.frames()[0], want[1]), "a rewritten (shrunk) file is read again from the start");

    append(out, text.substr(0, 50));
    tf.finish();
    check(tf.errors().back().find("incomplete") != std::string::npos, "finish(): a cut last line is an error: " + tf.errors().back());
    std::remove(out.c_str());
    std::printf("%s\n", ok ? "CHECK PASS viz_follow_test" : "CHECK FAIL viz_follow_test");
    return ok ? 0 : 1;
  });
}
