// viz_make_trace: writes a routing trace (README.md, "Trace format"; common/moe/routing_trace.hpp, the writer
// chapter 05 uses too) from the CPU routing of a model (LiveRouter: the same tokenizer and common/ routing
// the app uses). Follow mode is tested and demonstrated with it: it needs no MPI and no full forward.
//
// Step s routes the first ceil(T (s+1) / steps) tokens of the prompt (a context that grows, like chunked
// prefill), every layer, one JSON line per (step, layer), each flushed as it is written. With --delay-ms it
// sleeps between steps, like a running job; point `visualizer --trace FILE` at the file meanwhile.
#include <chrono>
#include <cstdio>
#include <thread>

#include "live_router.hpp"
#include "moe/placement.hpp"
#include "moe/routing_trace.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

int main(int argc, char** argv) {
  return eplab::run_main([&] {
    CLI::App app{"Write a routing trace (JSON lines) from the CPU routing of a model, for the visualizer"};
    std::string model = eplab::default_model_dir(), out;
    std::string prompt = "The quick brown fox jumps over the lazy dog while experts route every token";
    std::string placement = "linear";
    int steps = 4, ep_size = 4, delay_ms = 0;
    bool append = false;
    app.add_option("--model", model, "checkpoint directory")->capture_default_str();
    app.add_option("--out", out, "trace file to write")->required();
    app.add_option("--prompt", prompt, "text to route (the model's tokenizer.json, else the stand-in)");
    app.add_option("--steps", steps, "steps to write")->capture_default_str();
    app.add_option("--ep-size", ep_size, "EP size recorded in the trace")->capture_default_str();
    app.add_option("--placement", placement, "expert map recorded: linear | round-robin")->capture_default_str();
    app.add_option("--delay-ms", delay_ms, "sleep between steps (simulates a running job)")->capture_default_str();
    app.add_flag("--append", append, "append to the file instead of replacing it");
    if (auto rc = eplab::parse_cli(app, argc, argv)) return *rc;
    eplab::require(steps >= 1, "--steps must be >= 1");

    eplab::viz::LiveRouter router(model);
    const auto& c = router.config();
    const eplab::Placement p(eplab::parse_placement(placement), c.num_local_experts, ep_size);
    std::vector<int> rank_of_expert;
    for (int e = 0; e < c.num_local_experts; ++e) rank_of_expert.push_back(p.owner(e));

    eplab::TraceWriter trace;
    trace.open(out, append);
    for (int s = 0; s < steps; ++s) {
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        eplab::viz::RoutingFrame fr = router.route_prompt(prompt, l);
        // Keep the first `keep` tokens: the context grows step by step.
        const int keep = (fr.T() * (s + 1) + steps - 1) / steps;
        fr.step = s;
        fr.ep_size = ep_size;
        fr.rank_of_expert = rank_of_expert;
        fr.probs.clear();
        fr.tokens.resize(keep);
        fr.pieces.resize(keep);
        fr.routing.tokens = keep;
        fr.routing.ids.resize(std::size_t(keep) * fr.routing.k);
        fr.routing.weights.resize(std::size_t(keep) * fr.routing.k);
        trace.write(fr);
      }
      if (delay_ms > 0 && s + 1 < steps) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    }
    std::printf("viz_make_trace: wrote %lld lines (%d steps x %d layers) to %s\n", (long long)trace.lines(), steps,
                c.num_hidden_layers, out.c_str());
    return 0;
  });
}
