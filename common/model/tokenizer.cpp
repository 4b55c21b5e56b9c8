// HF tokenizer.json (Llama / Phi-3 SentencePiece-BPE with byte fallback): reading, encoding, decoding.
// The order of steps and the BPE merge loop follow HF tokenizers (see tokenizer.hpp); every choice that exists
// only to give HF's exact ids is marked "HF:".
#include "model/tokenizer.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "util/check.hpp"

namespace eplab {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- UTF-8 helpers ---------------------------------------------------------------------------------------------

// Length of the (valid) UTF-8 sequence starting at s[i]; 1 for a byte that does not start one, so invalid input
// still advances (such a byte is not in the vocab and goes to byte fallback).
size_t utf8_len(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}

char32_t utf8_decode(const std::string& s, size_t i, size_t n) {
  const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k])); };
  if (n == 1) return b(0);
  if (n == 2) return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
  if (n == 3) return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
  return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
}

// Strict UTF-8 validity (no overlong forms, no surrogates, <= U+10FFFF), as Rust's String::from_utf8.
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    const char32_t cp = utf8_decode(s, i, n);
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n;
  }
  return true;
}

// Rust's char::is_whitespace (Unicode White_Space): what lstrip / rstrip of an added token eat.
bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// single_word: a "word" character (ASCII letters, digits, '_'; every non-ASCII code point counts as a letter,
// a simplification of Rust's char::is_alphanumeric that Phi-3's tokens, none single_word, never reach).
bool is_word_char(char32_t c) {
  return c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  out.append(s, pos);
  s = std::move(out);
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// ---- pipeline pieces -------------------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  int id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false;
};

struct NormStep {  // Prepend(text) or Replace(from -> to)
  bool prepend = false;
  std::string a, b;
};

enum class Prepend { Always, First, Never };

struct Metaspace {
  std::string replacement = "\xE2\x96\x81";  // U+2581 "▁"
  Prepend scheme = Prepend::Always;
  bool split = true;
};

struct DecodeStep {
  enum Kind { Replace, ByteFallback, Fuse, Strip, MetaspaceDec } kind;
  std::string a, b;  // Replace: from, to; Strip: the content char; Metaspace: replacement
  int start = 0, stop = 0;
  Prepend scheme = Prepend::Always;
};

// A string from the file (or from the text being encoded) as a JSON string literal: quoted, with control characters
// escaped and bytes that are not UTF-8 replaced, so an error message stays on one line. (Not named "quoted": for a
// non-const string, argument-dependent lookup prefers std::quoted, which escapes nothing but quotes.)
std::string escaped(const std::string& s) { return json(s).dump(-1, ' ', false, json::error_handler_t::replace); }

Prepend parse_scheme(const json& j, const std::string& where) {
  if (j.contains("prepend_scheme")) {
    const std::string s = j.at("prepend_scheme").get<std::string>();
    if (s == "always") return Prepend::Always;
    if (s == "first") return Prepend::First;
    if (s == "never") return Prepend::Never;
    fail(where, ": Metaspace prepend_scheme ", escaped(s), " is not always|first|never");
  }
  // Files from tokenizers < 0.14 have add_prefix_space instead.
  return j.value("add_prefix_space", true) ? Prepend::Always : Prepend::Never;
}

std::string string_pattern(const json& j, const std::string& where, const char* what) {
  const json& p = j.at("pattern");
  if (p.is_object() && p.contains("String")) return p.at("String").get<std::string>();
  fail(where, ": ", what, " with a ", p.dump(), " pattern is not supported (only {\"String\": ...} patterns)");
}

// Token ids and decoder counts are integers that fit: nlohmann's get<int>() truncates a fraction, wraps a large
// integer and is undefined for a float beyond int's range. The largest real vocabularies hold ~256k tokens; an id
// past 2^20 is a corrupt file (and would make the id table allocate gigabytes).
constexpr std::int64_t kMaxTokenId = std::int64_t(1) << 20;
int checked_int(const json& v, std::int64_t lo, std::int64_t hi, const std::string& where, const std::string& what) {
  require(v.is_number_integer() && v.get<std::int64_t>() >= lo && v.get<std::int64_t>() < hi &&
              (!v.is_number_unsigned() || v.get<std::uint64_t>() < std::uint64_t(hi)),
          where, ": ", what, " must be an integer in [", lo, ", ", hi, "), got ", v.dump());
  return static_cast<int>(v.get<std::int64_t>());
}
int file_token_id(const json& v, const std::string& where, const std::string& what) {
  return checked_int(v, 0, kMaxTokenId, where, what);
}
// How many times replacing `from` by `to` everywhere can grow a text, at most.
double replace_growth(const std::string& from, const std::string& to) {
  return from.empty() || to.size() <= from.size() ? 1.0 : double(to.size()) / double(from.size());
}
constexpr double kMaxReplaceGrowth = 64;  // Phi-3's normalizer: 3 (" " -> "▁")

// HF: Metaspace's replacement and Strip's content are one character (a Rust char); empty, they never advance.
std::string one_char(const json& v, const std::string& where, const char* what) {
  const std::string c = v.get<std::string>();
  require(!c.empty(), where, ": ", what, " must be one character, got \"\"");
  return c;
}

}  // namespace

// ---- the tokenizer ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string path;
  std::unordered_map<std::string, int> vocab;  // model vocab
  std::vector<std::string> id_to_token;        // model vocab and added tokens
  std::vector<char> special;                   // per id
  struct MergeInfo {
    int rank, new_id;
  };
  std::unordered_map<std::uint64_t, MergeInfo> merges;  // key: (left id << 32) | right id
  int unk_id = -1;
  bool fuse_unk = false, ignore_merges = false;
  int byte_ids[256];

  std::vector<AddedToken> added;  // sorted longest first, for leftmost-longest matching
  std::unordered_map<std::string, int> added_ids;
  std::vector<NormStep> normalizer;
  bool has_metaspace = false;
  Metaspace metaspace;
  std::vector<DecodeStep> decoder;
  bool has_decoder = false;
  // How many times the normalizer's and the decoder's Replace steps can grow a text, at most (bounded at load:
  // Replace steps that feed each other would otherwise grow a prompt without limit).
  double normalizer_growth = 1, decoder_growth = 1;
  int bos = -1, eos = -1;

  static std::uint64_t key(int a, int b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  void load_model(const json& m);
  void load_added(const json& a);
  void load_normalizer(const json& n);
  void load_pre_tokenizer(const json& p);
  void load_decoder_step(const json& d);
  void load_names(const fs::path& file, const json& root);

  void bpe(const std::string& word, std::vector<int>& out) const;
  void encode_segment(const std::string& seg, size_t offset, std::vector<int>& out) const;
};

void Tokenizer::Impl::load_model(const json& m) {
  const std::string type = m.value("type", std::string("BPE"));
  require(type == "BPE", path, ": tokenizer model type ", escaped(type),
          " is not supported (EP Lab reads Llama/Phi-3 style BPE with byte_fallback only)");
  require(m.value("byte_fallback", false), path,
          ": BPE without \"byte_fallback\": true is not supported (Llama/Phi-3 tokenizers have it)");
  for (const char* k : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
    require(!m.contains(k) || m.at(k).is_null(), path, ": BPE with \"", k, "\" set is not supported");
  require(m.contains("vocab") && m.at("vocab").is_object(), path, ": model.vocab is missing");
  require(m.contains("merges") && m.at("merges").is_array(), path, ": model.merges is missing");
  fuse_unk = m.value("fuse_unk", false);
  ignore_merges = m.value("ignore_merges", false);

  for (const auto& [tok, id] : m.at("vocab").items()) {
    const int i = file_token_id(id, path, "vocab id of " + escaped(tok));
    vocab[tok] = i;
    if (static_cast<size_t>(i) >= id_to_token.size()) id_to_token.resize(i + 1);
    id_to_token[i] = tok;
  }
  if (m.contains("unk_token") && !m.at("unk_token").is_null()) {
    const auto it = vocab.find(m.at("unk_token").get<std::string>());
    require(it != vocab.end(), path, ": unk_token is not in the vocab");
    unk_id = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const auto it = vocab.find(name);
    byte_ids[b] = it == vocab.end() ? -1 : it->second;
  }

  const json& ms = m.at("merges");
  merges.reserve(ms.size());
  for (size_t r = 0; r < ms.size(); ++r) {
    std::string a, b;
    if (ms[r].is_string()) {  // older files: "a b"
      const std::string s = ms[r].get<std::string>();
      const size_t sp = s.find(' ');
      require(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, path, ": merge ", r, " ", escaped(s),
              " is not two tokens separated by one space");
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else {  // tokenizers >= 0.20: ["a", "b"]
      require(ms[r].is_array() && ms[r].size() == 2, path, ": merge ", r, " is not a pair");
      a = ms[r][0].get<std::string>(), b = ms[r][1].get<std::string>();
    }
    const auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
    require(ia != vocab.end() && ib != vocab.end() && iab != vocab.end(), path, ": merge ", r, " (", escaped(a), ", ",
            escaped(b), ") uses a token that is not in the vocab");
    merges.emplace(key(ia->second, ib->second), MergeInfo{static_cast<int>(r), iab->second});  // HF: first wins
  }
}

void Tokenizer::Impl::load_added(const json& a) {
  for (const json& t : a) {
    AddedToken tok;
    tok.content = t.at("content").get<std::string>();
    tok.id = file_token_id(t.at("id"), path, "added token id");
    tok.special = t.value("special", false);
    tok.lstrip = t.value("lstrip", false);
    tok.rstrip = t.value("rstrip", false);
    tok.single_word = t.value("single_word", false);
    require(!tok.content.empty() && tok.id >= 0, path, ": added token with id ", tok.id, " is empty or negative");
    if (static_cast<size_t>(tok.id) >= id_to_token.size()) id_to_token.resize(tok.id + 1);
    id_to_token[tok.id] = tok.content;
    added_ids[tok.content] = tok.id;
    added.push_back(tok);
  }
  std::stable_sort(added.begin(), added.end(),
                   [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
  special.assign(id_to_token.size(), 0);
  for (const auto& t : added) special[t.id] = t.special;
}

void Tokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  const std::string type = n.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const json& s : n.at("normalizers")) load_normalizer(s);
  } else if (type == "Prepend") {
    normalizer.push_back({true, n.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    normalizer.push_back({false, string_pattern(n, path, "Replace normalizer"), n.at("content").get<std::string>()});
    normalizer_growth *= replace_growth(normalizer.back().a, normalizer.back().b);
  } else {
    fail(path, ": normalizer ", escaped(type), " is not supported (Llama/Phi-3 use Prepend + Replace)");
  }
}

void Tokenizer::Impl::load_pre_tokenizer(const json& p) {
  if (p.is_null()) return;
  const std::string type = p.at("type").get<std::string>();
  if (type == "Sequence" && p.at("pretokenizers").size() == 1) return load_pre_tokenizer(p.at("pretokenizers")[0]);
  require(type == "Metaspace", path, ": pre_tokenizer ", escaped(type),
          " is not supported (Llama/Phi-3 use none or Metaspace)");
  has_metaspace = true;
  if (p.contains("replacement")) metaspace.replacement = one_char(p.at("replacement"), path, "Metaspace replacement");
  metaspace.scheme = parse_scheme(p, path);
  metaspace.split = p.value("split", true);
}

void Tokenizer::Impl::load_decoder_step(const json& d) {
  const std::string type = d.at("type").get<std::string>();
  DecodeStep s{DecodeStep::Fuse, "", "", 0, 0, Prepend::Always};
  if (type == "Sequence") {
    for (const json& x : d.at("decoders")) load_decoder_step(x);
    return;
  } else if (type == "Replace") {
    s = {DecodeStep::Replace, string_pattern(d, path, "Replace decoder"), d.at("content").get<std::string>()};
    decoder_growth *= replace_growth(s.a, s.b);
  } else if (type == "ByteFallback") {
    s.kind = DecodeStep::ByteFallback;
  } else if (type == "Fuse") {
    s.kind = DecodeStep::Fuse;
  } else if (type == "Strip") {
    s.kind = DecodeStep::Strip;
    s.a = one_char(d.at("content"), path, "Strip decoder content");
    if (d.contains("start")) s.start = checked_int(d.at("start"), 0, INT32_MAX, path, "Strip decoder start");
    if (d.contains("stop")) s.stop = checked_int(d.at("stop"), 0, INT32_MAX, path, "Strip decoder stop");
  } else if (type == "Metaspace") {
    s.kind = DecodeStep::MetaspaceDec;
    s.a = d.contains("replacement") ? one_char(d.at("replacement"), path, "Metaspace decoder replacement")
                                    : std::string("\xE2\x96\x81");
    s.scheme = parse_scheme(d, path);
  } else {
    fail(path, ": decoder ", escaped(type), " is not supported (Llama/Phi-3 use Replace, ByteFallback, Fuse, Strip)");
  }
  decoder.push_back(s);
}

// BOS / EOS: tokenizer_config.json next to tokenizer.json names them; without it, Phi-3's choice.
void Tokenizer::Impl::load_names(const fs::path& file, const json& /*root*/) {
  std::string bos_name = "<s>", eos_name = added_ids.count("<|endoftext|>") ? "<|endoftext|>" : "</s>";
  const fs::path cfg = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(cfg)) {
    std::ifstream in(cfg);
    json c;
    try {
      c = json::parse(in);
    } catch (const json::exception& e) {
      fail(cfg.string(), ": invalid JSON (", e.what(), ")");
    }
    const auto name = [&](const char* k, std::string& out) {
      if (!c.contains(k) || c.at(k).is_null()) return;
      const json& v = c.at(k);
      out = v.is_string() ? v.get<std::string>() : v.at("content").get<std::string>();
    };
    name("bos_token", bos_name);
    name("eos_token", eos_name);
  }
  const auto find = [&](const std::string& n) {
    if (auto it = added_ids.find(n); it != added_ids.end()) return it->second;
    if (auto it = vocab.find(n); it != vocab.end()) return it->second;
    return -1;
  };
  bos = find(bos_name);
  eos = find(eos_name);
  require(bos >= 0, path, ": BOS token ", escaped(bos_name), " is not in the vocabulary");
  require(eos >= 0, path, ": EOS token ", escaped(eos_name), " is not in the vocabulary");
}

// HF: BPE::merge_word + Word::merge_all. Characters become vocab ids (or their <0xNN> bytes, or <unk>), then the
// pair with the lowest merge rank is merged, leftmost first, until none is left. A heap entry is checked against
// the current pair by its result id only, exactly as HF does, so even odd vocabularies give HF's ids.
void Tokenizer::Impl::bpe(const std::string& word, std::vector<int>& out) const {
  if (ignore_merges) {
    if (auto it = vocab.find(word); it != vocab.end()) return out.push_back(it->second);
  }
  struct Sym {
    int id, prev, next;
    bool live;
  };
  std::vector<Sym> sy;
  sy.reserve(word.size());
  const auto add = [&](int id) { sy.push_back({id, static_cast<int>(sy.size()) - 1, -1, true}); };
  bool pending_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t n = utf8_len(word, i);
    const std::string ch = word.substr(i, n);
    i += n;
    if (auto it = vocab.find(ch); it != vocab.end()) {
      if (pending_unk) add(unk_id), pending_unk = false;
      add(it->second);
      continue;
    }
    bool bytes_ok = true;
    for (unsigned char c : ch) bytes_ok = bytes_ok && byte_ids[c] >= 0;
    if (bytes_ok) {  // HF: byte tokens go in without flushing a pending <unk> first
      for (unsigned char c : ch) add(byte_ids[c]);
      continue;
    }
    require(unk_id >= 0, path, ": character ", escaped(ch), " has no token, no byte token and there is no unk_token");
    if (pending_unk && !fuse_unk) add(unk_id);
    pending_unk = true;
  }
  if (pending_unk) add(unk_id);
  for (size_t k = 0; k + 1 < sy.size(); ++k) sy[k].next = static_cast<int>(k) + 1;

  struct Cand {
    int rank, pos, new_id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }  // min-heap
  };
  std::priority_queue<Cand> q;
  const auto push = [&](int pos) {
    if (pos < 0 || sy[pos].next < 0) return;
    if (auto it = merges.find(key(sy[pos].id, sy[sy[pos].next].id)); it != merges.end())
      q.push({it->second.rank, pos, it->second.new_id});
  };
  for (int k = 0; k + 1 < static_cast<int>(sy.size()); ++k) push(k);
  while (!q.empty()) {
    const Cand c = q.top();
    q.pop();
    Sym& left = sy[c.pos];
    if (!left.live || left.next < 0) continue;
    const int r = left.next;
    const auto it = merges.find(key(left.id, sy[r].id));
    if (it == merges.end() || it->second.new_id != c.new_id) continue;  // stale entry
    left.id = c.new_id;
    sy[r].live = false;
    left.next = sy[r].next;
    if (left.next >= 0) sy[left.next].prev = c.pos;
    push(left.prev);
    push(c.pos);
  }
  for (const Sym& s : sy)
    if (s.live) out.push_back(s.id);
}

// One piece of text between added tokens: normalize, pre-tokenize, BPE. `offset` is where the piece starts in the
// original text (Metaspace's prepend_scheme "first" prepends only to the piece at offset 0).
void Tokenizer::Impl::encode_segment(const std::string& seg, size_t offset, std::vector<int>& out) const {
  std::string s = seg;
  for (const NormStep& n : normalizer) {
    if (n.prepend) {
      if (!s.empty()) s = n.a + s;  // HF: Prepend on a non-empty string, even one that starts with it
    } else {
      replace_all(s, n.a, n.b);
    }
  }
  if (!has_metaspace) {
    if (!s.empty()) bpe(s, out);
    return;
  }
  const std::string& rep = metaspace.replacement;
  replace_all(s, " ", rep);
  const bool prepend = metaspace.scheme == Prepend::Always || (metaspace.scheme == Prepend::First && offset == 0);
  if (prepend && !starts_with(s, rep)) s = rep + s;  // HF: only if it does not start with "▁" already
  if (!metaspace.split) {
    if (!s.empty()) bpe(s, out);
    return;
  }
  // split=true: every "▁" starts a new word (HF: SplitDelimiterBehavior::MergedWithNext).
  size_t start = 0;
  for (size_t p = s.find(rep, rep.size() > 0 ? 1 : 0); p != std::string::npos; p = s.find(rep, p + rep.size())) {
    if (p > start) bpe(s.substr(start, p - start), out);
    start = p;
  }
  if (start < s.size()) bpe(s.substr(start), out);
}

// ---- public API ------------------------------------------------------------------------------------------------

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& path_in) {
  fs::path file = path_in;
  if (fs::is_directory(file)) file /= "tokenizer.json";
  require(fs::is_regular_file(file), file.string(),
          ": tokenizer file not found (pass the model directory that holds the checkpoint's tokenizer.json)");
  Tokenizer t;
  Impl& m = *t.impl_;
  m.path = file.string();
  json root;
  {
    std::ifstream in(file, std::ios::binary);
    require(static_cast<bool>(in), m.path, ": cannot open the tokenizer file");
    try {
      root = json::parse(in);
    } catch (const json::exception& e) {
      fail(m.path, ": invalid JSON (", e.what(), ")");
    }
  }
  try {
    require(root.is_object() && root.contains("model") && root.at("model").is_object(), m.path,
            ": not an HF tokenizer.json (no \"model\" object)");
    m.load_model(root.at("model"));
    if (root.contains("added_tokens")) m.load_added(root.at("added_tokens"));
    m.special.resize(m.id_to_token.size(), 0);
    m.load_normalizer(root.value("normalizer", json()));
    require(m.normalizer_growth <= kMaxReplaceGrowth, m.path, ": the normalizer's Replace steps can grow a text ",
            m.normalizer_growth, " times (EP Lab allows ", kMaxReplaceGrowth, ")");
    m.load_pre_tokenizer(root.value("pre_tokenizer", json()));
    const json dec = root.value("decoder", json());
    m.has_decoder = !dec.is_null();
    if (m.has_decoder) m.load_decoder_step(dec);
    require(m.decoder_growth <= kMaxReplaceGrowth, m.path, ": the decoder's Replace steps can grow a text ",
            m.decoder_growth, " times (EP Lab allows ", kMaxReplaceGrowth, ")");
    m.load_names(file, root);
  } catch (const json::exception& e) {  // a field of the wrong type or missing
    fail(m.path, ": unexpected tokenizer.json layout (", e.what(), ")");
  }
  return t;
}

std::vector<int> Tokenizer::encode(const std::string& text, bool add_bos) const {
  const Impl& m = *impl_;
  std::vector<int> out;
  if (add_bos) out.push_back(m.bos);
  // HF: AddedVocabulary::find_matches -- leftmost-longest matches of the added tokens, never split; lstrip /
  // rstrip widen a match over neighbouring whitespace, which then belongs to the token (and disappears).
  size_t seg_start = 0;  // start of the text not yet consumed
  size_t i = 0;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& t : m.added) {
      if (text.compare(i, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        // the character before i and the one after the match must not be word characters
        bool ok = true;
        if (i > 0) {
          size_t b = i - 1;
          while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
          ok = !is_word_char(utf8_decode(text, b, utf8_len(text, b)));
        }
        const size_t e = i + t.content.size();
        if (ok && e < text.size()) ok = !is_word_char(utf8_decode(text, e, utf8_len(text, e)));
        if (!ok) continue;
      }
      hit = &t;
      break;  // sorted longest first
    }
    if (!hit) {
      i += utf8_len(text, i);
      continue;
    }
    size_t start = i, stop = i + hit->content.size();
    if (hit->lstrip) {
      size_t s = start;
      while (s > seg_start) {
        size_t b = s - 1;
        while (b > seg_start && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
        if (!is_whitespace(utf8_decode(text, b, utf8_len(text, b)))) break;
        s = b;
      }
      start = s;
    }
    if (hit->rstrip) {
      while (stop < text.size()) {
        const size_t n = utf8_len(text, stop);
        if (!is_whitespace(utf8_decode(text, stop, n))) break;
        stop += n;
      }
    }
    if (start > seg_start) m.encode_segment(text.substr(seg_start, start - seg_start), seg_start, out);
    out.push_back(hit->id);
    seg_start = i = stop;
  }
  if (seg_start < text.size()) m.encode_segment(text.substr(seg_start), seg_start, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int id : ids) {
    require(id >= 0 && id < vocab_size(), "decode: token id ", id, " is outside the vocabulary [0, ", vocab_size(),
            ") of ", m.path);
    if (skip_special && m.special[id]) continue;
    toks.push_back(m.id_to_token[id]);
  }
  if (!m.has_decoder) {  // HF: tokens joined by spaces when there is no decoder
    std::string s;
    for (size_t k = 0; k < toks.size(); ++k) s += (k ? " " : "") + toks[k];
    return s;
  }
  for (const DecodeStep& d : m.decoder) {
    switch (d.kind) {
      case DecodeStep::Replace:
        for (auto& t : toks) replace_all(t, d.a, d.b);
        break;
      case DecodeStep::ByteFallback: {  // runs of <0xNN> become their bytes if valid UTF-8, else one U+FFFD each
        std::vector<std::string> o;
        std::string run;
        size_t run_n = 0;
        const auto flush = [&] {
          if (run_n == 0) return;
          if (valid_utf8(run)) {
            o.push_back(run);
          } else {
            for (size_t k = 0; k < run_n; ++k) o.push_back("\xEF\xBF\xBD");
          }
          run.clear(), run_n = 0;
        };
        for (auto& t : toks) {
          const bool byte = t.size() == 6 && starts_with(t, "<0x") && t[5] == '>' && std::isxdigit(t[3]) &&
                            std::isxdigit(t[4]);
          if (byte) {
            run += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
            ++run_n;
          } else {
            flush();
            o.push_back(std::move(t));
          }
        }
        flush();
        toks = std::move(o);
        break;
      }
      case DecodeStep::Fuse: {
        std::string s;
        for (const auto& t : toks) s += t;
        toks.assign(1, s);
        break;
      }
      case DecodeStep::Strip:  // up to `start` leading and `stop` trailing copies of the content character
        for (auto& t : toks) {
          for (int k = 0; k < d.start && starts_with(t, d.a); ++k) t.erase(0, d.a.size());
          for (int k = 0; k < d.stop && t.size() >= d.a.size() && t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0;
               ++k)
            t.erase(t.size() - d.a.size());
        }
        break;
      case DecodeStep::MetaspaceDec:  // HF: "▁" -> " ", but in the first token every "▁" is dropped
        for (size_t k = 0; k < toks.size(); ++k)
          replace_all(toks[k], d.a, k == 0 && d.scheme != Prepend::Never ? "" : " ");
        break;
    }
  }
  std::string s;
  for (const auto& t : toks) s += t;
  return s;
}

std::string Tokenizer::piece(int id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->id_to_token[id];
}

int Tokenizer::token_id(const std::string& token) const {
  if (auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return -1;
}

bool Tokenizer::is_special(int id) const { return id >= 0 && id < vocab_size() && impl_->special[id]; }
int Tokenizer::bos_id() const { return impl_->bos; }
int Tokenizer::eos_id() const { return impl_->eos; }
int Tokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }
const std::string& Tokenizer::path() const { return impl_->path; }

std::vector<int> Tokenizer::stop_ids() const {
  std::vector<int> s{eos_id()};
  for (const char* t : {"<|end|>", "<|endoftext|>"}) {
    const int id = token_id(t);
    if (id >= 0 && std::find(s.begin(), s.end(), id) == s.end()) s.push_back(id);
  }
  return s;
}

// Phi-3.5's chat_template (tokenizer_config.json of Phi-3.5-mini/MoE-instruct), written out:
//   {% for message in messages %}{% if message['role'] == 'system' and message['content'] %}
//   {{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}
//   {{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}
//   {{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}
//   {% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}
std::string Tokenizer::apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  std::string out;
  for (const ChatMessage& msg : messages) {
    require(msg.role == "system" || msg.role == "user" || msg.role == "assistant", "chat message role \"", msg.role,
            "\" is not system, user or assistant");
    if (msg.role == "system" && msg.content.empty()) continue;
    out += "<|" + msg.role + "|>\n" + msg.content + "<|end|>\n";
  }
  return out + (add_generation_prompt ? "<|assistant|>\n" : piece(eos_id()));
}

std::string Tokenizer::apply_chat_template(const std::string& user_prompt) const {
  return apply_chat_template({ChatMessage{"user", user_prompt}}, true);
}

}  // namespace eplab
