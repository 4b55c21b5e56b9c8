// Routing heat map: tokens (rows, with their text pieces) x experts (columns). Colour = the router's
// probability softmax(logits) for live routing; traces carry only the chosen experts, so there the
// colour is the multiplier of each chosen cell. The top-k cells are outlined and numbered by choice;
// a strip above the columns shows which GPU holds each expert under the current EP map.
#include <algorithm>
#include <cmath>
#include <string>

#include <imgui.h>

#include "draw_util.hpp"
#include "panels.hpp"

namespace eplab::viz {

void draw_routing(const RoutingFrame& f, const EpView* v, bool from_trace) {
  const int T = f.T(), E = f.num_experts, k = f.routing.k;
  const bool have_probs = !f.probs.empty();
  char sub[200];
  const std::string src = from_trace ? std::string(" (trace)")
                                     : " (live on " + (f.computed_on.empty() ? std::string("CPU") : f.computed_on) +
                                           ", stand-in tokenizer)";
  std::snprintf(sub, sizeof sub, "layer %d%s, %d tokens x %d experts, top-%d%s", f.layer,
                from_trace ? (" step " + std::to_string(f.step)).c_str() : "", T, E, k, src.c_str());
  panel_title("Token -> expert routing", sub);

  // Colour scale: 0 .. the largest value shown, rounded up to a tenth, so small probabilities still differ.
  float vmax = 0;
  if (have_probs) for (float p : f.probs) vmax = std::max(vmax, p);
  else for (float w : f.routing.weights) vmax = std::max(vmax, w);
  vmax = std::max(0.1f, std::ceil(vmax * 10.f - 1e-4f) / 10.f);
  auto value = [&](int t, int e) -> float {
    if (have_probs) return f.probs[std::size_t(t) * E + e];
    for (int j = 0; j < k; ++j) if (f.routing.id(t, j) == e) return f.routing.weight(t, j);
    return 0.f;
  };

  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImVec2 origin = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float fs = ImGui::GetFontSize();
  const float legend_h = fs * 2.6f;
  // Widest piece label decides the left margin.
  float label_w = fs * 3;
  for (const auto& p : f.pieces) label_w = std::max(label_w, ImGui::CalcTextSize(p.c_str()).x + fs * 0.6f);
  label_w = std::min(label_w, avail.x * 0.3f);
  const float header_h = fs * 1.9f;
  const float cell_w = std::max(6.f, (avail.x - label_w - 4) / float(E));
  // Rows fill the height; below ~1 line per row the panel scrolls instead.
  const float rows_h = std::max(fs * 0.9f * T, 0.f);
  float cell_h = std::max(fs * 0.9f, (avail.y - header_h - legend_h) / float(std::max(T, 1)));
  cell_h = std::min(cell_h, fs * 2.2f);
  (void)rows_h;

  // Legend (top): the colour scale and what it means.
  const ImVec2 lg(origin.x, origin.y);
  const float lg_w = std::min(avail.x * 0.45f, fs * 18);
  const int steps = 64;
  for (int i = 0; i < steps; ++i) {
    const float x0 = lg.x + lg_w * i / steps, x1 = lg.x + lg_w * (i + 1) / steps;
    dl->AddRectFilled(ImVec2(x0, lg.y + 2), ImVec2(x1, lg.y + fs * 0.9f), to_u32(heat_color((i + 0.5f) / steps)));
  }
  char lo[32], hi[32];
  std::snprintf(lo, sizeof lo, "0");
  std::snprintf(hi, sizeof hi, "%.1f", vmax);
  dl->AddText(ImVec2(lg.x, lg.y + fs), IM_COL32(200, 200, 200, 255), lo);
  dl->AddText(ImVec2(lg.x + lg_w - ImGui::CalcTextSize(hi).x, lg.y + fs), IM_COL32(200, 200, 200, 255), hi);
  const char* meaning = have_probs ? "router probability softmax(logits)" : "multiplier of the chosen experts";
  dl->AddText(ImVec2(lg.x + lg_w + fs, lg.y), IM_COL32(220, 220, 220, 255), meaning);
  dl->AddRect(ImVec2(lg.x + lg_w + fs, lg.y + fs * 1.25f), ImVec2(lg.x + lg_w + fs * 1.8f, lg.y + fs * 2.05f),
              IM_COL32(255, 255, 255, 255), 0, 0, 2.5f);
  dl->AddText(ImVec2(lg.x + lg_w + fs * 2.1f, lg.y + fs * 1.1f), IM_COL32(220, 220, 220, 255), "1st choice");
  const float c2 = lg.x + lg_w + fs * 2.4f + ImGui::CalcTextSize("1st choice").x;
  dl->AddRect(ImVec2(c2, lg.y + fs * 1.25f), ImVec2(c2 + fs * 0.8f, lg.y + fs * 2.05f), IM_COL32(255, 120, 200, 255), 0, 0, 2.f);
  char chosen[64];
  std::snprintf(chosen, sizeof chosen, k > 2 ? "2nd..%dth choice" : "2nd choice", k);
  dl->AddText(ImVec2(c2 + fs * 1.1f, lg.y + fs * 1.1f), IM_COL32(220, 220, 220, 255), chosen);
  ImGui::Dummy(ImVec2(avail.x, legend_h));

  // The grid lives in a scrolling child so long prompts stay readable.
  ImGui::BeginChild("grid", ImVec2(0, 0), false, ImGuiWindowFlags_HorizontalScrollbar);
  dl = ImGui::GetWindowDrawList();
  const ImVec2 o = ImGui::GetCursorScreenPos();
  const float gx = o.x + label_w, gy = o.y + header_h;

  // Column header: expert ids and the owner GPU strip.
  for (int e = 0; e < E; ++e) {
    const float x0 = gx + e * cell_w;
    char id[16];
    std::snprintf(id, sizeof id, "%d", e);
    const float tw = ImGui::CalcTextSize(id).x;
    if (tw < cell_w) dl->AddText(ImVec2(x0 + (cell_w - tw) * 0.5f, o.y), IM_COL32(200, 200, 200, 255), id);
    if (v) dl->AddRectFilled(ImVec2(x0 + 1, o.y + fs * 1.15f), ImVec2(x0 + cell_w - 1, o.y + header_h - 3),
                             to_u32(gpu_color(v->owner[e])));
  }
  dl->AddText(ImVec2(o.x, o.y), IM_COL32(160, 160, 160, 255), "expert");
  if (v) dl->AddText(ImVec2(o.x, o.y + fs * 0.95f), IM_COL32(160, 160, 160, 255), "on GPU");

  const ImVec2 mouse = ImGui::GetIO().MousePos;
  const bool hovered_win = ImGui::IsWindowHovered();
  for (int t = 0; t < T; ++t) {
    const float y0 = gy + t * cell_h;
    // Piece label, right-aligned, clipped to the margin.
    const std::string& p = f.pieces[t];
    const float tw = ImGui::CalcTextSize(p.c_str()).x;
    dl->PushClipRect(ImVec2(o.x, y0), ImVec2(gx - 4, y0 + cell_h), true);
    dl->AddText(ImVec2(std::max(o.x, gx - 6 - tw), y0 + (cell_h - fs) * 0.5f), IM_COL32(230, 230, 230, 255), p.c_str());
    dl->PopClipRect();
    for (int e = 0; e < E; ++e) {
      const float x0 = gx + e * cell_w;
      dl->AddRectFilled(ImVec2(x0, y0), ImVec2(x0 + cell_w - 1, y0 + cell_h - 1), to_u32(heat_color(value(t, e) / vmax)));
    }
    for (int j = 0; j < k; ++j) {
      const int e = f.routing.id(t, j);
      const float x0 = gx + e * cell_w;
      // First choice: thick white outline; later choices: thinner, grey (the number is drawn when it fits).
      dl->AddRect(ImVec2(x0, y0), ImVec2(x0 + cell_w - 1, y0 + cell_h - 1),
                  j == 0 ? IM_COL32(255, 255, 255, 255) : IM_COL32(255, 120, 200, 255), 0, 0, j == 0 ? 2.5f : 2.f);
      char c[16];
      std::snprintf(c, sizeof c, "%d", j + 1);
      if (cell_h >= fs && cell_w >= fs) {
        const float cw = ImGui::CalcTextSize(c).x;
        const Rgb bg = heat_color(value(t, e) / vmax);
        const bool light = bg.r * 0.3 + bg.g * 0.59 + bg.b * 0.11 > 140;
        dl->AddText(ImVec2(x0 + (cell_w - cw) * 0.5f, y0 + (cell_h - fs) * 0.5f),
                    light ? IM_COL32(0, 0, 0, 255) : IM_COL32(255, 255, 255, 255), c);
      }
    }
  }
  ImGui::Dummy(ImVec2(label_w + E * cell_w, header_h + T * cell_h));

  // Tooltip: exact numbers of the cell under the mouse.
  if (hovered_win && mouse.x >= gx && mouse.y >= gy) {
    const int e = int((mouse.x - gx) / cell_w), t = int((mouse.y - gy) / cell_h);
    if (e >= 0 && e < E && t >= 0 && t < T) {
      ImGui::BeginTooltip();
      ImGui::Text("token %d  \"%s\"  (id %d)", t, f.pieces[t].c_str(), f.tokens[t]);
      ImGui::Text("expert %d%s", e, v ? (" on GPU " + std::to_string(v->owner[e])).c_str() : "");
      if (have_probs) ImGui::Text("router probability %.4f", f.probs[std::size_t(t) * E + e]);
      int choice = -1;
      for (int j = 0; j < k; ++j) if (f.routing.id(t, j) == e) choice = j;
      if (choice >= 0)
        ImGui::Text("choice %d of %d, multiplier %.4f", choice + 1, k, f.routing.weight(t, choice));
      else
        ImGui::TextDisabled("not chosen");
      ImGui::Separator();
      for (int j = 0; j < k; ++j)
        ImGui::Text("choice %d: expert %d  x %.4f", j + 1, f.routing.id(t, j), f.routing.weight(t, j));
      ImGui::EndTooltip();
    }
  }
  ImGui::EndChild();
}

}  // namespace eplab::viz
