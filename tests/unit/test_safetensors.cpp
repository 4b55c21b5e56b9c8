// safetensors: writer/reader round trips, a hand-built file read by the reader, and one test per
// validation rule (each must throw eplab::Error naming the file and, where there is one, the tensor).
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/safetensors.hpp"
#include "util/check.hpp"
#include "tmp_dir.hpp"

using namespace eplab;
namespace fs = std::filesystem;

namespace {

using testing::TmpDir;

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file built by hand (independent of SafetensorsWriter).
void write_raw(const std::string& path, const std::string& header, const std::string& data,
               std::uint64_t claimed_len = UINT64_MAX) {
  std::ofstream f(path, std::ios::binary);
  f << le64(claimed_len == UINT64_MAX ? header.size() : claimed_len) << header << data;
}

// The error message of open(path), or "" when it opened.
std::string open_error(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

template <typename T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

}  // namespace

TEST_CASE("safetensors: writer -> reader round trip (BF16, F16, F32, metadata)") {
  TmpDir d;
  const std::vector<std::uint16_t> a = {0x3f80, 0xbf80, 0x4000, 0x0000, 0x7f80, 0x3e80};  // bf16 bits
  const std::vector<std::uint16_t> b = {0x3c00, 0xc000, 0x0001};                          // f16 bits
  const std::vector<float> c = {1.5f, -2.25f, 3e-3f, 1e20f};
  SafetensorsWriter w;
  w.add("layer.a", Dtype::BF16, {2, 3}, as_bytes_of(a));
  w.add("b", Dtype::F16, {3}, as_bytes_of(b));
  w.add("c.weight", Dtype::F32, {2, 1, 2}, as_bytes_of(c));
  w.add("empty", Dtype::F32, {0, 4}, {});
  w.set_metadata("format", "pt");
  CHECK(w.data_bytes() == 12 + 6 + 16);
  const std::string path = d.file("x.safetensors");
  w.write(path);

  // The file layout, read by hand: 8-byte length, JSON header, data section 8-byte aligned.
  std::ifstream raw(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(raw)), std::istreambuf_iterator<char>());
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint8_t(bytes[i]);
  CHECK((8 + n) % 8 == 0);
  CHECK(bytes.size() == 8 + n + 34);
  const auto h = nlohmann::json::parse(bytes.substr(8, n));
  CHECK(h["__metadata__"]["format"] == "pt");
  CHECK(h["layer.a"]["dtype"] == "BF16");
  CHECK(h["c.weight"]["shape"] == nlohmann::json::array({2, 1, 2}));
  const auto off = h["c.weight"]["data_offsets"];
  CHECK(off[1].get<int>() - off[0].get<int>() == 16);
  CHECK(std::memcmp(bytes.data() + 8 + n + off[0].get<int>(), c.data(), 16) == 0);

  const SafetensorsFile f = SafetensorsFile::open(path);
  CHECK(f.tensors().size() == 4);
  CHECK(f.metadata().at("format") == "pt");
  const TensorInfo* ta = f.find("layer.a");
  REQUIRE(ta);
  CHECK(ta->dtype == Dtype::BF16);
  CHECK(ta->shape == std::vector<std::int64_t>{2, 3});
  CHECK(ta->numel() == 6);
  CHECK(ta->shape_str() == "[2, 3]");
  auto sa = f.bytes(*ta);
  REQUIRE(sa.size() == 12);
  CHECK(std::memcmp(sa.data(), a.data(), 12) == 0);
  auto sb = f.bytes(*f.find("b"));
  CHECK(std::memcmp(sb.data(), b.data(), 6) == 0);
  CHECK(f.find("c.weight")->dtype == Dtype::F32);
  CHECK(f.find("empty")->numel() == 0);
  CHECK(f.bytes(*f.find("empty")).size() == 0);
  CHECK(f.find("nope") == nullptr);
}

TEST_CASE("safetensors: a hand-built file reads back; moving the reader keeps the mapping") {
  TmpDir d;
  const std::string path = d.file("hand.safetensors");
  float v[3] = {1.f, 2.f, -4.f};
  std::string data(reinterpret_cast<const char*>(v), 12);
  data += std::string(4, '\x11');  // scalar F32 at [12, 16)
  write_raw(path,
            R"({"v":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
            R"("s":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}   )",
            data);
  SafetensorsFile f = SafetensorsFile::open(path);
  SafetensorsFile g = std::move(f);
  auto s = g.bytes(*g.find("v"));
  float back[3];
  std::memcpy(back, s.data(), 12);
  CHECK(back[0] == 1.f);
  CHECK(back[2] == -4.f);
  CHECK(g.find("s")->numel() == 1);
  CHECK(g.find("s")->shape_str() == "[]");
  CHECK(dtype_size(Dtype::BF16) == 2);
  CHECK(dtype_size(Dtype::F16) == 2);
  CHECK(dtype_size(Dtype::F32) == 4);
  CHECK(std::string(dtype_name(Dtype::F16)) == "F16");
}

TEST_CASE("safetensors: every validation rule gives an error naming the file and the tensor") {
  TmpDir d;
  const std::string p = d.file("bad.safetensors");
  const std::string data16(16, '\0');
  // {"e1", "e2", ...} -> "{e1,e2,...}" (appends, which also keeps GCC 12's -Wrestrict false positive away)
  auto obj = [](std::initializer_list<std::string> entries) {
    std::string out = "{";
    for (const auto& e : entries) {
      if (out.size() > 1) out += ',';
      out += e;
    }
    return out + "}";
  };
  auto entry = [](const char* name, const char* dtype, const char* shape, const char* off) {
    std::string e = "\"";
    e += name;
    e += "\":{\"dtype\":\"";
    e += dtype;
    e += "\",\"shape\":";
    e += shape;
    e += ",\"data_offsets\":";
    e += off;
    e += "}";
    return e;
  };

  SUBCASE("missing file") {
    CHECK(open_error(d.file("nope.safetensors")).find("nope.safetensors: cannot open") != std::string::npos);
  }
  SUBCASE("shorter than 8 bytes") {
    std::ofstream(p, std::ios::binary) << "abc";
    const auto e = open_error(p);
    CHECK(e.find(p) != std::string::npos);
    CHECK(e.find("shorter than the 8-byte") != std::string::npos);
  }
  SUBCASE("header length past the end of the file") {
    write_raw(p, "{}", data16, 1000);
    CHECK(open_error(p).find("header length 1000 runs past the end of the file") != std::string::npos);
  }
  SUBCASE("header length above the sanity cap (sparse 200 MB file)") {
    write_raw(p, "{}", "", 150ull << 20);
    fs::resize_file(p, 200ull << 20);
    CHECK(open_error(p).find("exceeds the 100 MB sanity limit") != std::string::npos);
  }
  SUBCASE("header not JSON") {
    write_raw(p, "{\"a\": nope}", data16);
    const auto e = open_error(p);
    CHECK(e.find(p + ": header is not valid JSON") != std::string::npos);
    CHECK(e.find('\n') == std::string::npos);
  }
  SUBCASE("header JSON but not an object") {
    write_raw(p, "[1, 2, 3]", data16);
    CHECK(open_error(p).find("header is a JSON array, expected an object") != std::string::npos);
  }
  SUBCASE("unknown dtype") {
    write_raw(p, obj({entry("w", "I64", "[2]", "[0,16]")}), data16);
    const auto e = open_error(p);
    CHECK(e.find(p + ": tensor 'w'") != std::string::npos);
    CHECK(e.find("unsupported dtype 'I64'") != std::string::npos);
  }
  SUBCASE("negative dimension") {
    write_raw(p, obj({entry("w", "F32", "[-4]", "[0,16]")}), data16);
    CHECK(open_error(p).find("tensor 'w': shape has a negative") != std::string::npos);
  }
  SUBCASE("byte range is not shape x dtype size") {
    write_raw(p, obj({entry("w", "F32", "[3]", "[0,16]")}), data16);
    const auto e = open_error(p);
    CHECK(e.find("tensor 'w'") != std::string::npos);
    CHECK(e.find("hold 16 bytes but shape [3] x F32 needs 12") != std::string::npos);
  }
  SUBCASE("overflowing shape does not wrap around") {
    write_raw(p, obj({entry("w", "F32", "[4294967296, 4294967296]", "[0,16]")}), data16);
    CHECK(open_error(p).find("tensor 'w'") != std::string::npos);
  }
  SUBCASE("range past the data section") {
    write_raw(p, obj({entry("w", "F32", "[4]", "[8,24]")}), data16);
    const auto e = open_error(p);
    CHECK(e.find("tensor 'w'") != std::string::npos);
    CHECK(e.find("run past the data section (16 bytes)") != std::string::npos);
  }
  SUBCASE("begin after end") {
    write_raw(p, obj({entry("w", "F32", "[0]", "[8,4]")}), data16);
    CHECK(open_error(p).find("has begin > end") != std::string::npos);
  }
  SUBCASE("malformed data_offsets") {
    write_raw(p, obj({entry("w", "F32", "[4]", "[0]")}), data16);
    CHECK(open_error(p).find("tensor 'w': 'data_offsets' must be an array") != std::string::npos);
  }
  SUBCASE("missing dtype") {
    write_raw(p, R"({"w":{"shape":[4],"data_offsets":[0,16]}})", data16);
    CHECK(open_error(p).find("tensor 'w': missing or non-string 'dtype'") != std::string::npos);
  }
  SUBCASE("overlapping tensors") {
    write_raw(p, obj({entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[4,12]")}), data16);
    const auto e = open_error(p);
    CHECK(e.find("tensor 'b'") != std::string::npos);
    CHECK(e.find("overlap tensor 'a'") != std::string::npos);
  }
  SUBCASE("identical ranges overlap too") {
    write_raw(p, obj({entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[0,8]")}), data16);
    CHECK(open_error(p).find("overlap") != std::string::npos);
  }
  SUBCASE("metadata not an object of strings") {
    write_raw(p, R"({"__metadata__":{"format":3}})", data16);
    CHECK(open_error(p).find("__metadata__ entry 'format' is not a string") != std::string::npos);
  }
  SUBCASE("adjacent tensors and an empty one inside another's range are fine") {
    write_raw(p,
              obj({entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[8,16]"), entry("z", "F32", "[0]", "[4,4]")}),
              data16);
    CHECK(open_error(p).empty());
  }
}

TEST_CASE("safetensors writer: rejects wrong byte counts and duplicate names") {
  SafetensorsWriter w;
  const std::vector<float> v = {1, 2, 3};
  CHECK_THROWS_AS(w.add("x", Dtype::F32, {4}, as_bytes_of(v)), Error);
  w.add("x", Dtype::F32, {3}, as_bytes_of(v));
  CHECK_THROWS_AS(w.add("x", Dtype::F32, {3}, as_bytes_of(v)), Error);
  CHECK_THROWS_AS(w.add("__metadata__", Dtype::F32, {3}, as_bytes_of(v)), Error);
  CHECK_THROWS_AS(w.write("/nonexistent-dir/x.safetensors"), Error);
}
