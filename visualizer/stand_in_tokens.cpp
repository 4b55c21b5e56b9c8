#include "stand_in_tokens.hpp"

#include <cstdint>

#include "util/check.hpp"

namespace eplab::viz {

namespace {
std::uint32_t fnv1a(const std::string& s) {
  std::uint32_t h = 2166136261u;
  for (unsigned char c : s) h = (h ^ c) * 16777619u;
  return h;
}
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
}  // namespace

PromptTokens stand_in_tokenize(const std::string& prompt, int vocab_size) {
  require(vocab_size > 0, "stand-in tokenizer: vocab_size must be > 0");
  PromptTokens out;
  std::size_t i = 0;
  while (i < prompt.size()) {
    while (i < prompt.size() && is_space(prompt[i])) ++i;
    std::size_t j = i;
    while (j < prompt.size() && !is_space(prompt[j])) ++j;
    bool first = true;
    for (std::size_t p = i; p < j;) {
      // Up to 4 bytes per piece, never cutting a UTF-8 sequence (continuation bytes are 10xxxxxx).
      std::size_t q = std::min(j, p + 4);
      while (q < j && (static_cast<unsigned char>(prompt[q]) & 0xC0) == 0x80) ++q;
      std::string piece = (first ? "\xE2\x96\x81" : "") + prompt.substr(p, q - p);
      out.pieces.push_back(piece);
      out.ids.push_back(int(fnv1a(piece) % std::uint32_t(vocab_size)));
      first = false;
      p = q;
    }
    i = j;
  }
  return out;
}

}  // namespace eplab::viz
