// Small drawing helpers for the panels (Dear ImGui draw lists).
#pragma once
#include <cstdio>
#include <string>
#include <vector>

#include <imgui.h>

#include "colors.hpp"

namespace eplab::viz {

inline ImU32 to_u32(Rgb c, int alpha = 255) { return IM_COL32(c.r, c.g, c.b, alpha); }

// "12.3 KiB", "1.50 GiB": binary units, 3 significant digits.
inline std::string format_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024.0 && u < 4) {
    b /= 1024.0;
    ++u;
  }
  char s[32];
  std::snprintf(s, sizeof s, u == 0 ? "%.0f %s" : (b < 10 ? "%.2f %s" : (b < 100 ? "%.1f %s" : "%.0f %s")), b,
                units[u]);
  return s;
}

inline std::string with_commas(long long v) {
  std::string s = std::to_string(v < 0 ? -v : v), out;
  for (int i = 0; i < int(s.size()); ++i) {
    if (i && (int(s.size()) - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return v < 0 ? "-" + out : out;
}

// Greedy word wrap of `text` into lines no wider than `width` pixels (current font). A single word wider
// than `width` gets a line of its own.
inline std::vector<std::string> wrap_words(const std::string& text, float width) {
  std::vector<std::string> lines;
  std::string line;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t j = text.find(' ', i);
    if (j == std::string::npos) j = text.size();
    const std::string word = text.substr(i, j - i);
    const std::string cand = line.empty() ? word : line + " " + word;
    if (!line.empty() && ImGui::CalcTextSize(cand.c_str()).x > width) {
      lines.push_back(line);
      line = word;
    } else {
      line = cand;
    }
    i = j + 1;
  }
  if (!line.empty() || lines.empty()) lines.push_back(line);
  return lines;
}

// Title, then the subtitle on the same line when it fits, otherwise wrapped below it (never clipped at the
// panel's right edge, whatever the window width).
inline void panel_title(const char* title, const char* subtitle) {
  ImGui::TextColored(ImVec4(0.95f, 0.85f, 0.55f, 1.f), "%s", title);
  if (subtitle && *subtitle) {
    ImGui::SameLine();
    if (ImGui::CalcTextSize(subtitle).x > ImGui::GetContentRegionAvail().x) ImGui::NewLine();
    ImGui::PushTextWrapPos(0.f);  // 0: wrap at the window's right edge
    ImGui::TextDisabled("%s", subtitle);
    ImGui::PopTextWrapPos();
  }
}

}  // namespace eplab::viz
