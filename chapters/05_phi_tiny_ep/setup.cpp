#include "setup.hpp"

#include <algorithm>
#include <fstream>
#include <iostream>

#include "bench_peer.hpp"
#include "device.hpp"
#include "model/phimoe_cpu.hpp"
#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

std::optional<int> setup_ch05(dist::Communicator& comm, int argc, char** argv, Options& o, Ch05Setup& s,
                              TraceWriter& trace) {
  const int rank = comm.rank(), N = comm.size();
  CLI::App app{"Chapter 05: Phi-tiny-MoE with expert parallelism: greedy generation over mpirun ranks (CPU or GPUs)"};
  add_common_options(app, o.common);
  app.add_option("--prompt", o.prompts, "prompt text (repeat the flag for a batch); needs a tokenizer")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--prompt-ids", o.prompt_ids, "a prompt as token ids, e.g. 1,450,4996 (repeat for a batch)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--tokenizer", o.tokenizer, "tokenizer.json (default: the one in --model's directory)");
  app.add_flag("--chat", o.chat, "wrap each --prompt in the Phi-3 chat format (<|user|> ... <|end|> <|assistant|>)");
  app.add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate per prompt")->capture_default_str();
  app.add_option("--placement", o.placement, "expert map: linear (contiguous blocks) or round-robin (e mod N)")
      ->check(CLI::IsMember({"linear", "round-robin"}))
      ->capture_default_str();
  app.add_option("--trace", o.trace, "write the routing of every step and layer as JSON lines (for the visualizer)");
  app.add_flag("--ignore-eos", o.ignore_eos, "do not stop at the tokenizer's end tokens");
  app.add_option("--peer-json", o.peer_json, "with --bench: HF transformers at the same shapes, measured in the same "
                 "session (scripts/hf_model_bench.py --json FILE); the table shows the measured ratios");
  app.add_flag("--bench", o.bench, "GPU speed table: prefill of 2048 tokens, decode tokens/s at batch 1 and 16 "
               "(random token ids; no prompt needed)");

  // --- options, model, placement, prompts: all or none (a bad flag ends every rank with one line)
  std::optional<int> early;
  auto& ckpt = s.ckpt;
  auto& placement = s.placement;
  auto& tok = s.tok;
  auto& prompts = s.prompts;
  auto& stop_ids = s.stop_ids;
  auto& tok_note = s.tok_note;
  dist::all_or_none(comm, [&] {
    if (rank != 0) std::cout.setstate(std::ios::failbit);  // --help: printed once, by rank 0
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    if (early) return;
    require(!o.bench || o.common.device == "gpu", "--bench measures the GPU path: add --device gpu");
    require(o.peer_json.empty() || o.bench, "--peer-json goes with --bench");
    (void)load_model_peer(o.peer_json);  // a bad file is one line now, before any model is loaded
    if (o.common.device == "gpu") {  // one line, not a crash, when there is no GPU; no CUDA context here:
      std::string why;                // with N ranks each would open one on GPU 0 (NCCL picks the GPUs later)
      require(gpu_count(&why) > 0, "--device gpu: no usable GPU (", why, ")");
    }
    require(o.max_new_tokens >= 1, "--max-new-tokens must be >= 1, got ", o.max_new_tokens);
    require(o.bench || !o.prompts.empty() || !o.prompt_ids.empty(),
            "no prompt: give --prompt TEXT or --prompt-ids 1,450,4996");
    require(!o.chat || !o.prompts.empty(), "--chat formats --prompt texts; it does nothing for --prompt-ids");
    ckpt.emplace(Checkpoint::open(o.common.model));
    const ModelConfig& c = ckpt->config();
    placement.emplace(parse_placement(o.placement), c.num_local_experts, N);

    // the tokenizer: --tokenizer, else the model's tokenizer.json; needed for --prompt, optional otherwise
    std::string tpath = o.tokenizer;
    if (tpath.empty()) {
      std::ifstream probe(o.common.model + "/tokenizer.json");
      if (probe) tpath = o.common.model + "/tokenizer.json";
    }
    if (!tpath.empty()) {
      tok.emplace(Tokenizer::load(tpath));
      require(tok->vocab_size() <= c.vocab_size, "tokenizer ", tpath, " has ", tok->vocab_size(),
              " tokens but the model's vocab_size is ", c.vocab_size, ": they do not belong together");
    } else {
      require(o.prompts.empty(), o.common.model, " has no tokenizer.json, so --prompt cannot be encoded: pass "
              "--tokenizer FILE or give the prompt as --prompt-ids");
      tok_note = strf("no tokenizer (%s has no tokenizer.json, no --tokenizer): prompts and output as token ids",
                      o.common.model.c_str());
    }
    for (const std::string& p : o.prompts)
      prompts.push_back(tok->encode(o.chat ? tok->apply_chat_template(p) : p, /*add_bos=*/!o.chat));
    for (const std::string& p : o.prompt_ids) prompts.push_back(parse_ids(p));
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      require(!prompts[b].empty(), "prompt ", b, " has no tokens");
      for (int id : prompts[b])
        require(id < c.vocab_size, "prompt ", b, ": token id ", id, " is outside the model's vocabulary [0, ",
                c.vocab_size, ")");
      const long end = long(prompts[b].size()) + o.max_new_tokens;
      require(c.max_position_embeddings <= 0 || end <= c.max_position_embeddings, "prompt ", b, " has ",
              prompts[b].size(), " tokens; with --max-new-tokens ", o.max_new_tokens, " it would reach ", end,
              ", longer than the model's context (max_position_embeddings ", c.max_position_embeddings, ")");
    }
    if (tok && !o.ignore_eos) stop_ids = tok->stop_ids();
    if (rank == 0 && !o.trace.empty()) trace.open(o.trace);
    if (rank == 0 && !o.common.json.empty()) {
      std::ofstream probe(o.common.json, std::ios::app);
      require(bool(probe), "--json ", o.common.json, ": cannot open for writing");
    }
  });
  return early;
}

void print_ch05_header(const Options& o, const Ch05Setup& s, dist::Communicator& comm) {
  const int rank = comm.rank(), N = comm.size();
  auto say = [&](const std::string& t) {
    if (rank == 0) std::fputs(t.c_str(), stdout);
  };
  const ModelConfig& c = s.ckpt->config();
  const Placement& placement = *s.placement;
  const int L = c.num_hidden_layers, E = c.num_local_experts, H = c.hidden_size;
  say(strf("05_phi_tiny_ep: %d rank(s), MPI backend: %s\n", N, comm.describe().c_str()));
  if (o.common.device == "auto")
    say("device: CPU (--device auto stays on the CPU here; the GPU path is --device gpu)\n");
  say(strf("model %s: %d layers, hidden %d, %d experts (top-%d, %s), vocab %d\n", o.common.model.c_str(), L, H, E,
           c.num_experts_per_tok, router_name(c.router), c.vocab_size));
  say(placement.str());
  if (!placement.even())
    say(strf("uneven: rank 0 holds %d experts per layer, rank %d holds %d\n", placement.num_local(0), N - 1,
             placement.num_local(N - 1)));
  if (!s.tok_note.empty()) say(s.tok_note + "\n");
  else if (s.tok->vocab_size() < c.vocab_size)
    say(strf("tokenizer %s: %d tokens, fewer than the model's %d (a test tokenizer): generated ids it does not know "
             "are shown as [#id]\n", s.tok->path().c_str(), s.tok->vocab_size(), c.vocab_size));
  else
    say(strf("tokenizer %s (%d tokens)\n", s.tok->path().c_str(), s.tok->vocab_size()));
  if (rank == 0) std::fflush(stdout);
}

std::string compare_with_single_process(const Ch05Setup& s, int max_new_tokens,
                                        const std::vector<std::vector<int>>& out, bool ranks_agree, int N,
                                        bool* pass) {
  const int E = s.ckpt->config().num_local_experts, B = int(s.prompts.size());
  std::string verdict;
  bool same = ranks_agree;
  const double bytes = double(s.ckpt->disk_counts().bytes);
  if (!ranks_agree) verdict = "ranks generated different tokens";
  if (same && bytes < kReferenceMaxBytes) {
    std::printf("reference: one process, all %d experts per layer (LocalMoeBlock) ...\n", E);
    std::fflush(stdout);
    PhimoeCpuModel ref = PhimoeCpuModel::load(*s.ckpt);
    std::vector<std::vector<int>> want = ref.generate(s.prompts, max_new_tokens, -1);
    for (auto& w : want)  // the same stop rule as above
      for (std::size_t i = 0; i < w.size(); ++i)
        if (std::find(s.stop_ids.begin(), s.stop_ids.end(), w[i]) != s.stop_ids.end()) {
          w.resize(i + 1);
          break;
        }
    for (int b = 0; b < B && same; ++b)
      for (std::size_t i = 0; i < std::max(want[b].size(), out[b].size()); ++i) {
        const int got = i < out[b].size() ? out[b][i] : -1, exp = i < want[b].size() ? want[b][i] : -1;
        if (got != exp) {
          same = false;
          verdict = strf("prompt %d, new token %zu: EP gave %d, the single-process reference %d", b, i, got, exp);
          break;
        }
      }
    if (same) verdict = strf("tokens identical to the single-process reference (all %d experts)", E);
  } else if (same) {
    verdict = strf("reference skipped: the checkpoint is %s (> %s), too big for a second copy on rank 0; "
                   "all %d ranks generated the same tokens",
                   human_bytes(bytes).c_str(), human_bytes(kReferenceMaxBytes).c_str(), N);
  }
  *pass = same;
  return verdict;
}

}  // namespace eplab
