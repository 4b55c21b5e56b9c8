#include "moe/routing_trace.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab {

namespace {
using nlohmann::json;
using nlohmann::ordered_json;

// The float as the double of its shortest decimal ("0.71" for 0.71f), which JSON then prints as "0.71" and
// which reads back (text -> double -> float) to the same float. If that one round trip does not hold (a
// decimal near a rounding boundary), the float's exact double value, which always does.
double json_number(float v) {
  char buf[32];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  double d = 0;
  std::from_chars(buf, end, d);
  return float(d) == v ? d : double(v);
}

const json& field(const json& j, const char* name) {
  auto it = j.find(name);
  require(it != j.end(), "missing field \"", name, "\"");
  return *it;
}
int as_int(const json& v, const char* what) {
  require(v.is_number_integer(), "\"", what, "\" must be an integer");
  const auto x = v.get<std::int64_t>();
  require(x >= INT_MIN && x <= INT_MAX, "\"", what, "\" is out of range (", x, ")");
  return int(x);
}
std::vector<int> int_array(const json& v, const char* name, const char* what) {
  require(v.is_array(), "\"", name, "\" must be an array");
  std::vector<int> out;
  for (const auto& x : v) out.push_back(as_int(x, what));
  return out;
}
float as_float(const json& v, const char* what) {
  require(v.is_number(), "\"", what, "\" must be numbers");
  return float(v.get<double>());
}
}  // namespace

void check_trace_record(const TraceRecord& r) {
  const int T = r.routing.tokens, k = r.routing.k;
  require(r.layer >= 0, "\"layer\" must be >= 0 (it is ", r.layer, ")");
  require(r.ep_size >= 0 && r.num_experts >= 0 && r.hidden >= 0,
          "\"ep_size\", \"num_experts\" and \"hidden\" must be >= 0");
  require(T >= 0 && k >= 0 && r.routing.ids.size() == std::size_t(T) * k &&
              r.routing.weights.size() == std::size_t(T) * k,
          "the routing has ", r.routing.ids.size(), " expert ids and ", r.routing.weights.size(),
          " multipliers for ", T, " tokens x k = ", k);
  require(int(r.tokens.size()) == T, "\"tokens\" has ", r.tokens.size(), " entries but the routing has ", T,
          " tokens");
  require(r.pieces.empty() || int(r.pieces.size()) == T, "\"pieces\" has ", r.pieces.size(), " entries for ", T,
          " tokens");
  // E: given, else the expert map's length (what the reader infers).
  const int E = r.num_experts > 0 ? r.num_experts : int(r.rank_of_expert.size());
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < k; ++c) {
      const int e = r.routing.id(t, c);
      require(e >= 0, "token ", t, ": expert id ", e, " is negative");
      require(E == 0 || e < E, "token ", t, ": expert id ", e, ", but the run has ", E, " experts");
      require(std::isfinite(r.routing.weight(t, c)), "token ", t, ": multiplier ", r.routing.weight(t, c),
              " is not a finite number");
    }
  if (!r.rank_of_expert.empty()) {
    require(int(r.rank_of_expert.size()) == E, "\"rank_of_expert\" has ", r.rank_of_expert.size(), " entries for ",
            E, " experts");
    require(r.ep_size >= 1, "\"ep_size\" must be given (>= 1) with \"rank_of_expert\"");
    for (int v : r.rank_of_expert)
      require(v >= 0 && v < r.ep_size, "\"rank_of_expert\" names rank ", v, " but ep_size is ", r.ep_size);
  }
  if (!r.rank_of_token.empty()) {
    require(int(r.rank_of_token.size()) == T, "\"rank_of_token\" has ", r.rank_of_token.size(), " entries for ", T,
            " tokens");
    for (int v : r.rank_of_token) {
      require(v >= 0, "\"rank_of_token\" names rank ", v);
      require(r.ep_size < 1 || v < r.ep_size, "\"rank_of_token\" names rank ", v, " but ep_size is ", r.ep_size);
    }
  }
  if (!r.probs.empty()) {
    require(E > 0 && r.probs.size() == std::size_t(T) * E, "\"probs\" has ", r.probs.size(), " entries for ", T,
            " tokens x ", E, " experts");
    for (float p : r.probs) require(std::isfinite(p), "\"probs\" holds ", p, ", not a finite number");
  }
}

std::string to_trace_line(const TraceRecord& r) {
  check_trace_record(r);
  ordered_json j;
  j["step"] = r.step;
  j["layer"] = r.layer;
  if (r.ep_size > 0) j["ep_size"] = r.ep_size;
  if (r.num_experts > 0) j["num_experts"] = r.num_experts;
  if (r.hidden > 0) j["hidden"] = r.hidden;
  j["tokens"] = r.tokens;
  if (!r.pieces.empty()) j["pieces"] = r.pieces;
  ordered_json experts = ordered_json::array(), weights = ordered_json::array();
  for (int t = 0; t < r.T(); ++t) {
    ordered_json e = ordered_json::array(), w = ordered_json::array();
    for (int c = 0; c < r.routing.k; ++c) {
      e.push_back(r.routing.id(t, c));
      w.push_back(json_number(r.routing.weight(t, c)));
    }
    experts.push_back(std::move(e));
    weights.push_back(std::move(w));
  }
  j["experts"] = std::move(experts);
  j["weights"] = std::move(weights);
  if (!r.rank_of_expert.empty()) j["rank_of_expert"] = r.rank_of_expert;
  if (!r.rank_of_token.empty()) j["rank_of_token"] = r.rank_of_token;
  if (!r.probs.empty()) {
    const int E = int(r.probs.size()) / r.T();
    ordered_json probs = ordered_json::array();
    for (int t = 0; t < r.T(); ++t) {
      ordered_json row = ordered_json::array();
      for (int e = 0; e < E; ++e) row.push_back(json_number(r.probs[std::size_t(t) * E + e]));
      probs.push_back(std::move(row));
    }
    j["probs"] = std::move(probs);
  }
  // Pieces are the tokenizer's bytes: a piece that is not valid UTF-8 gets U+FFFD instead of failing the run.
  return j.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

TraceRecord parse_trace_line(const std::string& line, int fallback_experts, int fallback_hidden) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number too large for a double
    std::string what = e.what();  // "[json.exception.parse_error.101] parse error at line 1, column 12: ..."
    if (auto p = what.find("] "); what.rfind("[json.exception.", 0) == 0 && p != std::string::npos)
      what.erase(0, p + 2);
    fail("not valid JSON (", what, ")");
  }
  require(j.is_object(), "a trace line must be a JSON object");
  TraceRecord r;
  r.step = as_int(field(j, "step"), "step");
  r.layer = as_int(field(j, "layer"), "layer");
  r.tokens = int_array(field(j, "tokens"), "tokens", "tokens[]");
  const json& experts = field(j, "experts");
  const json& weights = field(j, "weights");
  require(experts.is_array() && weights.is_array(), "\"experts\" and \"weights\" must be arrays");
  const int T = int(r.tokens.size());
  require(int(experts.size()) == T && int(weights.size()) == T, "\"experts\" has ", experts.size(),
          " rows and \"weights\" ", weights.size(), ", but there are ", T, " tokens");
  if (auto it = j.find("pieces"); it != j.end()) {
    require(it->is_array(), "\"pieces\" must be an array of strings");
    for (const auto& p : *it) {
      require(p.is_string(), "\"pieces[]\" must be strings");
      r.pieces.push_back(p.get<std::string>());
    }
  }
  const int k = T ? int(experts[0].size()) : 0;
  r.routing.tokens = T;
  r.routing.k = k;
  int max_id = -1;
  for (int t = 0; t < T; ++t) {
    require(experts[t].is_array() && weights[t].is_array() && int(experts[t].size()) == k &&
                int(weights[t].size()) == k,
            "token ", t, ": \"experts\" and \"weights\" rows must all have k = ", k, " entries");
    for (int c = 0; c < k; ++c) {
      r.routing.ids.push_back(as_int(experts[t][c], "experts[][]"));
      r.routing.weights.push_back(as_float(weights[t][c], "weights[][]"));
      max_id = std::max(max_id, r.routing.ids.back());
    }
  }
  if (auto it = j.find("rank_of_expert"); it != j.end())
    r.rank_of_expert = int_array(*it, "rank_of_expert", "rank_of_expert[]");
  if (auto it = j.find("rank_of_token"); it != j.end())
    r.rank_of_token = int_array(*it, "rank_of_token", "rank_of_token[]");
  if (auto it = j.find("ep_size"); it != j.end()) r.ep_size = as_int(*it, "ep_size");
  // num_experts and hidden of 0 mean "not given", as when the field is absent (the writer leaves a 0 out), so a
  // line reads the same before and after a write.
  if (auto it = j.find("num_experts"); it != j.end()) r.num_experts = as_int(*it, "num_experts");
  if (r.num_experts == 0) {
    require(max_id < INT_MAX, "expert id ", max_id, " is out of range");
    if (!r.rank_of_expert.empty()) r.num_experts = int(r.rank_of_expert.size());
    else r.num_experts = fallback_experts > 0 ? fallback_experts : max_id + 1;
  }
  if (auto it = j.find("hidden"); it != j.end()) r.hidden = as_int(*it, "hidden");
  if (r.hidden == 0) r.hidden = fallback_hidden;
  if (auto it = j.find("probs"); it != j.end()) {
    require(it->is_array() && int(it->size()) == T, "\"probs\" must have one row per token");
    for (const auto& row : *it) {
      require(row.is_array() && int(row.size()) == r.num_experts, "\"probs\" rows must have ", r.num_experts,
              " entries");
      for (const auto& p : row) r.probs.push_back(as_float(p, "probs[][]"));
    }
  }
  check_trace_record(r);
  return r;
}

void read_trace_file(const std::string& path, const std::string& what,
                     const std::function<void(const TraceRecord&, int line)>& fn) {
  std::ifstream f(path);
  require(bool(f), what, " ", path, ": cannot open the file");
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    if (line.empty()) continue;
    TraceRecord r;
    try {
      r = parse_trace_line(line);
    } catch (const std::exception& e) {
      fail(what, " ", path, " line ", n, ": ", e.what());
    }
    fn(r, n);
  }
}

TraceWriter::~TraceWriter() {
  if (f_) std::fclose(f_);
}

void TraceWriter::open(const std::string& path, bool append) {
  if (f_) std::fclose(f_);
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  require(f_ != nullptr, "trace ", path, ": cannot open it for writing (", std::strerror(errno), ")");
  path_ = path;
  lines_ = 0;
}

void TraceWriter::write(const TraceRecord& r) {
  require(f_ != nullptr, "trace: write() before open()");
  std::string line;
  try {
    line = to_trace_line(r);
  } catch (const Error& e) {
    fail("trace ", path_, ": step ", r.step, ", layer ", r.layer, ": ", e.what());
  }
  line += '\n';
  require(std::fwrite(line.data(), 1, line.size(), f_) == line.size() && std::fflush(f_) == 0, "trace ", path_,
          ": write failed (", std::strerror(errno), ")");
  ++lines_;
}

}  // namespace eplab
