// What the load and traffic panels show, computed from one RoutingFrame with the project's plan code:
// make_dispatch_plan (rows per expert) and make_ep_send_plan / finish_ep_plan (common/moe/ep_plan.hpp)
// for the GPU x GPU matrix, exactly as chapter 04's ranks build it.
//
// Where the tokens start: each GPU routes its own tokens (chapter 04's layout). A frame from a trace may
// say which rank holds each token ("rank_of_token"); otherwise token t is on the GPU whose contiguous
// block holds it (T/N tokens each, the first T mod N GPUs one more).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/placement.hpp"
#include "routing_frame.hpp"

namespace eplab::viz {

enum class MapChoice { Linear, RoundRobin, FromTrace };
const char* map_choice_name(MapChoice m);

struct EpSettings {
  int ep_size = 4;
  MapChoice map = MapChoice::Linear;
  int gpus_per_node = 0;  // 0: one node (no intra/inter split)
};

struct EpView {
  int ep_size = 1, num_experts = 0;
  std::string map_label;                 // "linear", "round-robin", "trace's map (round-robin)", ...
  std::vector<int> owner;                // [E] GPU of each expert
  std::vector<int> expert_rows;          // [E] rows (token choices) per expert
  std::vector<int> tokens_on_gpu;        // [N] tokens that start on each GPU
  std::vector<int> rows_on_gpu;          // [N] rows each GPU's experts compute (its load)
  std::vector<int> experts_on_gpu;       // [N] experts held (expert slots)
  std::vector<int> traffic;              // [N*N] rows sent from GPU s to GPU d at s*N + d
  double bytes_per_row = 0;              // hidden * 2 (bf16 on the wire), one direction
  double local_bytes = 0, intra_bytes = 0, inter_bytes = 0;  // diagonal, same node, across nodes
  double load_max = 0, load_mean = 0;    // rows per GPU
  double imbalance() const { return load_mean > 0 ? load_max / load_mean : 1.0; }
  int node_of(int gpu, int gpus_per_node) const { return gpus_per_node > 0 ? gpu / gpus_per_node : 0; }
};

// Throws eplab::Error when the EP size does not fit the experts (N < 1 or N > E) or the trace's map is
// asked for but the frame has none.
EpView make_ep_view(const RoutingFrame& f, const EpSettings& s);

}  // namespace eplab::viz
