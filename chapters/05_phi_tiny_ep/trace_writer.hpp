// The routing trace chapter 05 writes for the visualizer: JSON lines, one per (step, layer), in the format of
// visualizer/README.md ("Trace format"). Each line is flushed as soon as it is written, so a visualizer in
// follow mode (`--trace FILE --placement trace`) shows a running job.
#pragma once
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "moe/routing.hpp"
#include "util/check.hpp"

namespace eplab {

class TraceWriter {
 public:
  TraceWriter() = default;
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;
  ~TraceWriter() {
    if (f_) std::fclose(f_);
  }

  // Truncates (a new run rewrites the file; the visualizer then reads it again from the start).
  void open(const std::string& path) {
    f_ = std::fopen(path.c_str(), "w");
    require(f_ != nullptr, "--trace ", path, ": cannot open for writing (check the directory exists)");
    path_ = path;
  }
  bool active() const { return f_ != nullptr; }

  // tokens [T], pieces [T] or empty (the visualizer then shows "#id"), routing of the same T rows,
  // rank_of_expert [E], rank_of_token [T].
  void write(int step, int layer, int ep_size, int num_experts, int hidden, const std::vector<int>& tokens,
             const std::vector<std::string>& pieces, const Routing& r, const std::vector<int>& rank_of_expert,
             const std::vector<int>& rank_of_token) {
    using nlohmann::json;
    json experts = json::array(), weights = json::array();
    for (int t = 0; t < r.tokens; ++t) {
      json e = json::array(), w = json::array();
      for (int j = 0; j < r.k; ++j) {
        e.push_back(r.id(t, j));
        w.push_back(std::round(double(r.weight(t, j)) * 1e6) / 1e6);  // 6 decimals: "0.71", not "0.7099999785"
      }
      experts.push_back(std::move(e));
      weights.push_back(std::move(w));
    }
    json j = {{"step", step},         {"layer", layer},         {"ep_size", ep_size},
              {"num_experts", num_experts}, {"hidden", hidden},  {"tokens", tokens},
              {"experts", experts},   {"weights", weights},     {"rank_of_expert", rank_of_expert},
              {"rank_of_token", rank_of_token}};
    if (!pieces.empty()) j["pieces"] = pieces;
    const std::string line = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    require(std::fwrite(line.data(), 1, line.size(), f_) == line.size() && std::fflush(f_) == 0, "--trace ", path_,
            ": write failed (disk full?)");
  }

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
};

}  // namespace eplab
