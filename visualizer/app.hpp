// The visualizer's state and its per-frame UI (no window code: main.cpp owns GLFW and OpenGL).
//
// Two sources of routing: the live prompt (LiveRouter, CPU, recomputed whenever the prompt, the layer
// or the model changes) and a trace file (TraceFollower, polled every frame). The panels draw whichever
// is selected; the EP size, expert map and GPUs per node apply to both.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "ep_view.hpp"
#include "live_router.hpp"
#include "memory_view.hpp"
#include "options.hpp"
#include "trace_follower.hpp"

namespace eplab::viz {

class App {
 public:
  // dev: where live routing runs (choose_device(o.device), made by the caller before the window opens).
  App(const Options& o, const DeviceChoice& dev);
  void frame();  // polls the trace, recomputes what changed, draws every panel
  // Every problem the user should know about right now (model, prompt, trace, settings): one line each.
  std::vector<std::string> errors() const;
  void finish_trace() { trace_.finish(); }

  // --- used by the panels
  void load_model(const std::string& dir);
  const LiveRouter* router() const { return router_.get(); }
  bool using_trace() const { return use_trace_ && trace_.active(); }
  const RoutingFrame* current() const;  // nullptr when nothing to show
  int num_steps() const;                // distinct steps in the trace

  Options opt;
  char model_buf[1024] = {};
  char prompt_buf[4096] = {};
  int layer = 0;
  EpSettings ep;
  MemoryWorkload work;
  bool use_trace_ = false;
  bool follow_latest = true;
  int step_index = 0;  // index into the trace's distinct steps
  TraceFollower trace_;
  std::string model_error, live_error, view_error;
  bool live_dirty = true;

 private:
  void recompute_live();
  DeviceChoice device_;
  std::unique_ptr<LiveRouter> router_;
  RoutingFrame live_;
  bool have_live_ = false;
  std::vector<int> steps_;  // distinct trace steps, in order of arrival
};

}  // namespace eplab::viz
