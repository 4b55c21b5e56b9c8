// A STAND-IN for a tokenizer, until chapter 05 brings the real one (tokenizer.json).
//
// The prompt is cut at whitespace; every word becomes pieces of at most 4 bytes, the first one marked with
// "▁" as SentencePiece marks a word start. A piece's id is the FNV-1a hash of its bytes modulo the vocab
// size: deterministic and spread over the whole embedding table, but NOT the model's real token ids.
// The layer input built from them (live_router.hpp) is a stand-in too. When a chapter 05 trace is loaded
// (--trace), the ids, pieces and routing come from the real tokenizer and the real hidden states.
#pragma once
#include <string>
#include <vector>

namespace eplab::viz {

struct StandInTokens {
  std::vector<std::string> pieces;
  std::vector<int> ids;
};

StandInTokens stand_in_tokenize(const std::string& prompt, int vocab_size);

}  // namespace eplab::viz
