// Small drawing helpers for the panels (Dear ImGui draw lists).
#pragma once
#include <cstdio>
#include <string>

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

inline void panel_title(const char* title, const char* subtitle) {
  ImGui::TextColored(ImVec4(0.95f, 0.85f, 0.55f, 1.f), "%s", title);
  if (subtitle && *subtitle) {
    ImGui::SameLine();
    ImGui::TextDisabled("%s", subtitle);
  }
}

}  // namespace eplab::viz
