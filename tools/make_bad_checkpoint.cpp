// make_bad_checkpoint: copies a good (generated) checkpoint and breaks it in one named way, so the CLI
// tests can prove every loader check gives a one-line error instead of a crash.
//
//   make_bad_checkpoint --from build/test-models/small --kind overlap --out build/test-models/bad-overlap
//
// Kinds (the broken shard is the one holding layer 0, expert 0's w1):
//   truncated           the shard file cut to 60% of its length
//   lying-header        expert 0 w1's shape grows by one row; its data_offsets stay (byte count mismatch)
//   lying-offsets       expert 0 w1's data_offsets moved past the end of the data section
//   header-too-long     the 8-byte header length says more bytes than the file has
//   bad-json            the header bytes replaced by text that is not JSON
//   bad-dtype           expert 0 w1's dtype set to F64
//   overlap             expert 0 w3's data_offsets set to expert 0 w1's (two tensors share bytes)
//   missing-shard       the last shard named by the index deleted
//   wrong-expert-count  config.json says 8 experts (the tensors hold 16)
//   topk-too-big        config.json's num_experts_per_tok larger than num_local_experts
//   wrong-shape         expert 3's w2 stored transposed ([I, H] instead of [H, I])
//   too-many-layers     config.json says one layer more than the checkpoint holds
//   config-value        config.json's field KEY written as TEXT, byte for byte (--set KEY=TEXT, e.g.
//                       --set hidden_size=4096.5 or --set rope_theta=1E400): a value the loader must refuse
//                       and quote as written
//
// --metadata-only copies config.json and the index but no shard (enough for the config checks: chapter 00
// runs on metadata alone).
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/checkpoint.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"

namespace fs = std::filesystem;
using namespace eplab;

namespace {

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  require(bool(f), p.string(), ": cannot open");
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  require(bool(f), p.string(), ": write failed");
}

std::uint64_t header_len(const std::string& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint8_t(file[std::size_t(i)]);
  return n;
}

std::string u64_le(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[std::size_t(i)] = char((n >> (8 * i)) & 0xff);
  return s;
}

// Rewrites a shard's JSON header through `edit`, keeping the data section as it is.
template <typename Edit>
void edit_header(const fs::path& shard, Edit edit) {
  const std::string file = read_all(shard);
  const std::uint64_t n = header_len(file);
  nlohmann::json h = nlohmann::json::parse(file.substr(8, n));
  edit(h, file.size() - 8 - n);
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs += ' ';
  write_all(shard, u64_le(hs.size()) + hs + file.substr(8 + n));
}

void edit_config(const fs::path& dir, const char* key, int value) {
  nlohmann::json c = nlohmann::json::parse(read_all(dir / "config.json"));
  c[key] = value;
  write_all(dir / "config.json", c.dump(2) + "\n");
}

// Writes config.json's field `key` as `text` exactly (not through a JSON number, which would reformat it).
void edit_config_text(const fs::path& dir, const std::string& key, const std::string& text) {
  nlohmann::json c = nlohmann::json::parse(read_all(dir / "config.json"));
  const std::string mark = "@make_bad_checkpoint@";
  c[key] = mark;
  std::string s = c.dump(2) + "\n";
  const std::string quoted = "\"" + mark + "\"";
  s.replace(s.find(quoted), quoted.size(), text);
  write_all(dir / "config.json", s);
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    CLI::App app{"make_bad_checkpoint: copy a good checkpoint and break it in one way (for the CLI tests)"};
    std::string from, out, kind, set;
    bool metadata_only = false;
    const std::vector<std::string> kinds = {"truncated",    "lying-header",  "lying-offsets",      "header-too-long",
                                            "bad-json",     "bad-dtype",     "overlap",            "missing-shard",
                                            "wrong-expert-count", "topk-too-big", "wrong-shape", "too-many-layers",
                                            "config-value"};
    app.add_option("--from", from, "a good checkpoint directory (e.g. written by make_model)")->required();
    app.add_option("--out", out, "where to write the broken copy")->required();
    app.add_option("--kind", kind, "what to break")->required()->check(CLI::IsMember(kinds));
    app.add_option("--set", set, "for --kind config-value: KEY=TEXT, the field and its text as the file will hold it");
    app.add_flag("--metadata-only", metadata_only, "copy config.json and the index only, no shard");
    if (auto rc = parse_cli(app, argc, argv)) return *rc;
    require((kind == "config-value") == !set.empty(), "--set KEY=TEXT goes with --kind config-value (and only with it)");
    const std::size_t eq = set.find('=');
    require(set.empty() || (eq != std::string::npos && eq > 0), "--set: expected KEY=TEXT, got '", set, "'");

    // Load the good checkpoint first: it must itself be valid, or the test would prove nothing.
    const Checkpoint good = Checkpoint::open(from);
    good.validate_against_config();
    const ModelConfig& c = good.config();
    require(c.num_local_experts > 8, "--from model needs more than 8 experts (wrong-expert-count writes 8)");

    // Copy: config, index, shards. Earlier model files in --out are removed first.
    fs::create_directories(out);
    for (const auto& e : fs::directory_iterator(out)) {
      const std::string f = e.path().filename().string();
      if (f == "config.json" || (f.rfind("model", 0) == 0 && (f.ends_with(".safetensors") || f.ends_with(".json"))))
        fs::remove(e.path());
    }
    std::vector<std::string> files = metadata_only ? std::vector<std::string>{} : good.shard_files();
    files.push_back("config.json");
    if (fs::exists(fs::path(from) / "model.safetensors.index.json")) files.push_back("model.safetensors.index.json");
    for (const auto& f : files) fs::copy_file(fs::path(from) / f, fs::path(out) / f, fs::copy_options::overwrite_existing);

    // The shard holding layer 0, expert 0's w1 (found through the index, as the loader would).
    const std::string w1 = names::expert_w(0, 0, 1), w3 = names::expert_w(0, 0, 3);
    std::string target;
    {
      const nlohmann::json idx = nlohmann::json::parse(read_all(fs::path(out) / "model.safetensors.index.json"));
      target = idx.at("weight_map").at(w1).get<std::string>();
    }
    const fs::path shard = fs::path(out) / target;

    if (metadata_only)
      require(kind == "config-value" || kind == "too-many-layers" || kind == "wrong-expert-count" ||
                  kind == "topk-too-big",
              "--metadata-only goes with the kinds that edit config.json only");
    if (kind == "truncated") {
      fs::resize_file(shard, fs::file_size(shard) * 6 / 10);
    } else if (kind == "lying-header") {
      edit_header(shard, [&](nlohmann::json& h, std::uint64_t) { h[w1]["shape"][0] = h[w1]["shape"][0].get<int>() + 1; });
    } else if (kind == "lying-offsets") {
      edit_header(shard, [&](nlohmann::json& h, std::uint64_t data_size) {
        auto& off = h[w1]["data_offsets"];
        off[0] = off[0].get<std::uint64_t>() + data_size;
        off[1] = off[1].get<std::uint64_t>() + data_size;
      });
    } else if (kind == "header-too-long") {
      std::string file = read_all(shard);
      file.replace(0, 8, u64_le(file.size() + 4096));
      write_all(shard, file);
    } else if (kind == "bad-json") {
      std::string file = read_all(shard);
      const std::uint64_t n = header_len(file);
      const std::string junk = "{\"this is\": not json";
      require(n > junk.size(), "header too small to corrupt");
      file.replace(8, n, junk + std::string(n - junk.size(), ' '));
      write_all(shard, file);
    } else if (kind == "bad-dtype") {
      edit_header(shard, [&](nlohmann::json& h, std::uint64_t) { h[w1]["dtype"] = "F64"; });
    } else if (kind == "overlap") {
      edit_header(shard, [&](nlohmann::json& h, std::uint64_t) {
        require(h.contains(w3), "w1 and w3 of expert 0 are in different shards; cannot make an overlap");
        h[w3]["data_offsets"] = h[w1]["data_offsets"];
      });
    } else if (kind == "missing-shard") {
      fs::remove(fs::path(out) / good.shard_files().back());
    } else if (kind == "wrong-expert-count") {
      edit_config(out, "num_local_experts", 8);
    } else if (kind == "topk-too-big") {
      edit_config(out, "num_experts_per_tok", c.num_local_experts + 1);
    } else if (kind == "too-many-layers") {
      edit_config(out, "num_hidden_layers", c.num_hidden_layers + 1);
    } else if (kind == "config-value") {
      edit_config_text(out, set.substr(0, eq), set.substr(eq + 1));
    } else if (kind == "wrong-shape") {
      const std::string w2 = names::expert_w(0, 3, 2);
      const std::string f = nlohmann::json::parse(read_all(fs::path(out) / "model.safetensors.index.json"))
                                .at("weight_map").at(w2).get<std::string>();
      edit_header(fs::path(out) / f, [&](nlohmann::json& h, std::uint64_t) {
        auto& s = h[w2]["shape"];
        s = nlohmann::json::array({s[1], s[0]});
      });
    }
    std::printf("make_bad_checkpoint: %s -> %s (%s)\n", from.c_str(), out.c_str(), kind.c_str());
    return 0;
  });
}
