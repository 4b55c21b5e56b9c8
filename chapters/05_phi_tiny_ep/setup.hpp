// Chapter 05's set-up before any weight is loaded: the command line, the model's config and placement, the
// tokenizer and the prompts, all checked on every rank (a bad flag or prompt ends every rank with one line).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "chapter05.hpp"

namespace eplab {

struct Ch05Setup {
  std::optional<Checkpoint> ckpt;
  std::optional<Placement> placement;
  std::optional<Tokenizer> tok;       // --tokenizer, else the model's tokenizer.json, else none
  std::vector<std::vector<int>> prompts;
  std::vector<int> stop_ids;          // the tokenizer's end tokens (none with --ignore-eos)
  std::string tok_note;               // what to say when there is no tokenizer
};

// Parses the options and prepares the run on every rank (all or none); opens the trace on rank 0. A value:
// exit now with it (--help).
std::optional<int> setup_ch05(dist::Communicator& comm, int argc, char** argv, Options& o, Ch05Setup& s,
                              TraceWriter& trace);

// Rank 0: the run's header (backend, model, placement, tokenizer).
void print_ch05_header(const Options& o, const Ch05Setup& s, dist::Communicator& comm);

// Rank 0 re-runs the model on one process with every expert (when the checkpoint is small enough) and
// compares the generated tokens. Returns the verdict; *pass says whether the run passed.
std::string compare_with_single_process(const Ch05Setup& s, int max_new_tokens,
                                        const std::vector<std::vector<int>>& out, bool ranks_agree, int ranks,
                                        bool* pass);

}  // namespace eplab
