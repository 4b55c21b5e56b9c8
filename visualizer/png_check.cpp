// viz_png_check: checks a visualizer screenshot without trusting the visualizer's own idea of its layout.
//
// The app lays out a control bar on top and a 2 x 2 grid of panels below (routing | load, traffic |
// memory). The checker looks at one inner rectangle per panel (away from borders and the control bar,
// whose height depends on the font) and requires:
//   * the PNG has the expected size,
//   * each panel rectangle has at least --min-drawn of its pixels away from both the window background
//     and the panel's own background colour (its most common colour): something was drawn there,
//   * the routing panel contains heat-map colours: pixels close to at least --min-anchors distinct anchors
//     of the heat scale (colors.hpp), i.e. the map shows a range of values, not one flat colour.
// Prints one line per check; exit 0 when all pass, 1 otherwise.
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <stb_image.h>

#include "../visualizer/colors.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

namespace {

struct Img {
  int w = 0, h = 0;
  std::vector<unsigned char> px;  // RGB
  eplab::viz::Rgb at(int x, int y) const {
    const unsigned char* p = px.data() + (std::size_t(y) * w + x) * 3;
    return {p[0], p[1], p[2]};
  }
};

int dist(eplab::viz::Rgb a, eplab::viz::Rgb b) {
  return std::abs(a.r - b.r) + std::abs(a.g - b.g) + std::abs(a.b - b.b);
}

}  // namespace

int main(int argc, char** argv) {
  return eplab::run_main([&] {
    CLI::App app{"Check a visualizer screenshot"};
    std::string png;
    int want_w = 0, want_h = 0, min_anchors = 3;
    double min_drawn = 0.02;
    app.add_option("png", png, "the screenshot")->required();
    app.add_option("--width", want_w, "expected width (0: any)");
    app.add_option("--height", want_h, "expected height (0: any)");
    app.add_option("--min-drawn", min_drawn, "fraction of a panel's pixels that must be drawn")->capture_default_str();
    app.add_option("--min-anchors", min_anchors, "heat-map anchors that must appear")->capture_default_str();
    if (auto rc = eplab::parse_cli(app, argc, argv)) return *rc;

    Img img;
    int ch = 0;
    unsigned char* data = stbi_load(png.c_str(), &img.w, &img.h, &ch, 3);
    eplab::require(data != nullptr, png, ": cannot read it as an image (", stbi_failure_reason(), ")");
    img.px.assign(data, data + std::size_t(img.w) * img.h * 3);
    stbi_image_free(data);

    bool ok = true;
    auto check = [&](bool pass, const std::string& what) {
      std::printf("%s %s\n", pass ? "ok  " : "FAIL", what.c_str());
      ok = ok && pass;
    };
    check((want_w == 0 || img.w == want_w) && (want_h == 0 || img.h == want_h),
          "size " + std::to_string(img.w) + "x" + std::to_string(img.h) + " (want " + std::to_string(want_w) + "x" +
              std::to_string(want_h) + ")");

    // Inner rectangles of the four panels, as fractions of the image (x0, y0, x1, y1).
    struct Region {
      const char* name;
      double x0, y0, x1, y1;
    };
    const Region regions[] = {{"routing", 0.03, 0.25, 0.47, 0.55},
                              {"load", 0.53, 0.25, 0.97, 0.55},
                              {"traffic", 0.03, 0.65, 0.47, 0.95},
                              {"memory", 0.53, 0.65, 0.97, 0.95}};
    for (const Region& r : regions) {
      const int x0 = int(r.x0 * img.w), x1 = int(r.x1 * img.w), y0 = int(r.y0 * img.h), y1 = int(r.y1 * img.h);
      std::map<int, int> hist;
      for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x) {
          const auto c = img.at(x, y);
          ++hist[(c.r << 16) | (c.g << 8) | c.b];
        }
      int mode = 0, mode_n = -1;
      for (auto [c, n] : hist) if (n > mode_n) { mode = c; mode_n = n; }
      const eplab::viz::Rgb panel_bg{std::uint8_t(mode >> 16), std::uint8_t(mode >> 8), std::uint8_t(mode)};
      long drawn = 0, total = long(x1 - x0) * (y1 - y0);
      for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x) {
          const auto c = img.at(x, y);
          if (dist(c, panel_bg) > 24 && dist(c, eplab::viz::kBackground) > 24) ++drawn;
        }
      char s[160];
      std::snprintf(s, sizeof s, "panel %-8s drew %.1f%% of its pixels (need %.1f%%)", r.name, 100.0 * drawn / total,
                    100.0 * min_drawn);
      check(drawn >= min_drawn * total, s);
      if (std::string(r.name) == "routing") {
        int seen = 0;
        std::string list;
        for (const auto& a : eplab::viz::kHeatAnchors) {
          long n = 0;
          for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) n += dist(img.at(x, y), a) <= 30;
          // Anchors are interpolation end points; a few dozen close pixels means that part of the scale shows.
          if (n >= 30) {
            ++seen;
            list += " (" + std::to_string(a.r) + "," + std::to_string(a.g) + "," + std::to_string(a.b) + ")";
          }
        }
        check(seen >= min_anchors, "heat-map colours: " + std::to_string(seen) + " of " +
                                       std::to_string(eplab::viz::kHeatAnchors.size()) + " scale anchors present" + list +
                                       " (need " + std::to_string(min_anchors) + ")");
      }
    }
    std::printf("%s\n", ok ? "CHECK PASS viz_png_check" : "CHECK FAIL viz_png_check");
    return ok ? 0 : 1;
  });
}
