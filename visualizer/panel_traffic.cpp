// Traffic: the GPU x GPU all-to-all matrix of dispatch bytes (row = sender, column = receiver), from the
// EP plan every rank of chapter 04 builds. The combine sends the same bytes back (the transpose). The
// diagonal stays on the GPU (no wire); with GPUs per node set, cells inside a node are blue (NVLink-class
// links) and cells across nodes orange (the network), with node boundaries drawn.
#include <algorithm>
#include <cmath>
#include <string>

#include <imgui.h>

#include "draw_util.hpp"
#include "panels.hpp"

namespace eplab::viz {

namespace {
ImU32 shade(Rgb base, double frac) {  // dark background -> full colour as frac goes 0 -> 1
  const double f = 0.18 + 0.82 * std::clamp(frac, 0.0, 1.0);
  return IM_COL32(int(40 + (base.r - 40) * f), int(42 + (base.g - 42) * f), int(50 + (base.b - 50) * f), 255);
}
constexpr Rgb kLocal{150, 150, 150}, kIntra{80, 150, 230}, kInter{245, 140, 50};
}  // namespace

void draw_traffic(const EpView& v, int gpus_per_node) {
  const int N = v.ep_size;
  panel_title("All-to-all dispatch traffic", "bytes GPU -> GPU, bf16 rows; combine returns the same bytes");
  const double wire = v.intra_bytes + v.inter_bytes;
  ImGui::Text("on the wire %s", format_bytes(wire).c_str());
  ImGui::SameLine();
  ImGui::TextColored(ImVec4(0.6f, 0.6f, 0.6f, 1), "| local %s", format_bytes(v.local_bytes).c_str());
  ImGui::SameLine();
  ImGui::TextColored(ImVec4(0.31f, 0.59f, 0.9f, 1), "| intra-node %s", format_bytes(v.intra_bytes).c_str());
  ImGui::SameLine();
  if (gpus_per_node > 0)
    ImGui::TextColored(ImVec4(0.96f, 0.55f, 0.2f, 1), "| inter-node %s", format_bytes(v.inter_bytes).c_str());
  else
    ImGui::TextDisabled("| inter-node: set GPUs/node");

  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImVec2 o = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float fs = ImGui::GetFontSize();
  const float lab = fs * 3.2f;
  const float legend_w = fs * 11;
  const float side = std::max(20.f, std::min(avail.x - lab - legend_w, avail.y - lab));
  const float cell = side / N;
  const float gx = o.x + lab, gy = o.y + lab * 0.8f;
  int max_rows = 1;
  for (int s = 0; s < N; ++s)
    for (int d = 0; d < N; ++d) max_rows = std::max(max_rows, v.traffic[std::size_t(s) * N + d]);

  dl->AddText(ImVec2(gx, o.y), IM_COL32(170, 170, 170, 255), "to GPU ->");
  dl->AddText(ImVec2(o.x, gy - fs * 1.2f), IM_COL32(170, 170, 170, 255), "from");
  for (int i = 0; i < N; ++i) {
    char s[16];
    std::snprintf(s, sizeof s, "%d", i);
    const float tw = ImGui::CalcTextSize(s).x;
    if (tw < cell) {
      dl->AddText(ImVec2(gx + cell * i + (cell - tw) * 0.5f, gy - fs - 2), IM_COL32(210, 210, 210, 255), s);
      dl->AddText(ImVec2(gx - tw - 5, gy + cell * i + (cell - fs) * 0.5f), IM_COL32(210, 210, 210, 255), s);
    }
  }
  for (int s = 0; s < N; ++s)
    for (int d = 0; d < N; ++d) {
      const int rows = v.traffic[std::size_t(s) * N + d];
      const bool local = s == d;
      const bool inter = gpus_per_node > 0 && v.node_of(s, gpus_per_node) != v.node_of(d, gpus_per_node);
      const Rgb base = local ? kLocal : (inter ? kInter : kIntra);
      const ImVec2 a(gx + cell * d, gy + cell * s), b(gx + cell * (d + 1) - 1, gy + cell * (s + 1) - 1);
      dl->AddRectFilled(a, b, shade(base, double(rows) / max_rows));
      if (cell > fs * 2.2f && rows > 0) {
        const std::string t = format_bytes(rows * v.bytes_per_row);
        const float tw = ImGui::CalcTextSize(t.c_str()).x;
        if (tw < cell - 2) dl->AddText(ImVec2(a.x + (cell - tw) * 0.5f, a.y + (cell - fs) * 0.5f), IM_COL32(255, 255, 255, 235), t.c_str());
      }
    }
  if (gpus_per_node > 0)
    for (int i = gpus_per_node; i < N; i += gpus_per_node) {
      dl->AddLine(ImVec2(gx + cell * i - 1, gy), ImVec2(gx + cell * i - 1, gy + side), IM_COL32(255, 255, 255, 255), 2.f);
      dl->AddLine(ImVec2(gx, gy + cell * i - 1), ImVec2(gx + side, gy + cell * i - 1), IM_COL32(255, 255, 255, 255), 2.f);
    }

  // Legend to the right.
  const float lx = gx + side + fs, ly = gy;
  auto key = [&](float y, Rgb c, const char* text) {
    dl->AddRectFilled(ImVec2(lx, y), ImVec2(lx + fs, y + fs), to_u32(c));
    dl->AddText(ImVec2(lx + fs * 1.4f, y), IM_COL32(220, 220, 220, 255), text);
  };
  key(ly, kLocal, "same GPU (no wire)");
  key(ly + fs * 1.5f, kIntra, gpus_per_node > 0 ? "intra-node" : "GPU to GPU");
  if (gpus_per_node > 0) key(ly + fs * 3.0f, kInter, "inter-node");
  char s[96];
  std::snprintf(s, sizeof s, "brighter = more rows");
  dl->AddText(ImVec2(lx, ly + fs * 4.5f), IM_COL32(150, 150, 150, 255), s);
  std::snprintf(s, sizeof s, "1 row = %s", format_bytes(v.bytes_per_row).c_str());
  dl->AddText(ImVec2(lx, ly + fs * 5.8f), IM_COL32(150, 150, 150, 255), s);
  ImGui::Dummy(avail);

  const ImVec2 m = ImGui::GetIO().MousePos;
  if (ImGui::IsWindowHovered() && m.x >= gx && m.y >= gy && m.x < gx + side && m.y < gy + side) {
    const int d = std::min(N - 1, int((m.x - gx) / cell)), s2 = std::min(N - 1, int((m.y - gy) / cell));
    const int rows = v.traffic[std::size_t(s2) * N + d];
    ImGui::BeginTooltip();
    ImGui::Text("GPU %d -> GPU %d", s2, d);
    ImGui::Text("%d rows x %s = %s (%s bytes)", rows, format_bytes(v.bytes_per_row).c_str(),
                format_bytes(rows * v.bytes_per_row).c_str(), with_commas((long long)(rows * v.bytes_per_row)).c_str());
    const bool inter = gpus_per_node > 0 && v.node_of(s2, gpus_per_node) != v.node_of(d, gpus_per_node);
    ImGui::TextUnformatted(s2 == d ? "stays on the GPU" : (inter ? "crosses nodes" : "inside one node"));
    ImGui::EndTooltip();
  }
}

}  // namespace eplab::viz
