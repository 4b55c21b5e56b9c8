// A STAND-IN for a tokenizer, for a model directory without tokenizer.json (LiveRouter uses the real one,
// common/model/tokenizer, whenever the model has it).
//
// The prompt is cut at whitespace; every word becomes pieces of at most 4 bytes, the first one marked with
// "▁" as SentencePiece marks a word start. A piece's id is the FNV-1a hash of its bytes modulo the vocab
// size: deterministic and spread over the whole embedding table, but NOT the model's real token ids.
#pragma once
#include <string>
#include <vector>

namespace eplab::viz {

struct PromptTokens {  // what a prompt becomes: ids and their text pieces
  std::vector<std::string> pieces;
  std::vector<int> ids;
};

PromptTokens stand_in_tokenize(const std::string& prompt, int vocab_size);

}  // namespace eplab::viz
