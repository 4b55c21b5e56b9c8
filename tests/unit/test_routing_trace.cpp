// The routing trace (common/moe/routing_trace.hpp): what TraceWriter writes, parse_trace_line reads back
// exactly (ids, ranks, pieces, and multipliers and probabilities bit for bit, in their shortest decimals);
// lines of the format's README example and of the visualizer's tests still parse; every bad line and every
// bad record gives one line naming what is wrong.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <random>
#include <string>

#include "moe/routing_trace.hpp"
#include "tmp_dir.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

std::uint32_t bits(float v) { return std::bit_cast<std::uint32_t>(v); }

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (bits(a[i]) != bits(b[i])) return false;
  return true;
}

void check_same(const TraceRecord& a, const TraceRecord& b) {
  CHECK(a.step == b.step);
  CHECK(a.layer == b.layer);
  CHECK(a.ep_size == b.ep_size);
  CHECK(a.num_experts == b.num_experts);
  CHECK(a.hidden == b.hidden);
  CHECK(a.tokens == b.tokens);
  CHECK(a.pieces == b.pieces);
  CHECK(a.routing.tokens == b.routing.tokens);
  CHECK(a.routing.k == b.routing.k);
  CHECK(a.routing.ids == b.routing.ids);
  CHECK(same_floats(a.routing.weights, b.routing.weights));
  CHECK(a.rank_of_expert == b.rank_of_expert);
  CHECK(a.rank_of_token == b.rank_of_token);
  CHECK(same_floats(a.probs, b.probs));
}

// 3 tokens, top-2 of 4 experts on 2 ranks, every optional field set.
TraceRecord full_record() {
  TraceRecord r;
  r.step = 7;
  r.layer = 3;
  r.ep_size = 2;
  r.num_experts = 4;
  r.hidden = 4096;
  r.tokens = {1, 450, 32007};
  r.pieces = {"<s>", "\xE2\x96\x81The", "<|end|>"};  // "▁The": UTF-8 survives
  r.routing.tokens = 3;
  r.routing.k = 2;
  r.routing.ids = {2, 0, 3, 1, 0, 2};
  r.routing.weights = {0.71f, 1.0f, 1.0f / 3.0f, 1e-8f, std::nextafter(0.5f, 1.0f), 0.0f};
  r.rank_of_expert = {0, 0, 1, 1};
  r.rank_of_token = {0, 0, 1};
  for (int i = 0; i < 12; ++i) r.probs.push_back(float(i + 1) / 78.0f);
  return r;
}

TraceRecord minimal_record() {  // only the required fields
  TraceRecord r;
  r.tokens = {5, 6};
  r.routing.tokens = 2;
  r.routing.k = 2;
  r.routing.ids = {0, 1, 2, 3};
  r.routing.weights = {0.5f, 0.25f, 1.0f, 0.125f};
  return r;
}

// The eplab::Error message of what f() throws, "" when it throws nothing.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
std::string error_of_line(const std::string& line) { return error_of([&] { parse_trace_line(line, 16, 64); }); }
std::string error_of_record(const TraceRecord& r) { return error_of([&] { to_trace_line(r); }); }

using testing::TmpDir;

}  // namespace

TEST_CASE("routing trace: TraceWriter -> parse_trace_line gives the records back exactly") {
  TmpDir tmp;
  const std::string path = tmp.file("run.jsonl");
  TraceRecord full = full_record(), minimal = minimal_record();
  {
    TraceWriter w;
    w.open(path);
    w.write(full);
    w.write(minimal);
    CHECK(w.lines() == 2);
  }
  std::ifstream in(path);
  std::string l1, l2, rest;
  REQUIRE(std::getline(in, l1));
  REQUIRE(std::getline(in, l2));
  CHECK_FALSE(std::getline(in, rest));
  check_same(parse_trace_line(l1), full);
  // The minimal line says nothing of E or hidden: the reader takes the fallbacks (the loaded model's).
  const TraceRecord m = parse_trace_line(l2, 16, 64);
  minimal.num_experts = 16;
  minimal.hidden = 64;
  check_same(m, minimal);
  CHECK(parse_trace_line(l2).num_experts == 4);  // no fallback either: the largest id + 1

  // Appending keeps what is there.
  {
    TraceWriter w;
    w.open(path, /*append=*/true);
    w.write(full);
  }
  std::ifstream again(path);
  int n = 0;
  for (std::string line; std::getline(again, line);) ++n;
  CHECK(n == 3);
}

TEST_CASE("routing trace: multipliers are written as their shortest decimals, fields in the README's order") {
  TraceRecord r = minimal_record();
  r.routing.weights = {0.71f, 1.0f, 0.64f, 0.1f};
  const std::string line = to_trace_line(r);
  CHECK(line == R"({"step":0,"layer":0,"tokens":[5,6],"experts":[[0,1],[2,3]],"weights":[[0.71,1.0],[0.64,0.1]]})");
  CHECK(line.find('\n') == std::string::npos);
}

TEST_CASE("routing trace: any finite float survives the text bit for bit") {
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  TraceRecord r = minimal_record();
  r.routing.tokens = 2000;
  r.routing.k = 2;
  r.tokens.assign(2000, 0);
  r.routing.ids.assign(4000, 0);
  r.routing.weights.clear();
  while (r.routing.weights.size() < 4000) {
    float v = r.routing.weights.size() % 2 ? unit(rng) : std::bit_cast<float>(any_bits(rng));
    if (std::isfinite(v)) r.routing.weights.push_back(v);
  }
  r.routing.weights[0] = std::numeric_limits<float>::denorm_min();
  r.routing.weights[1] = std::numeric_limits<float>::max();
  r.routing.weights[2] = -0.0f;
  const TraceRecord back = parse_trace_line(to_trace_line(r));
  CHECK(same_floats(back.routing.weights, r.routing.weights));
}

TEST_CASE("routing trace: lines of the README example and of the visualizer tests parse") {
  const TraceRecord readme = parse_trace_line(
      R"({"step":0,"layer":3,"ep_size":4,"num_experts":16,"hidden":4096,"tokens":[450,4996,17354],)"
      R"("pieces":["▁The","▁quick","▁brown"],"experts":[[5,12],[0,7],[5,9]],"weights":[[0.71,0.64],[1.0,0.52],)"
      R"([0.9,0.88]],"rank_of_expert":[0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3],"rank_of_token":[0,1,2]})");
  CHECK(readme.T() == 3);
  CHECK(readme.routing.k == 2);
  CHECK(readme.routing.id(2, 1) == 9);
  CHECK(readme.routing.weight(0, 0) == 0.71f);
  CHECK(readme.pieces[0] == "\xE2\x96\x81The");
  CHECK(readme.rank_of_expert[15] == 3);
  // keys in any order, integer multipliers, no num_experts: E from rank_of_expert
  const TraceRecord good = parse_trace_line(
      R"({"step":0,"layer":0,"tokens":[1,2],"pieces":["a","b"],"experts":[[0,1],[2,3]],"weights":[[1,0.5],[1,1]],)"
      R"("rank_of_expert":[0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3],"ep_size":4})");
  CHECK(good.num_experts == 16);
  CHECK(good.routing.weights == std::vector<float>{1.f, 0.5f, 1.f, 1.f});
}

TEST_CASE("routing trace: a bad line gives one line naming what is wrong") {
  const std::string base = R"("step":0,"layer":0,"tokens":[1,2],"experts":[[0,1],[2,3]],"weights":[[1,0.5],[1,1]])";
  const struct {
    std::string line, want;
  } cases[] = {
      {R"({"step": 1, this is not json)", "not valid JSON (parse error"},
      {"[1, 2]", "must be a JSON object"},
      {R"({"layer":0,"tokens":[],"experts":[],"weights":[]})", "missing field \"step\""},
      {R"({"step":0.5,"layer":0,"tokens":[],"experts":[],"weights":[]})", "\"step\" must be an integer"},
      {R"({"step":0,"layer":-1,"tokens":[],"experts":[],"weights":[]})", "\"layer\" must be >= 0"},
      {R"({"step":0,"layer":0,"tokens":[1],"experts":[],"weights":[]})", "\"experts\" has 0 rows"},
      {R"({"step":0,"layer":0,"tokens":[1,2],"experts":[[0,1],[2]],"weights":[[1,1],[1]]})",
       "token 1: \"experts\" and \"weights\" rows must all have k = 2"},
      {R"({"step":0,"layer":0,"tokens":[1],"experts":[[0,99]],"weights":[[1,1]]})", "expert id 99, but the run has 16"},
      {R"({"step":0,"layer":0,"tokens":[1],"experts":[[-1,0]],"weights":[[1,1]]})", "expert id -1 is negative"},
      {R"({"step":0,"layer":0,"tokens":[1],"experts":[[0,1]],"weights":[["a",1]]})", "\"weights[][]\" must be numbers"},
      {R"({"step":0,"layer":0,"tokens":[1],"experts":[[0,1]],"weights":[[1e300,1]]})", "not a finite number"},
      {"{" + base + R"(,"pieces":["a"]})", "\"pieces\" has 1 entries for 2 tokens"},
      {"{" + base + R"(,"rank_of_expert":[0,0,1,1]})", "\"ep_size\" must be given"},
      {"{" + base + R"(,"rank_of_expert":[0,0,1,2],"ep_size":2})", "\"rank_of_expert\" names rank 2 but ep_size is 2"},
      {"{" + base + R"(,"num_experts":4,"rank_of_expert":[0,1],"ep_size":2})", "\"rank_of_expert\" has 2 entries"},
      {"{" + base + R"(,"rank_of_token":[0,5],"ep_size":2})", "\"rank_of_token\" names rank 5"},
      {"{" + base + R"(,"num_experts":4,"probs":[[1,0,0,0],[1,0,0]]})", "\"probs\" rows must have 4 entries"},
      {"{" + base + R"(,"step":99999999999})", "\"step\" is out of range"},
  };
  for (const auto& c : cases) {
    const std::string err = error_of_line(c.line);
    CHECK_MESSAGE(err.find(c.want) != std::string::npos, c.line, " -> '", err, "', expected '", c.want, "'");
    CHECK_MESSAGE(err.find('\n') == std::string::npos, c.line, " -> a multi-line error: ", err);
  }
}

// Inputs fuzz/trace_line_fuzz.cpp found (fuzz/regressions/trace_line/ holds them as files).
TEST_CASE("routing trace: lines the fuzzer found") {
  // A number too large for a double: nlohmann throws out_of_range, not parse_error; still one line.
  const std::string overflow = error_of_line(R"({"s":[6666666666666666666666666666666666E66666666666]})");
  CHECK(overflow.find("not valid JSON (number overflow") == 0);
  CHECK(overflow.find("[json.exception") == std::string::npos);
  // The largest int as an expert id: E = id + 1 overflowed (undefined behaviour); now an error.
  const std::string int_max = R"({"step":0,"layer":0,"tokens":[1],"experts":[[2147483647]],"weights":[[1]]})";
  CHECK(error_of([&] { parse_trace_line(int_max); }).find("expert id 2147483647 is out of range") != std::string::npos);
  // "num_experts": 0 and "hidden": 0 mean "not given", like the writer's omitted fields: the line reads the same
  // before and after a write.
  const std::string zeros =
      R"({"step":0,"layer":0,"num_experts":0,"hidden":0,"tokens":[1],"experts":[[3]],"weights":[[1]]})";
  const TraceRecord r = parse_trace_line(zeros, 16, 64);
  CHECK(r.num_experts == 16);
  CHECK(r.hidden == 64);
  check_same(parse_trace_line(to_trace_line(r), 16, 64), r);
  CHECK(parse_trace_line(zeros).num_experts == 4);  // no fallback: the largest id + 1
}

TEST_CASE("routing trace: the writer refuses what the reader would refuse, naming file, step and layer") {
  TraceRecord r = full_record();
  r.routing.weights[1] = std::nanf("");
  CHECK(error_of_record(r).find("token 0: multiplier nan is not a finite number") != std::string::npos);
  r = full_record();
  r.routing.ids[5] = 4;
  CHECK(error_of_record(r).find("token 2: expert id 4, but the run has 4 experts") != std::string::npos);
  r = full_record();
  r.tokens.pop_back();
  CHECK(error_of_record(r).find("\"tokens\" has 2 entries but the routing has 3 tokens") != std::string::npos);
  r = full_record();
  r.probs.pop_back();
  CHECK(error_of_record(r).find("\"probs\" has 11 entries for 3 tokens x 4 experts") != std::string::npos);
  r = full_record();
  r.routing.weights.pop_back();
  CHECK(error_of_record(r).find("the routing has 6 expert ids and 5 multipliers for 3 tokens x k = 2") !=
        std::string::npos);

  TmpDir tmp;
  const std::string path = tmp.file("t.jsonl");
  TraceWriter w;
  w.open(path);
  r = full_record();
  r.rank_of_expert[0] = 9;
  const std::string refused = error_of([&] { w.write(r); });
  CHECK(refused.find("trace " + path + ": step 7, layer 3: \"rank_of_expert\" names rank 9") == 0);
  w.write(full_record());
  CHECK(w.lines() == 1);
  std::ifstream in(path);
  std::string line;
  REQUIRE(std::getline(in, line));
  check_same(parse_trace_line(line), full_record());  // nothing of the refused record in the file

  TraceWriter nowhere;
  const std::string missing = tmp.file("no/such/dir/t.jsonl");
  CHECK(error_of([&] { nowhere.open(missing); }) ==
        "trace " + missing + ": cannot open it for writing (No such file or directory)");
  CHECK_FALSE(nowhere.active());
}
