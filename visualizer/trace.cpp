#include "trace.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab::viz {

namespace {
using nlohmann::json;

const json& field(const json& j, const char* name) {
  auto it = j.find(name);
  require(it != j.end(), "missing field \"", name, "\"");
  return *it;
}
int as_int(const json& v, const char* what) {
  require(v.is_number_integer(), "\"", what, "\" must be an integer");
  return v.get<int>();
}
}  // namespace

RoutingFrame parse_trace_line(const std::string& line, int fallback_experts, int fallback_hidden) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto p = what.find("parse error"); p != std::string::npos) what = what.substr(p);
    fail("not valid JSON (", what, ")");
  }
  require(j.is_object(), "a trace line must be a JSON object");
  RoutingFrame f;
  f.step = as_int(field(j, "step"), "step");
  f.layer = as_int(field(j, "layer"), "layer");
  require(f.layer >= 0, "\"layer\" must be >= 0");
  const json& tokens = field(j, "tokens");
  const json& experts = field(j, "experts");
  const json& weights = field(j, "weights");
  require(tokens.is_array() && experts.is_array() && weights.is_array(),
          "\"tokens\", \"experts\" and \"weights\" must be arrays");
  const int T = int(tokens.size());
  require(int(experts.size()) == T && int(weights.size()) == T, "\"experts\" has ", experts.size(),
          " rows and \"weights\" ", weights.size(), ", but there are ", T, " tokens");
  for (const auto& t : tokens) f.tokens.push_back(as_int(t, "tokens[]"));
  if (auto it = j.find("pieces"); it != j.end()) {
    require(it->is_array() && int(it->size()) == T, "\"pieces\" must be an array of ", T, " strings");
    for (const auto& p : *it) {
      require(p.is_string(), "\"pieces[]\" must be strings");
      f.pieces.push_back(p.get<std::string>());
    }
  } else {
    for (int id : f.tokens) f.pieces.push_back("#" + std::to_string(id));
  }
  int k = T ? int(experts[0].size()) : 0;
  f.routing.tokens = T;
  f.routing.k = k;
  int max_id = -1;
  for (int t = 0; t < T; ++t) {
    require(experts[t].is_array() && weights[t].is_array() && int(experts[t].size()) == k &&
                int(weights[t].size()) == k,
            "token ", t, ": \"experts\" and \"weights\" rows must all have k = ", k, " entries");
    for (int c = 0; c < k; ++c) {
      int e = as_int(experts[t][c], "experts[][]");
      require(e >= 0, "token ", t, ": expert id ", e, " is negative");
      require(weights[t][c].is_number(), "\"weights[][]\" must be numbers");
      f.routing.ids.push_back(e);
      f.routing.weights.push_back(weights[t][c].get<float>());
      max_id = std::max(max_id, e);
    }
  }
  if (auto it = j.find("rank_of_expert"); it != j.end()) {
    require(it->is_array(), "\"rank_of_expert\" must be an array");
    for (const auto& r : *it) f.rank_of_expert.push_back(as_int(r, "rank_of_expert[]"));
  }
  if (auto it = j.find("ep_size"); it != j.end()) f.ep_size = as_int(*it, "ep_size");
  if (auto it = j.find("num_experts"); it != j.end()) f.num_experts = as_int(*it, "num_experts");
  else if (!f.rank_of_expert.empty()) f.num_experts = int(f.rank_of_expert.size());
  else f.num_experts = fallback_experts > 0 ? fallback_experts : max_id + 1;  // the loaded model's E
  f.hidden = fallback_hidden;
  if (auto it = j.find("hidden"); it != j.end()) f.hidden = as_int(*it, "hidden");
  require(max_id < f.num_experts, "expert id ", max_id, " but the run has ", f.num_experts, " experts");
  if (!f.rank_of_expert.empty()) {
    require(int(f.rank_of_expert.size()) == f.num_experts, "\"rank_of_expert\" has ", f.rank_of_expert.size(),
            " entries for ", f.num_experts, " experts");
    require(f.ep_size >= 1, "\"ep_size\" must be given (>= 1) with \"rank_of_expert\"");
    for (int r : f.rank_of_expert)
      require(r >= 0 && r < f.ep_size, "\"rank_of_expert\" names rank ", r, " but ep_size is ", f.ep_size);
  }
  if (auto it = j.find("rank_of_token"); it != j.end()) {
    require(it->is_array() && int(it->size()) == T, "\"rank_of_token\" must have one rank per token");
    for (const auto& r : *it) {
      int v = as_int(r, "rank_of_token[]");
      require(v >= 0 && (f.ep_size < 1 || v < f.ep_size), "\"rank_of_token\" names rank ", v);
      f.rank_of_token.push_back(v);
    }
  }
  if (auto it = j.find("probs"); it != j.end()) {
    require(it->is_array() && int(it->size()) == T, "\"probs\" must have one row per token");
    for (const auto& row : *it) {
      require(row.is_array() && int(row.size()) == f.num_experts, "\"probs\" rows must have ", f.num_experts,
              " entries");
      for (const auto& p : row) f.probs.push_back(p.get<float>());
    }
  }
  return f;
}

std::string to_trace_line(const RoutingFrame& f) {
  json j;
  j["step"] = f.step;
  j["layer"] = f.layer;
  if (f.ep_size > 0) j["ep_size"] = f.ep_size;
  j["num_experts"] = f.num_experts;
  if (f.hidden > 0) j["hidden"] = f.hidden;
  j["tokens"] = f.tokens;
  j["pieces"] = f.pieces;
  json ex = json::array(), w = json::array();
  for (int t = 0; t < f.T(); ++t) {
    json e1 = json::array(), w1 = json::array();
    for (int c = 0; c < f.routing.k; ++c) {
      e1.push_back(f.routing.id(t, c));
      w1.push_back(f.routing.weight(t, c));
    }
    ex.push_back(e1);
    w.push_back(w1);
  }
  j["experts"] = ex;
  j["weights"] = w;
  if (!f.rank_of_expert.empty()) j["rank_of_expert"] = f.rank_of_expert;
  if (!f.rank_of_token.empty()) j["rank_of_token"] = f.rank_of_token;
  return j.dump();
}

TraceFollower::TraceFollower(std::string path, int fallback_experts, int fallback_hidden)
    : path_(std::move(path)), fallback_experts_(fallback_experts), fallback_hidden_(fallback_hidden) {}

void TraceFollower::add_error(const std::string& msg) {
  errors_.push_back("trace " + path_ + ": " + msg);
  if (errors_.size() > 200) errors_.erase(errors_.begin());  // a runaway writer must not eat the memory
}

int TraceFollower::poll() {
  if (path_.empty()) return 0;
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    std::string why = ::stat(path_.c_str(), &st) != 0 ? std::strerror(errno) : "not a regular file";
    std::string msg = "cannot read it (" + why + "); waiting for it to appear";
    if (msg != last_io_error_) add_error(msg);
    last_io_error_ = msg;
    return 0;
  }
  const std::uint64_t size = std::uint64_t(st.st_size);
  if (size < offset_) {  // rewritten by a new run: start over
    add_error("the file shrank (rewritten?): reading it again from the start");
    offset_ = 0;
    partial_.clear();
    line_no_ = 0;
    frames_.clear();
  }
  if (size == offset_) return 0;
  std::ifstream in(path_, std::ios::binary);
  if (!in) {
    std::string msg = std::string("cannot open it (") + std::strerror(errno) + ")";
    if (msg != last_io_error_) add_error(msg);
    last_io_error_ = msg;
    return 0;
  }
  last_io_error_.clear();
  in.seekg(std::streamoff(offset_));
  std::string chunk(size - offset_, '\0');
  in.read(chunk.data(), std::streamsize(chunk.size()));
  chunk.resize(std::size_t(in.gcount()));
  offset_ += chunk.size();
  partial_ += chunk;

  int added = 0;
  std::size_t start = 0;
  for (std::size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = partial_.substr(start, nl - start);
    ++line_no_;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are allowed
    try {
      frames_.push_back(parse_trace_line(line, fallback_experts_, fallback_hidden_));
      ++added;
    } catch (const std::exception& e) {
      add_error("line " + std::to_string(line_no_) + ": " + e.what());
    }
  }
  partial_.erase(0, start);
  return added;
}

void TraceFollower::finish() {
  if (path_.empty()) return;
  poll();
  if (partial_.find_first_not_of(" \t\r") != std::string::npos)
    add_error("line " + std::to_string(line_no_ + 1) + " is incomplete (truncated trace? no newline at the end)");
  else if (frames_.empty() && errors_.empty())
    add_error("no routing steps in it (empty trace)");
}

}  // namespace eplab::viz
