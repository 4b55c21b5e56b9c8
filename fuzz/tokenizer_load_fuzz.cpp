// Fuzz target: loading tokenizer.json (common/model/tokenizer.cpp, Tokenizer::load), then using what loaded.
//
// Input: the text of a tokenizer.json, optionally followed by a NUL byte and a text to encode (JSON holds no
// raw NUL, so the first one splits the two; without one, a fixed text with added tokens, bytes and spaces).
// What must hold: Tokenizer::load throws eplab::Error or gives a tokenizer that encodes the text (plain and
// with BOS) into ids inside [0, vocab_size()), decodes those ids (skipping specials or not), and answers
// piece / token_id / is_special / stop_ids / apply_chat_template without crashing, hanging or blowing up.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "model/tokenizer.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

void check_ids(const Tokenizer& t, const std::vector<int>& ids) {
  for (int id : ids)
    if (id < 0 || id >= t.vocab_size()) fuzz::broken("encode() gave an id outside [0, vocab_size())");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in = fuzz::as_view(data, size);
  const std::size_t nul = in.find('\0');
  const std::string_view json = in.substr(0, nul);
  const std::string text = nul == std::string_view::npos
                               ? std::string("<s>Hello  world<|end|>\n\xC3\xA9\xF0\x9F\x99\x82 \x80<|user|>x")
                               : std::string(in.substr(nul + 1));
  const std::string path = fuzz::ScratchDir::get().write("tokenizer.json", json);
  Tokenizer t;
  try {
    t = Tokenizer::load(path);
  } catch (const Error& e) {
    fuzz::one_line(e);
    return 0;
  }
  try {
    for (bool bos : {false, true}) {
      const std::vector<int> ids = t.encode(text, bos);
      check_ids(t, ids);
      for (bool skip : {true, false}) (void)t.decode(ids, skip);
    }
  } catch (const Error& e) {
    fuzz::one_line(e);
    // e.g. a character with no token, no byte token and no unk_token
  }
  // Every id decodes alone (a vocabulary can be large: the first few thousand).
  const int n = t.vocab_size() < 4096 ? t.vocab_size() : 4096;
  for (int id = 0; id < n; ++id) {
    (void)t.decode({id}, false);
    const std::string p = t.piece(id);
    if (!p.empty() && t.token_id(p) < 0) fuzz::broken("piece() gives a string token_id() does not know");
    (void)t.is_special(id);
  }
  (void)t.piece(-1);
  (void)t.piece(t.vocab_size());
  for (int id : t.stop_ids())
    if (id < 0 || id >= t.vocab_size()) fuzz::broken("stop_ids() outside the vocabulary");
  (void)t.apply_chat_template(text);
  return 0;
}
