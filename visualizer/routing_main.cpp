// viz_routing: the visualizer's live routing as text, with no window and no GL/GLFW/Dear ImGui, so it builds
// and runs where the app cannot (a GPU machine without OpenGL development files). Same flags and the same
// output as `visualizer --print-routing` (both call print_routing, routing_cli.hpp).
//
//   viz_routing [--model DIR] [--prompt TEXT] [--layer L] [--device auto|gpu|cpu]
#include "routing_cli.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

int main(int argc, char** argv) {
  return eplab::run_main([&] {
    CLI::App app{"EP Lab visualizer, headless: print the live token-to-expert routing of a prompt, exit"};
    eplab::viz::RoutingFlags f;
    eplab::viz::add_routing_flags(app, f);
    if (auto rc = eplab::parse_cli(app, argc, argv)) return *rc;
    return eplab::viz::print_routing(f, eplab::choose_device(f.device));
  });
}
