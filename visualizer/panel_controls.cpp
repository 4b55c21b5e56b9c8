// The control bar: model, routing source (live prompt or trace), layer, EP size, expert map, GPUs per
// node, trace step; and the current errors in red. Everything works with the mouse alone.
#include <algorithm>
#include <string>

#include <imgui.h>

#include "app.hpp"
#include "draw_util.hpp"
#include "panels.hpp"

namespace eplab::viz {

namespace {
void help_marker(const char* text) {
  ImGui::SameLine();
  ImGui::TextDisabled("(?)");
  if (ImGui::IsItemHovered()) {
    ImGui::BeginTooltip();
    ImGui::PushTextWrapPos(ImGui::GetFontSize() * 32);
    ImGui::TextUnformatted(text);
    ImGui::PopTextWrapPos();
    ImGui::EndTooltip();
  }
}
}  // namespace

void draw_controls(App& app) {
  const float W = ImGui::GetContentRegionAvail().x;
  // Row 1: model
  ImGui::AlignTextToFramePadding();
  ImGui::TextUnformatted("Model");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(W * 0.35f);
  const bool enter = ImGui::InputText("##model", app.model_buf, sizeof app.model_buf, ImGuiInputTextFlags_EnterReturnsTrue);
  ImGui::SameLine();
  if (ImGui::Button("Load") || enter) app.load_model(app.model_buf);
  ImGui::SameLine();
  if (const LiveRouter* r = app.router()) {
    const ModelConfig& c = r->config();
    ImGui::TextDisabled("%d layers, %d experts, top-%d %s, hidden %d, expert FFN %d, %s", c.num_hidden_layers,
                        c.num_local_experts, c.num_experts_per_tok, router_name(c.router), c.hidden_size,
                        c.intermediate_size, r->tokenizer_label().c_str());
  } else {
    ImGui::TextColored(ImVec4(1, 0.45f, 0.4f, 1), "no model loaded");
  }

  // Row 2: source
  ImGui::AlignTextToFramePadding();
  ImGui::TextUnformatted("Source");
  ImGui::SameLine();
  int src = app.use_trace_ ? 1 : 0;
  if (ImGui::RadioButton("live prompt", &src, 0)) app.live_dirty = true;
  if (app.trace_.active()) {
    ImGui::SameLine();
    const std::string label = "trace " + app.trace_.path();
    ImGui::RadioButton(label.c_str(), &src, 1);
  }
  app.use_trace_ = src == 1;
  ImGui::SameLine();
  ImGui::SetNextItemWidth(std::max(100.f, ImGui::GetContentRegionAvail().x - ImGui::GetFontSize() * 2));
  if (app.use_trace_) ImGui::BeginDisabled();
  if (ImGui::InputText("##prompt", app.prompt_buf, sizeof app.prompt_buf)) app.live_dirty = true;
  if (app.use_trace_) ImGui::EndDisabled();
  const bool real_tok = app.router() && app.router()->has_tokenizer();
  help_marker(real_tok
                  ? "Live routing: the model's tokenizer.json turns the prompt into the ids chapter 05 gives it (BOS "
                    "first); the layer input is each token's row of embed_tokens scaled to unit RMS (no attention, no "
                    "earlier layers). Chapter 05's trace (--trace) carries the routing of the real hidden states."
                  : "Live routing uses a STAND-IN tokenizer (the model has no tokenizer.json): words cut into pieces "
                    "of up to 4 bytes, each hashed to a row of embed_tokens; the layer input is that row scaled to "
                    "unit RMS (no attention, no earlier layers). Chapter 05's trace (--trace) carries the real "
                    "tokenizer's pieces and the routing of the real hidden states.");

  // Row 3: layer, EP size, map, GPUs per node, trace step
  int max_layer = app.router() ? app.router()->config().num_hidden_layers - 1 : 0;
  for (const RoutingFrame& f : app.trace_.frames()) max_layer = std::max(max_layer, f.layer);
  ImGui::AlignTextToFramePadding();
  ImGui::TextUnformatted("Layer");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(W * 0.12f);
  if (ImGui::SliderInt("##layer", &app.layer, 0, std::max(0, max_layer), "%d", ImGuiSliderFlags_AlwaysClamp))
    app.live_dirty = true;

  ImGui::SameLine(0, 24);
  ImGui::TextUnformatted("EP size");
  ImGui::SameLine();
  const int E = app.current() ? app.current()->num_experts
                              : (app.router() ? app.router()->config().num_local_experts : 16);
  ImGui::SetNextItemWidth(ImGui::GetFontSize() * 6);
  const std::string ep_label = std::to_string(app.ep.ep_size) + " GPUs";
  if (ImGui::BeginCombo("##ep", ep_label.c_str())) {
    for (int n = 1; n <= std::max(1, E); n *= 2)
      if (ImGui::Selectable((std::to_string(n) + " GPUs").c_str(), n == app.ep.ep_size)) app.ep.ep_size = n;
    for (int n : {3, 6}) if (n <= E && ImGui::Selectable((std::to_string(n) + " GPUs (uneven)").c_str(), n == app.ep.ep_size)) app.ep.ep_size = n;
    ImGui::EndCombo();
  }
  ImGui::SameLine(0, 24);
  ImGui::TextUnformatted("Expert map");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(ImGui::GetFontSize() * 7);
  if (ImGui::BeginCombo("##map", map_choice_name(app.ep.map))) {
    for (MapChoice m : {MapChoice::Linear, MapChoice::RoundRobin, MapChoice::FromTrace}) {
      if (m == MapChoice::FromTrace && !app.using_trace()) continue;
      if (ImGui::Selectable(map_choice_name(m), m == app.ep.map)) app.ep.map = m;
    }
    ImGui::EndCombo();
  }
  help_marker("linear: GPU r holds a contiguous block of experts. round-robin: expert e lives on GPU e mod N. "
              "trace: the map the traced run used (its rank_of_expert). Same maps as chapter 04 (placement.hpp).");
  ImGui::SameLine(0, 24);
  ImGui::TextUnformatted("GPUs/node");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(ImGui::GetFontSize() * 6);
  const std::string gpn = app.ep.gpus_per_node ? std::to_string(app.ep.gpus_per_node) : std::string("one node");
  if (ImGui::BeginCombo("##gpn", gpn.c_str())) {
    if (ImGui::Selectable("one node", app.ep.gpus_per_node == 0)) app.ep.gpus_per_node = 0;
    for (int g : {1, 2, 4, 8})
      if (ImGui::Selectable(std::to_string(g).c_str(), g == app.ep.gpus_per_node)) app.ep.gpus_per_node = g;
    ImGui::EndCombo();
  }

  if (app.using_trace()) {
    ImGui::SameLine(0, 24);
    ImGui::TextUnformatted("Step");
    ImGui::SameLine();
    const int n = app.num_steps();
    ImGui::SetNextItemWidth(W * 0.15f);
    if (n > 0) {
      if (ImGui::SliderInt("##step", &app.step_index, 0, n - 1, "%d", ImGuiSliderFlags_AlwaysClamp))
        app.follow_latest = app.step_index == n - 1;
    } else {
      ImGui::TextDisabled("waiting for lines");
    }
    ImGui::SameLine();
    ImGui::Checkbox("follow", &app.follow_latest);
    if (app.follow_latest && n > 0) app.step_index = n - 1;
    ImGui::SameLine();
    ImGui::TextDisabled("%d steps, %lld lines", n, static_cast<long long>(app.trace_.lines_read()));
  }

  // Row 4: where live routing runs, then errors (the last few) or a quiet hint
  if (const LiveRouter* r = app.router()) {
    ImGui::TextColored(r->on_gpu() ? ImVec4(0.5f, 0.9f, 0.5f, 1) : ImVec4(0.85f, 0.85f, 0.6f, 1), "routing on %s",
                       r->device_label().c_str());
    ImGui::SameLine(0, 24);
  }
  const auto errs = app.errors();
  if (errs.empty()) {
    ImGui::TextDisabled("hover any cell or bar for exact numbers");
  } else {
    const int first = std::max(0, int(errs.size()) - 2);
    for (int i = first; i < int(errs.size()); ++i) ImGui::TextColored(ImVec4(1, 0.45f, 0.4f, 1), "error: %s", errs[i].c_str());
  }
  ImGui::Spacing();
}

}  // namespace eplab::viz
