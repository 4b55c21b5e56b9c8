// EP Lab visualizer: window, OpenGL context and the frame loop (GLFW + Dear ImGui's GLFW/OpenGL3
// backends). What it shows lives in app.cpp and the panel_*.cpp files; README.md explains the panels.
//
//   visualizer [--model DIR] [--prompt TEXT] [--layer L] [--ep-size N] [--placement linear|round-robin|trace]
//              [--gpus-per-node G] [--trace FILE] [--screenshot out.png --frames N] [--width W --height H]
//              [--device auto|gpu|cpu] [--print-routing]
//
// --device picks where live routing runs (the GPU kernels or the CPU reference); --print-routing opens no
// window: it prints the live routing of --prompt at --layer, one line per token, and exits 0.
//
// --screenshot renders N frames in a real window (works under `xvfb-run -a` with Mesa), writes the PNG and
// exits: 0 when nothing went wrong, otherwise "error: ..." on one line and exit code 2 (the PNG is still
// written, showing the error in the window).
#include <algorithm>
#include <cstdio>
#include <string>

#include <GLFW/glfw3.h>
#include <imgui.h>
#include <imgui_impl_glfw.h>
#include <imgui_impl_opengl3.h>
#include <sys/stat.h>

#include "app.hpp"
#include "colors.hpp"
#include "device.hpp"
#include "options.hpp"
#include "routing_cli.hpp"
#include "screenshot.hpp"
#include "util/check.hpp"

namespace {

std::string g_glfw_error;
void on_glfw_error(int code, const char* text) { g_glfw_error = "GLFW error " + std::to_string(code) + ": " + text; }

GLFWwindow* open_window(const eplab::viz::Options& o) {
  glfwSetErrorCallback(on_glfw_error);
  eplab::require(glfwInit() == GLFW_TRUE, "cannot start GLFW (", g_glfw_error,
                 "); no display? run under `xvfb-run -a` or set DISPLAY");
  glfwWindowHint(GLFW_RESIZABLE, GLFW_TRUE);
  glfwWindowHint(GLFW_CONTEXT_VERSION_MAJOR, 3);
  glfwWindowHint(GLFW_CONTEXT_VERSION_MINOR, 3);
  glfwWindowHint(GLFW_OPENGL_PROFILE, GLFW_OPENGL_CORE_PROFILE);
  GLFWwindow* w = glfwCreateWindow(o.width, o.height, "EP Lab visualizer", nullptr, nullptr);
  if (!w) {  // older drivers: take whatever context the system gives
    glfwDefaultWindowHints();
    glfwWindowHint(GLFW_RESIZABLE, GLFW_TRUE);
    w = glfwCreateWindow(o.width, o.height, "EP Lab visualizer", nullptr, nullptr);
  }
  if (!w) {
    const std::string why = g_glfw_error;
    glfwTerminate();
    eplab::fail("cannot open an OpenGL window (", why, "); under Xvfb install Mesa (libgl1-mesa-dri)");
  }
  glfwMakeContextCurrent(w);
  glfwSwapInterval(1);
  return w;
}

void style_imgui() {
  ImGui::StyleColorsDark();
  ImGuiStyle& s = ImGui::GetStyle();
  s.WindowRounding = 0;
  s.ChildRounding = 4;
  s.FrameRounding = 3;
  s.WindowPadding = ImVec2(10, 8);
  s.ItemSpacing = ImVec2(8, 6);
  const auto bg = eplab::viz::kBackground;
  s.Colors[ImGuiCol_WindowBg] = ImVec4(bg.r / 255.f, bg.g / 255.f, bg.b / 255.f, 1.f);
  s.Colors[ImGuiCol_ChildBg] = ImVec4(0.13f, 0.14f, 0.16f, 1.f);
  s.Colors[ImGuiCol_Border] = ImVec4(0.3f, 0.32f, 0.36f, 1.f);
  ImGuiIO& io = ImGui::GetIO();
  io.IniFilename = nullptr;  // nothing written next to the binary
  struct stat st {};
  if (::stat(EPLAB_VIZ_FONT, &st) == 0) {
    // Latin plus the block element U+2581 "▁" that marks a word start in token pieces.
    static ImVector<ImWchar> ranges;
    ImFontGlyphRangesBuilder b;
    b.AddRanges(io.Fonts->GetGlyphRangesDefault());
    b.AddChar(0x2581);
    b.AddChar(0x2192);  // "→"
    b.BuildRanges(&ranges);
    io.Fonts->AddFontFromFileTTF(EPLAB_VIZ_FONT, 16.f, nullptr, ranges.Data);
  }
}

int run(int argc, char** argv) {
  eplab::viz::Options opt;
  if (auto rc = eplab::viz::parse_options(argc, argv, opt)) return *rc;
  // Before the window: `--device gpu` without a GPU is a flag error (one line, non-zero exit).
  const eplab::DeviceChoice dev = eplab::choose_device(opt.device);
  if (opt.print_routing) return eplab::viz::print_routing(opt, dev);  // routing_cli.hpp, no window
  GLFWwindow* window = open_window(opt);
  IMGUI_CHECKVERSION();
  ImGui::CreateContext();
  style_imgui();
  // A screenshot shows the panels, not a tooltip under wherever the (virtual) pointer happens to sit.
  if (!opt.screenshot.empty()) ImGui::GetIO().ConfigFlags |= ImGuiConfigFlags_NoMouse;
  ImGui_ImplGlfw_InitForOpenGL(window, true);
  ImGui_ImplOpenGL3_Init("#version 130");

  int code = 0;
  std::string error;
  {
    eplab::viz::App app(opt, dev);
    const bool shot = !opt.screenshot.empty();
    for (int frame = 1; !glfwWindowShouldClose(window); ++frame) {
      if (shot) glfwPollEvents();
      else glfwWaitEventsTimeout(0.1);  // idle at ~10 Hz so a followed trace still updates
      // One-shot runs: anything left of the trace (a cut last line) counts before the final frame is drawn.
      if (shot && frame == opt.frames) app.finish_trace();
      ImGui_ImplOpenGL3_NewFrame();
      ImGui_ImplGlfw_NewFrame();
      ImGui::NewFrame();
      app.frame();
      ImGui::Render();
      int fw = 0, fh = 0;
      glfwGetFramebufferSize(window, &fw, &fh);
      glViewport(0, 0, fw, fh);
      const auto bg = eplab::viz::kBackground;
      glClearColor(bg.r / 255.f, bg.g / 255.f, bg.b / 255.f, 1.f);
      glClear(GL_COLOR_BUFFER_BIT);
      ImGui_ImplOpenGL3_RenderDrawData(ImGui::GetDrawData());
      if (shot && frame >= opt.frames) {
        try {
          eplab::viz::write_screenshot(opt.screenshot, fw, fh);
        } catch (const std::exception& e) {
          error = e.what();
        }
        const auto errs = app.errors();
        if (error.empty() && !errs.empty()) {
          error = errs.front();
          if (errs.size() > 1) error += " (and " + std::to_string(errs.size() - 1) + " more)";
        }
        code = error.empty() ? 0 : 2;
        if (code == 0) std::printf("visualizer: wrote %s (%dx%d, %d frames)\n", opt.screenshot.c_str(), fw, fh, frame);
        break;
      }
      glfwSwapBuffers(window);
    }
  }
  ImGui_ImplOpenGL3_Shutdown();
  ImGui_ImplGlfw_Shutdown();
  ImGui::DestroyContext();
  glfwDestroyWindow(window);
  glfwTerminate();
  for (char& c : error) if (c == '\n' || c == '\r') c = ' ';  // the error stays one line
  if (!error.empty()) eplab::fail(error);
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  return eplab::run_main([&] { return run(argc, argv); });
}
