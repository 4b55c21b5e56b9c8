// Chapter 05's pieces shared by its CPU path (main.cpp) and its GPU path (run_gpu.cpp): the options, the
// prompt and output helpers.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "dist/communicator.hpp"
#include "model/checkpoint.hpp"
#include "model/tokenizer.hpp"
#include "moe/ep_moe_cpu.hpp"
#include "moe/placement.hpp"
#include "moe/routing_trace.hpp"
#include "util/cli.hpp"

namespace eplab {

constexpr double kReferenceMaxBytes = 2e9;  // rank 0 re-runs the model on one process only below this size

struct Options {
  CommonOptions common;
  std::vector<std::string> prompts, prompt_ids;
  std::string tokenizer, placement = "linear", trace;
  bool chat = false, ignore_eos = false;
  int max_new_tokens = 32;
  bool bench = false;  // GPU: the speed table (prefill 2048 tokens, decode at batch 1 and 16)
  std::string peer_json;  // --bench: HF measured in the same session (scripts/hf_model_bench.py --json)
};

std::uint64_t fnv1a(const std::vector<std::vector<int>>& seqs);   // checksum of generated tokens
std::vector<int> parse_ids(std::string s);                        // "1,450,4996" -> ids; throws on junk
std::string id_list(const std::vector<int>& v, std::size_t max_shown = 24);
// Text of generated ids. A test tokenizer may know fewer ids than the model can emit (the mini model's vocab
// is Phi's 32064): ids it does not know are shown as [#id] instead of failing.
std::string safe_decode(const Tokenizer& t, const std::vector<int>& ids);
std::string safe_piece(const Tokenizer& t, int id);

// Text made safe to print: control bytes a model (or a hostile prompt) can decode to are shown escaped, so a
// NUL cannot cut the line short and an ESC cannot drive the terminal. Bytes below 0x20 other than newline and
// tab, and DEL, become \xNN (NUL -> \x00, ESC -> \x1b, CR -> \x0d); the C1 controls U+0080..U+009F become
// \uNNNN. Newline and tab stay as they are (generated text has lines), and so does every other character,
// the backslash included: the escapes are for the reader, not a reversible encoding.
std::string printable(std::string_view s);

// Prints each prompt and its generated continuation (text when there is a tokenizer, through printable();
// ids always) and returns the generated texts for --json as decoded (JSON escapes control characters itself).
nlohmann::json print_generated(const Options& o, const std::optional<Tokenizer>& tok,
                               const std::vector<std::vector<int>>& prompts, const std::vector<std::vector<int>>& out);

// Prints per layer the rows (token choices) per expert and per rank, summed over the run, with the load
// imbalance and the share of rows that crossed ranks; returns them as JSON (per expert, per rank).
std::pair<nlohmann::json, nlohmann::json> print_routing_counts(const EpMoeCounts& cnt, int L, int E, int N);

nlohmann::json expert_map_json(const Placement& placement);  // [rank] -> its experts

// Rank 0 prints what each rank holds: its experts' bf16 bytes (as the CPU model keeps them) and its measured
// resident memory, after a load that took load_s seconds on the slowest rank.
void print_cpu_memory_per_rank(dist::Communicator& comm, const Placement& placement, const ModelConfig& c,
                               double load_s);

// The GPU path (run_gpu.cpp): -np 1 (one GPU, every expert) or -np N (NCCL expert parallelism, one GPU per
// rank). Every rank calls it; returns the exit code.
int run_gpu(const Options& o, dist::Communicator& mpi, const Checkpoint& ckpt, const Placement& placement,
            const std::optional<Tokenizer>& tok, const std::vector<std::vector<int>>& prompts,
            const std::vector<int>& stop_ids, TraceWriter& trace);

}  // namespace eplab
