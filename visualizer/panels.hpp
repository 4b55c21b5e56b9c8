// The panels. Each draws into the current ImGui child window, fills the space it is given, and shows
// exact numbers in tooltips. One file per panel.
#pragma once
#include <string>

#include "ep_view.hpp"
#include "memory_view.hpp"
#include "routing_frame.hpp"

namespace eplab {
struct ModelConfig;
}

namespace eplab::viz {

class App;

void draw_controls(App& app);                                         // panel_controls.cpp
void draw_routing(const RoutingFrame& f, const EpView* v, bool from_trace);  // panel_routing.cpp
void draw_load(const EpView& v);                                      // panel_load.cpp
void draw_traffic(const EpView& v, int gpus_per_node);                // panel_traffic.cpp
void draw_memory(const ModelConfig* loaded, const std::string& loaded_name, MemoryWorkload& w,
                 int highlight_ep);                                   // panel_memory.cpp

}  // namespace eplab::viz
