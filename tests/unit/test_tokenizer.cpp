// Tokenizer: our encode / decode against HF tokenizers on the fixture of scripts/hf_tokenizer_fixture.py
// (tests/data/tokenizer/: a small Llama/Phi-3 kind BPE with byte fallback and Phi-3's special tokens, in the
// legacy Prepend+Replace layout and in the Metaspace layout), the chat template, and the one-line errors.
// Every expected value comes from HF tokenizers (expected.json), not from this code.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "model/tokenizer.hpp"
#include "util/check.hpp"
#include "tmp_dir.hpp"

using namespace eplab;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kDir = std::string(EPLAB_TEST_DATA) + "/tokenizer";

const json& expected() {
  static const json j = [] {
    std::ifstream in(kDir + "/expected.json");
    REQUIRE_MESSAGE(in.good(), kDir, "/expected.json is missing: run scripts/hf_tokenizer_fixture.py");
    return json::parse(in);
  }();
  return j;
}

std::string show(const std::vector<int>& ids) {
  std::string s = "[";
  for (size_t k = 0; k < ids.size(); ++k) s += (k ? ", " : "") + std::to_string(ids[k]);
  return s + "]";
}

std::string error_of(const std::string& path) {
  try {
    Tokenizer::load(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

using testing::TmpDir;

}  // namespace

TEST_CASE("tokenizer: encode gives HF's ids and decode HF's text, both layouts") {
  const json& e = expected();
  for (const auto& [file, cases] : e.at("variants").items()) {
    const Tokenizer tok = Tokenizer::load(kDir + "/" + file);
    CHECK(tok.vocab_size() == e.at("vocab_size").get<int>());
    for (const json& c : cases) {
      const std::string text = c.at("text").get<std::string>();
      const auto want = c.at("ids").get<std::vector<int>>();
      const auto got = tok.encode(text);
      CHECK_MESSAGE(got == want, file, ": encode(", json(text).dump(), ") = ", show(got), ", HF: ", show(want));
      const auto got_bos = tok.encode(text, true);
      CHECK_MESSAGE(got_bos == c.at("ids_add_special").get<std::vector<int>>(), file, ": add_bos ", json(text).dump());
      const auto tokens = c.at("tokens").get<std::vector<std::string>>();
      // HF's Encoding.tokens shows an added token as the text it matched, whitespace eaten by lstrip/rstrip
      // included ("<|end|>\n"); piece() is the token itself.
      for (size_t k = 0; k < want.size() && k < tokens.size(); ++k) {
        if (tok.is_special(want[k]))
          CHECK_MESSAGE(tokens[k].find(tok.piece(want[k])) != std::string::npos, file, ": piece(", want[k], ")");
        else
          CHECK_MESSAGE(tok.piece(want[k]) == tokens[k], file, ": piece(", want[k], ")");
      }
      CHECK_MESSAGE(tok.decode(want) == c.at("decoded").get<std::string>(), file, ": decode of ", json(text).dump(),
                    " = ", json(tok.decode(want)).dump());
      CHECK_MESSAGE(tok.decode(want, false) == c.at("decoded_keep_special").get<std::string>(), file,
                    ": decode(keep special) of ", json(text).dump(), " = ", json(tok.decode(want, false)).dump());
    }
  }
}

TEST_CASE("tokenizer: special tokens, BOS/EOS, byte fallback pieces") {
  const json& e = expected();
  const Tokenizer tok = Tokenizer::load(kDir);  // a directory works too
  CHECK(tok.bos_id() == e.at("bos_id").get<int>());
  CHECK(tok.eos_id() == e.at("eos_id").get<int>());
  for (const auto& [name, id] : e.at("special_ids").items()) {
    CHECK_MESSAGE(tok.token_id(name) == id.get<int>(), name);
    CHECK(tok.piece(id.get<int>()) == name);
    CHECK(tok.is_special(id.get<int>()));
    CHECK(tok.encode(name) == std::vector<int>{id.get<int>()});  // never split
  }
  const int end = tok.token_id("<|end|>");
  const auto stops = tok.stop_ids();
  CHECK(std::find(stops.begin(), stops.end(), end) != stops.end());
  CHECK(std::find(stops.begin(), stops.end(), tok.eos_id()) != stops.end());
  CHECK(tok.token_id("<0x0A>") >= 0);
  CHECK_FALSE(tok.is_special(tok.token_id("<0x0A>")));
  CHECK(tok.piece(-1).empty());
  CHECK(tok.piece(tok.vocab_size()).empty());
  CHECK_THROWS_AS(tok.decode({tok.vocab_size()}), Error);
}

TEST_CASE("tokenizer: Phi-3.5 chat template, rendered and encoded as HF does") {
  const json& e = expected();
  const Tokenizer tok = Tokenizer::load(kDir + "/tokenizer.json");
  const Tokenizer meta = Tokenizer::load(kDir + "/tokenizer_metaspace.json");
  for (const json& c : e.at("chats")) {
    std::vector<ChatMessage> msgs;
    for (const json& m : c.at("messages")) msgs.push_back({m.at("role"), m.at("content")});
    const std::string text = tok.apply_chat_template(msgs, c.at("add_generation_prompt").get<bool>());
    CHECK(text == c.at("text").get<std::string>());
    CHECK_MESSAGE(tok.encode(text) == c.at("ids").get<std::vector<int>>(), json(text).dump());
    CHECK_MESSAGE(meta.encode(text) == c.at("ids_metaspace").get<std::vector<int>>(), json(text).dump());
  }
  CHECK(tok.apply_chat_template("What is the capital of France?") ==
        "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n");
  CHECK_THROWS_AS(tok.apply_chat_template({{"tool", "x"}}), Error);
}

TEST_CASE("tokenizer: bad files give one-line errors") {
  TmpDir d;
  std::string msg = error_of((d.path / "nope.json").string());
  CHECK(msg.find("nope.json") != std::string::npos);
  CHECK(msg.find("not found") != std::string::npos);
  CHECK(error_of(d.path.string()).find("tokenizer.json") != std::string::npos);  // a directory without one

  msg = error_of(d.write("bad.json", "{\"model\": {\"type\": \"BPE\", "));
  CHECK(msg.find("bad.json") != std::string::npos);
  CHECK(msg.find("invalid JSON") != std::string::npos);

  msg = error_of(d.write("wp.json", R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})"));
  CHECK(msg.find("WordPiece") != std::string::npos);
  CHECK(msg.find("not supported") != std::string::npos);

  msg = error_of(d.write("nofb.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})"));
  CHECK(msg.find("byte_fallback") != std::string::npos);

  // A real layout with a pre-tokenizer we do not implement (GPT-2's ByteLevel).
  json j;
  std::ifstream(kDir + "/tokenizer.json") >> j;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  msg = error_of(d.write("bl.json", j.dump()));
  CHECK(msg.find("ByteLevel") != std::string::npos);
  j["pre_tokenizer"] = nullptr;
  j["model"]["merges"].push_back(json::array({"zzzq", "qqqz"}));
  msg = error_of(d.write("merge.json", j.dump()));
  CHECK(msg.find("not in the vocab") != std::string::npos);
  CHECK(error_of(d.write("list.json", "[1, 2]")).find("no \"model\"") != std::string::npos);
  for (const std::string& m : {msg, error_of(d.write("list2.json", "[1, 2]"))})
    CHECK(m.find('\n') == std::string::npos);
}

// Files fuzz/tokenizer_load_fuzz.cpp runs (fuzz/regressions/tokenizer_load/ holds them): each used to hang, run
// out of memory, reach undefined behaviour or print a name with a line break; now each is refused at load with one
// line naming the field.
TEST_CASE("tokenizer: hostile files are refused at load, not when encoding") {
  TmpDir d;
  json base;
  std::ifstream(kDir + "/tokenizer.json") >> base;
  const auto refused = [&](const char* name, const json& j, const std::string& want) {
    const std::string msg = error_of(d.write(name, j.dump()));
    CHECK_MESSAGE(msg.find(want) != std::string::npos, name, ": '", msg, "', expected '", want, "'");
    CHECK(msg.find(name) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  };
  json j = base;  // id + 1 overflowed int
  j["model"]["vocab"]["zz"] = 2147483647;
  refused("vocab_int_max.json", j, "vocab id of \"zz\" must be an integer in [0, 1048576), got 2147483647");
  j = base;  // get<int>() of 1e300 is undefined behaviour
  j["model"]["vocab"]["zz"] = 1e300;
  refused("vocab_float.json", j, "vocab id of \"zz\" must be an integer");
  j = base;  // the id table would take 64 GB
  j["added_tokens"].push_back({{"id", 2000000000}, {"content", "<big>"}, {"special", true}});
  refused("added_huge.json", j, "added token id must be an integer in [0, 1048576), got 2000000000");
  j = base;  // an empty replacement never advances the word split: encode() hung
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", ""}, {"prepend_scheme", "always"}, {"split", true}};
  refused("metaspace_empty.json", j, "Metaspace replacement must be one character");
  j = base;  // Strip of "" 2^31 - 1 times per token: decode() hung
  j["decoder"] = {{"type", "Strip"}, {"content", ""}, {"start", 2147483647}, {"stop", 0}};
  refused("strip_empty.json", j, "Strip decoder content must be one character");
  j["decoder"] = {{"type", "Strip"}, {"content", " "}, {"start", -1}, {"stop", 0}};
  refused("strip_negative.json", j, "Strip decoder start must be an integer in [0, 2147483647), got -1");
  j = base;  // 16 Replace steps of a -> aaaa: 4^16 times the text
  const json a_to_aaaa = {{"type", "Replace"}, {"pattern", {{"String", "a"}}}, {"content", "aaaa"}};
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array()}};
  for (int i = 0; i < 16; ++i) j["normalizer"]["normalizers"].push_back(a_to_aaaa);
  refused("replace_blowup.json", j, "the normalizer's Replace steps can grow a text 4.29497e+09 times");
  j = base;
  j["decoder"] = {{"type", "Sequence"}, {"decoders", json::array()}};
  for (int i = 0; i < 4; ++i) j["decoder"]["decoders"].push_back(a_to_aaaa);
  refused("decoder_blowup.json", j, "the decoder's Replace steps can grow a text 256 times");
  j = base;  // a line break in a name from the file stays escaped: the error is one line
  j["model"]["merges"].push_back("a\nb c");
  refused("merge_newline.json", j, R"(merge 439 ("a\nb", "c") uses a token that is not in the vocab)");
  j = base;
  j["decoder"] = {{"type", "Odd\nDecoder"}};
  refused("decoder_newline.json", j, R"(decoder "Odd\nDecoder" is not supported)");
}
