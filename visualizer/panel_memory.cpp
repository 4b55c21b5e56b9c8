// Memory per GPU for each EP size, stacked: replicated weights and this GPU's experts (the cost model
// chapter 00 prints), KV cache and activation + all-to-all buffers (estimates, memory_view.hpp), for the
// loaded model and for the real Phi-tiny-MoE shape side by side. Each chart has its own scale.
#include <algorithm>
#include <string>

#include <imgui.h>

#include "draw_util.hpp"
#include "moe/cost_model.hpp"
#include "panels.hpp"

namespace eplab::viz {

namespace {
constexpr Rgb kParts[4] = {{120, 130, 160}, {89, 180, 110}, {176, 122, 200}, {240, 160, 60}};
const char* kPartNames[4] = {"replicated weights", "this GPU's experts", "KV cache (est.)", "activations + a2a buffers (est.)"};

void chart(const char* title, const std::vector<MemoryBar>& bars, ImVec2 o, ImVec2 size, int highlight) {
  ImDrawList* dl = ImGui::GetWindowDrawList();
  const float fs = ImGui::GetFontSize();
  dl->AddText(ImVec2(o.x, o.y), IM_COL32(230, 230, 230, 255), title);
  const float axis_w = fs * 4.2f;
  const float x0 = o.x + axis_w, y0 = o.y + fs * 1.8f, y1 = o.y + size.y - fs * 1.6f;
  const float pw = size.x - axis_w - fs * 0.5f, ph = std::max(10.f, y1 - y0);
  double top = 1;
  for (const auto& b : bars) top = std::max(top, b.total());
  top *= 1.08;
  for (int i = 0; i <= 4; ++i) {
    const float y = y1 - ph * i / 4.f;
    dl->AddLine(ImVec2(x0, y), ImVec2(x0 + pw, y), IM_COL32(70, 70, 80, 255));
    const std::string s = format_bytes(top * i / 4.0);
    dl->AddText(ImVec2(x0 - ImGui::CalcTextSize(s.c_str()).x - 4, y - fs * 0.5f), IM_COL32(170, 170, 170, 255), s.c_str());
  }
  const int n = int(bars.size());
  const float slot = pw / std::max(n, 1), bw = slot * 0.62f;
  const ImVec2 m = ImGui::GetIO().MousePos;
  for (int i = 0; i < n; ++i) {
    const MemoryBar& b = bars[i];
    const double parts[4] = {b.replicated, b.experts, b.kv_cache, b.buffers};
    const float bx = x0 + slot * i + (slot - bw) * 0.5f;
    double acc = 0;
    for (int p = 0; p < 4; ++p) {
      const float ya = y1 - float(ph * acc / top), yb = y1 - float(ph * (acc + parts[p]) / top);
      if (ya - yb >= 0.5f) dl->AddRectFilled(ImVec2(bx, yb), ImVec2(bx + bw, ya), to_u32(kParts[p]));
      acc += parts[p];
    }
    if (b.ep_size == highlight) dl->AddRect(ImVec2(bx - 2, y1 - float(ph * acc / top) - 2), ImVec2(bx + bw + 2, y1 + 1), IM_COL32(255, 255, 255, 255), 0, 0, 2.f);
    char s[32];
    std::snprintf(s, sizeof s, "EP %d", b.ep_size);
    const float tw = ImGui::CalcTextSize(s).x;
    dl->AddText(ImVec2(bx + (bw - tw) * 0.5f, y1 + 3), IM_COL32(220, 220, 220, 255), tw < slot ? s : s + 3);
    if (ImGui::IsWindowHovered() && m.x >= x0 + slot * i && m.x < x0 + slot * (i + 1) && m.y >= y0 && m.y <= y1 + fs * 1.5f) {
      ImGui::BeginTooltip();
      ImGui::Text("%s, EP size %d: busiest GPU holds %d experts per layer", title, b.ep_size, b.experts_per_gpu);
      for (int p = 0; p < 4; ++p)
        ImGui::Text("%-34s %10s  (%s bytes)", kPartNames[p], format_bytes(parts[p]).c_str(), with_commas((long long)parts[p]).c_str());
      ImGui::Separator();
      ImGui::Text("%-34s %10s", "total per GPU", format_bytes(b.total()).c_str());
      ImGui::EndTooltip();
    }
  }
}
}  // namespace

void draw_memory(const ModelConfig* loaded, const std::string& loaded_name, MemoryWorkload& w, int highlight_ep) {
  panel_title("Memory per GPU vs EP size", "busiest GPU; weights from the cost model (chapter 00), bf16");
  const float fs = ImGui::GetFontSize();
  ImGui::AlignTextToFramePadding();
  ImGui::TextUnformatted("batch");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(fs * 7);
  ImGui::SliderInt("##batch", &w.batch, 1, 256, "%d seqs", ImGuiSliderFlags_Logarithmic | ImGuiSliderFlags_AlwaysClamp);
  ImGui::SameLine();
  ImGui::TextUnformatted("length");
  ImGui::SameLine();
  ImGui::SetNextItemWidth(fs * 8);
  ImGui::SliderInt("##len", &w.seq_len, 16, 32768, "%d tokens", ImGuiSliderFlags_Logarithmic | ImGuiSliderFlags_AlwaysClamp);
  // Legend: items flow onto a second line when the panel is too narrow for one (no clipping at 1280 px).
  const float right = ImGui::GetCursorScreenPos().x + ImGui::GetContentRegionAvail().x;
  for (int p = 0; p < 4; ++p) {
    const float item_w = fs * 0.9f + 4 + ImGui::CalcTextSize(kPartNames[p]).x;
    if (p && ImGui::GetItemRectMax().x + 14 + item_w <= right) ImGui::SameLine(0, 14);
    const ImVec2 c = ImGui::GetCursorScreenPos();
    ImGui::GetWindowDrawList()->AddRectFilled(ImVec2(c.x, c.y + 4), ImVec2(c.x + fs * 0.8f, c.y + 4 + fs * 0.8f), to_u32(kParts[p]));
    ImGui::Dummy(ImVec2(fs * 0.9f, fs));
    ImGui::SameLine(0, 4);
    ImGui::TextUnformatted(kPartNames[p]);
  }

  const ImVec2 o = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float half = (avail.x - fs) * 0.5f;
  static const ModelConfig phi = phi_tiny_moe_config();
  if (loaded) {
    const std::string t = "loaded model" + (loaded_name.empty() ? std::string() : " (" + loaded_name + ")");
    chart(t.c_str(), memory_bars(*loaded, w), o, ImVec2(half, avail.y), highlight_ep);
  } else {
    ImGui::GetWindowDrawList()->AddText(o, IM_COL32(200, 120, 110, 255), "loaded model: none");
  }
  chart("Phi-tiny-MoE (real shape, 3.76 B)", memory_bars(phi, w), ImVec2(o.x + half + fs, o.y), ImVec2(half, avail.y), highlight_ep);
  ImGui::Dummy(avail);
}

}  // namespace eplab::viz
