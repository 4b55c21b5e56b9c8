// Per-GPU load: rows (token choices) each GPU's experts compute for this step, with the mean as a dashed
// line and the max/mean imbalance; under each bar the experts it holds (expert slots) and the tokens
// that start on it. The busiest GPU sets the pace of the whole MoE layer.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <imgui.h>

#include "draw_util.hpp"
#include "panels.hpp"

namespace eplab::viz {

void draw_load(const EpView& v) {
  const int N = v.ep_size;
  char sub[160];
  std::snprintf(sub, sizeof sub, "%d GPUs, %s map", N, v.map_label.c_str());
  panel_title("Per-GPU load", sub);
  const double imb = v.imbalance();
  ImGui::Text("imbalance max/mean = ");
  ImGui::SameLine(0, 0);
  ImGui::TextColored(imb > 1.5 ? ImVec4(1, 0.45f, 0.4f, 1) : (imb > 1.15 ? ImVec4(1, 0.8f, 0.3f, 1) : ImVec4(0.5f, 0.9f, 0.5f, 1)),
                     "%.2f", imb);
  ImGui::SameLine();
  ImGui::TextDisabled("(max %.0f, mean %.2f rows per GPU)", v.load_max, v.load_mean);

  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImVec2 o = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float fs = ImGui::GetFontSize();
  // Footer under the bars: GPU id, experts held, then the key, wrapped to the panel's width.
  const std::vector<std::string> key = wrap_words(
      "bar = rows (token choices) its experts compute; red outline = busiest; \"exp\" = experts held",
      std::max(fs * 4, avail.x - fs * 0.5f));
  const float axis_w = fs * 3.2f, foot_h = fs * (2.3f + float(key.size()));
  const float x0 = o.x + axis_w, y0 = o.y + fs * 0.5f, y1 = o.y + avail.y - foot_h;
  const float plot_w = avail.x - axis_w - fs * 0.5f, plot_h = std::max(10.f, y1 - y0);
  const double top = std::max(4.0, std::ceil(v.load_max * 1.1 / 4.0) * 4.0);  // integer ticks

  // Y axis with 4 grid lines, in rows.
  for (int i = 0; i <= 4; ++i) {
    const float y = y1 - plot_h * i / 4.f;
    dl->AddLine(ImVec2(x0, y), ImVec2(x0 + plot_w, y), IM_COL32(70, 70, 80, 255));
    char s[32];
    std::snprintf(s, sizeof s, "%.0f", top * i / 4.0);
    dl->AddText(ImVec2(x0 - ImGui::CalcTextSize(s).x - 4, y - fs * 0.5f), IM_COL32(170, 170, 170, 255), s);
  }
  dl->AddText(ImVec2(o.x, o.y - 2), IM_COL32(150, 150, 150, 255), "rows");

  const float slot = plot_w / N, bw = slot * 0.7f;
  const ImVec2 mouse = ImGui::GetIO().MousePos;
  int hover = -1;
  for (int g = 0; g < N; ++g) {
    const float bx = x0 + slot * g + (slot - bw) * 0.5f;
    const float by = y1 - float(plot_h * v.rows_on_gpu[g] / top);
    const bool is_max = v.rows_on_gpu[g] == v.load_max;
    dl->AddRectFilled(ImVec2(bx, by), ImVec2(bx + bw, y1), to_u32(gpu_color(g)));
    if (is_max && N > 1) dl->AddRect(ImVec2(bx - 1, by - 1), ImVec2(bx + bw + 1, y1 + 1), IM_COL32(255, 90, 80, 255), 0, 0, 2.f);
    char s[32];
    std::snprintf(s, sizeof s, "%d", v.rows_on_gpu[g]);
    const float tw = ImGui::CalcTextSize(s).x;
    if (tw < slot) dl->AddText(ImVec2(bx + (bw - tw) * 0.5f, by - fs - 1), IM_COL32(230, 230, 230, 255), s);
    std::snprintf(s, sizeof s, "GPU %d", g);
    const float lw = ImGui::CalcTextSize(s).x;
    if (lw < slot) dl->AddText(ImVec2(bx + (bw - lw) * 0.5f, y1 + 3), IM_COL32(220, 220, 220, 255), s);
    else dl->AddText(ImVec2(bx + (bw - ImGui::CalcTextSize(s + 4).x) * 0.5f, y1 + 3), IM_COL32(220, 220, 220, 255), s + 4);
    std::snprintf(s, sizeof s, "%d exp", v.experts_on_gpu[g]);
    const float ew = ImGui::CalcTextSize(s).x;
    if (ew < slot) dl->AddText(ImVec2(bx + (bw - ew) * 0.5f, y1 + 3 + fs), IM_COL32(150, 150, 150, 255), s);
    if (mouse.x >= x0 + slot * g && mouse.x < x0 + slot * (g + 1) && mouse.y >= y0 && mouse.y <= y1 + foot_h)
      hover = g;
  }
  // Mean line, dashed.
  const float ym = y1 - float(plot_h * v.load_mean / top);
  for (float x = x0; x < x0 + plot_w; x += 12) dl->AddLine(ImVec2(x, ym), ImVec2(std::min(x + 7, x0 + plot_w), ym), IM_COL32(255, 255, 255, 200), 1.5f);
  dl->AddText(ImVec2(x0 + 3, ym - fs - 1), IM_COL32(255, 255, 255, 220), "mean");
  for (std::size_t i = 0; i < key.size(); ++i)
    dl->AddText(ImVec2(o.x, y1 + 3 + fs * (2 + float(i))), IM_COL32(150, 150, 150, 255), key[i].c_str());
  ImGui::Dummy(avail);

  if (hover >= 0 && ImGui::IsWindowHovered()) {
    ImGui::BeginTooltip();
    ImGui::Text("GPU %d", hover);
    ImGui::Text("rows computed: %d (%.1f%% of %lld)", v.rows_on_gpu[hover],
                100.0 * v.rows_on_gpu[hover] / std::max(1.0, v.load_mean * N), static_cast<long long>(v.load_mean * N + 0.5));
    ImGui::Text("vs mean: %.3fx", v.load_mean > 0 ? v.rows_on_gpu[hover] / v.load_mean : 0.0);
    ImGui::Text("tokens that start here: %d", v.tokens_on_gpu[hover]);
    std::string ex;
    for (int e = 0; e < v.num_experts; ++e)
      if (v.owner[e] == hover) ex += std::to_string(e) + "(" + std::to_string(v.expert_rows[e]) + ") ";
    ImGui::Text("experts held: %d", v.experts_on_gpu[hover]);
    ImGui::TextUnformatted(("expert(rows): " + ex).c_str());
    ImGui::EndTooltip();
  }
}

}  // namespace eplab::viz
