// The tokenizer of microsoft/Phi-tiny-MoE-instruct: an HF tokenizer.json of the Llama/Phi-3 SentencePiece-BPE kind.
//
// What it reads (anything else is rejected with a one-line eplab::Error):
//  - model: {"type": "BPE", "byte_fallback": true, vocab, merges ("a b" strings or [a, b] pairs), unk_token,
//    fuse_unk, ignore_merges}; no dropout, continuing_subword_prefix or end_of_word_suffix
//  - added_tokens (<s>, </s>, <unk>, <|endoftext|>, <|user|>, <|assistant|>, <|system|>, <|end|>, ... ids 32000+
//    in Phi-3) with their lstrip / rstrip / single_word flags
//  - normalizer: null, or Prepend / Replace (plain-string pattern) / Sequence of them (Phi-3, legacy Llama)
//  - pre_tokenizer: null, or Metaspace (prepend_scheme always|first|never, split) (newer Llama layout)
//  - decoder: Replace / ByteFallback / Fuse / Strip / Metaspace, or a Sequence of them
// encode() follows HF tokenizers' order: split out added tokens (leftmost-longest, never split, whitespace eaten
// per lstrip/rstrip), then per remaining piece normalize, pre-tokenize, and run BPE by merge rank (lowest rank
// first, leftmost on ties), characters outside the vocab becoming their <0xNN> byte tokens.
// Checked id for id against HF tokenizers by tests/unit/test_tokenizer.cpp on the fixture made by
// scripts/hf_tokenizer_fixture.py.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace eplab {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant"
  std::string content;
};

class Tokenizer {
 public:
  // Reads an HF tokenizer.json (a file, or a directory holding one). If tokenizer_config.json lies next to it,
  // its bos_token / eos_token name the BOS/EOS tokens; otherwise BOS is <s> and EOS is <|endoftext|> (Phi-3)
  // or else </s>. Throws eplab::Error naming the file for a missing file, invalid JSON or an unsupported layout.
  static Tokenizer load(const std::string& path);

  // Text -> ids. Special tokens written in the text ("<|user|>") become their ids and are never split.
  // add_bos puts bos_id() first (HF: add_special_tokens=True with Llama's "<s> $A" post-processor).
  std::vector<int> encode(const std::string& text, bool add_bos = false) const;

  // Ids -> text as HF's Tokenizer.decode does. skip_special=true (HF's default) drops special added tokens.
  // Throws on an id outside [0, vocab_size()).
  std::string decode(const std::vector<int>& ids, bool skip_special = true) const;

  // The token string for display ("▁the", "<0x0A>", "<|end|>"); "" for an id outside the vocabulary.
  std::string piece(int id) const;
  // The id of a token string (vocab or added token), -1 if there is none.
  int token_id(const std::string& token) const;
  bool is_special(int id) const;

  int bos_id() const;
  int eos_id() const;
  // Ids that end a generated answer: eos_id() plus <|end|> and <|endoftext|> where present (Phi-3 ends an
  // assistant turn with <|end|>; its generation_config lists both).
  std::vector<int> stop_ids() const;
  // One more than the largest id (model vocab and added tokens); must be <= the model's vocab_size.
  int vocab_size() const;

  // Phi-3.5 / Phi-tiny-MoE chat format (tokenizer_config.json "chat_template" of Phi-3.5; the Phi-tiny-MoE model
  // card shows the same): per message "<|role|>\n{content}<|end|>\n" (a system message only if its content is not
  // empty), then "<|assistant|>\n" if add_generation_prompt, else the EOS token's text.
  std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;
  // One user turn: "<|user|>\n{prompt}<|end|>\n<|assistant|>\n".
  std::string apply_chat_template(const std::string& user_prompt) const;

  const std::string& path() const;

  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eplab
