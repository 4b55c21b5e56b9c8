#include "app.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <imgui.h>

#include "colors.hpp"
#include "panels.hpp"
#include "util/check.hpp"

namespace eplab::viz {

namespace {
void copy_to(char* buf, std::size_t n, const std::string& s) {
  std::strncpy(buf, s.c_str(), n - 1);
  buf[n - 1] = '\0';
}
}  // namespace

App::App(const Options& o, const DeviceChoice& dev) : opt(o), device_(dev) {
  copy_to(model_buf, sizeof model_buf, o.model);
  copy_to(prompt_buf, sizeof prompt_buf, o.prompt);
  layer = o.layer;
  ep.ep_size = o.ep_size;
  ep.map = o.placement == "round-robin" ? MapChoice::RoundRobin
           : o.placement == "trace"     ? MapChoice::FromTrace
                                        : MapChoice::Linear;
  ep.gpus_per_node = o.gpus_per_node;
  work.batch = o.batch;
  work.seq_len = o.seq_len;
  load_model(o.model);
  if (!o.trace.empty()) {
    const int E = router_ ? router_->config().num_local_experts : 0;
    const int H = router_ ? router_->config().hidden_size : 0;
    trace_ = TraceFollower(o.trace, E, H);
    use_trace_ = true;
  }
}

void App::load_model(const std::string& dir) {
  try {
    router_ = std::make_unique<LiveRouter>(dir, device_);
    model_error.clear();
    opt.model = dir;
  } catch (const std::exception& e) {
    router_.reset();
    model_error = std::string("model: ") + e.what();
  }
  live_dirty = true;
}

void App::recompute_live() {
  live_dirty = false;
  have_live_ = false;
  live_error.clear();
  if (!router_) return;
  try {
    live_ = router_->route_prompt(prompt_buf, layer);
    have_live_ = true;
    if (live_.T() == 0) live_error = "prompt: empty, type some words to route them";
  } catch (const std::exception& e) {
    live_error = std::string("routing: ") + e.what();
  }
}

int App::num_steps() const { return int(steps_.size()); }

const RoutingFrame* App::current() const {
  if (using_trace()) {
    if (steps_.empty()) return nullptr;
    const int step = steps_[std::clamp(step_index, 0, int(steps_.size()) - 1)];
    for (const RoutingFrame& f : trace_.frames())
      if (f.step == step && f.layer == layer) return &f;
    return nullptr;
  }
  return have_live_ && live_.T() > 0 ? &live_ : nullptr;
}

std::vector<std::string> App::errors() const {
  std::vector<std::string> out;
  for (const std::string* s : {&model_error, &live_error, &view_error})
    if (!s->empty()) out.push_back(*s);
  for (const std::string& e : trace_.errors()) out.push_back(e);
  return out;
}

void App::frame() {
  // --- data: new trace lines, the live routing when its inputs changed
  if (trace_.active() && trace_.poll() > 0) {
    steps_.clear();
    for (const RoutingFrame& f : trace_.frames())
      if (std::find(steps_.begin(), steps_.end(), f.step) == steps_.end()) steps_.push_back(f.step);
    if (follow_latest) step_index = int(steps_.size()) - 1;
  }
  if (live_dirty && !using_trace()) recompute_live();

  const RoutingFrame* f = current();
  view_error.clear();
  EpView view;
  bool have_view = false;
  if (f) {
    try {
      view = make_ep_view(*f, ep);
      have_view = true;
    } catch (const std::exception& e) {
      view_error = std::string("EP view: ") + e.what();
    }
  } else if (using_trace() && !steps_.empty()) {
    view_error = "trace: step " + std::to_string(steps_[std::clamp(step_index, 0, int(steps_.size()) - 1)]) +
                 " has no layer " + std::to_string(layer) + " (move the layer slider)";
  }

  // --- layout: controls on top, then a 2 x 2 grid that follows the window size
  const ImGuiViewport* vp = ImGui::GetMainViewport();
  ImGui::SetNextWindowPos(vp->WorkPos);
  ImGui::SetNextWindowSize(vp->WorkSize);
  ImGui::Begin("EP Lab visualizer", nullptr,
               ImGuiWindowFlags_NoDecoration | ImGuiWindowFlags_NoMove | ImGuiWindowFlags_NoSavedSettings |
                   ImGuiWindowFlags_NoBringToFrontOnFocus);
  draw_controls(*this);

  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float gap = ImGui::GetStyle().ItemSpacing.x;
  const float w0 = std::floor((avail.x - gap) * 0.5f), w1 = avail.x - gap - w0;
  const float h0 = std::floor((avail.y - gap) * 0.5f), h1 = avail.y - gap - h0;
  const ImGuiWindowFlags cf = ImGuiWindowFlags_None;
  auto empty = [&](const char* what) {
    ImGui::TextDisabled("%s", what);
  };

  ImGui::BeginChild("routing", ImVec2(w0, h0), true, cf);
  if (f) draw_routing(*f, have_view ? &view : nullptr, using_trace());
  else empty("Routing: nothing to show yet (load a model and type a prompt, or wait for trace lines).");
  ImGui::EndChild();
  ImGui::SameLine();
  ImGui::BeginChild("load", ImVec2(w1, h0), true, cf);
  if (have_view) draw_load(view);
  else empty("Per-GPU load: needs a routing.");
  ImGui::EndChild();

  ImGui::BeginChild("traffic", ImVec2(w0, h1), true, cf);
  if (have_view) draw_traffic(view, ep.gpus_per_node);
  else empty("Traffic: needs a routing.");
  ImGui::EndChild();
  ImGui::SameLine();
  ImGui::BeginChild("memory", ImVec2(w1, h1), true, cf);
  const ModelConfig* loaded = router_ ? &router_->config() : nullptr;
  std::string name = router_ ? router_->dir() : std::string();
  if (auto p = name.find_last_of('/'); p != std::string::npos && p + 1 < name.size()) name = name.substr(p + 1);
  draw_memory(loaded, name, work, have_view ? view.ep_size : ep.ep_size);
  ImGui::EndChild();
  ImGui::End();
}

}  // namespace eplab::viz
