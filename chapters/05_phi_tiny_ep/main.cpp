// Chapter 05: the whole PhiMoE model with expert parallelism. `mpirun -np N`, one rank per "GPU" (here: per
// CPU process), each rank holding every replicated tensor and only its own experts.
//
//   every rank, every layer:   x ─LayerNorm─▶ attention (whole batch, replicated) ─▶ x += ...
//                              x ─LayerNorm─▶ EP MoE block (common/moe/ep_moe_cpu.hpp):
//                                   my rows ─route─▶ all-to-all-v ─▶ my experts ─▶ all-to-all-v back ─▶ Σ w·y
//                                   all-gather of every rank's rows ─▶ x += ...
//   then LayerNorm, lm_head, greedy argmax: the same logits, hence the same next token, on every rank.
//
// Check: rank 0 also runs the single-process model with all experts (PhimoeCpuModel + LocalMoeBlock) and the
// generated tokens must be identical (the EP block sums in the reference's order, so they are, bit for bit).
//
// GPU: `--device gpu` runs the whole model in bf16 on one GPU per rank (run_gpu.cpp): -np 1 holds every
// expert, -np N is EP over NCCL; every token checked against the fp32 CPU model run on the same prefix.
//
// Run: mpirun -np 4 05_phi_tiny_ep --prompt-ids 1,450,4996 --max-new-tokens 16
//      mpirun -np 2 05_phi_tiny_ep --device gpu --prompt-ids 1,450,4996 --max-new-tokens 16
//      mpirun -np 1 05_phi_tiny_ep --device gpu --model PHI_TINY_DIR --bench
//      mpirun -np 2 05_phi_tiny_ep --model DIR --prompt "The capital of France is" --chat --trace run.jsonl
#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>

#include "device.hpp"
#include "dist/communicator.hpp"
#include "model/phimoe_cpu.hpp"
#include "model/tokenizer.hpp"
#include "moe/ep_moe_cpu.hpp"
#include "moe/placement.hpp"
#include "phimoe_gpu.hpp"
#include "chapter05.hpp"
#include "trace_writer.hpp"
#include "util/check.hpp"
#include "util/cli.hpp"
#include "util/report.hpp"
#include "util/timer.hpp"

namespace eplab {
namespace {

int run(int argc, char** argv) {
  auto comm_ptr = dist::make_mpi_communicator();
  dist::Communicator& comm = *comm_ptr;
  const int rank = comm.rank(), N = comm.size();
  auto say = [&](const std::string& s) {
    if (rank == 0) {
      std::fputs(s.c_str(), stdout);
      std::fflush(stdout);
    }
  };

  Options o;
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
  app.add_option("--moe-path", o.moe_path, "GPU, one rank: local (every expert, CUDA graphs: fastest) or ep (the EP "
                 "engine with one rank: the same arithmetic as -np 2, hence the same tokens)")
      ->check(CLI::IsMember({"local", "ep"}))
      ->capture_default_str();
  app.add_flag("--bench", o.bench, "GPU speed table: prefill of 2048 tokens, decode tokens/s at batch 1 and 16 "
               "(random token ids; no prompt needed)");

  // --- options, model, placement, prompts: all or none (a bad flag ends every rank with one line)
  std::optional<int> early;
  std::optional<Checkpoint> ckpt;
  std::optional<Placement> placement;
  std::optional<Tokenizer> tok;
  std::vector<std::vector<int>> prompts;
  std::vector<int> stop_ids;
  TraceWriter trace;
  std::string tok_note;
  dist::all_or_none(comm, [&] {
    if (rank != 0) std::cout.setstate(std::ios::failbit);  // --help: printed once, by rank 0
    early = parse_cli(app, argc, argv);
    std::cout.clear();
    if (early) return;
    require(!o.bench || o.common.device == "gpu", "--bench measures the GPU path: add --device gpu");
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
  if (early) return *early;
  if (o.common.device == "gpu") return run_gpu(o, comm, *ckpt, *placement, tok, prompts, stop_ids, trace);
  const ModelConfig& c = ckpt->config();
  const int L = c.num_hidden_layers, E = c.num_local_experts, H = c.hidden_size, B = int(prompts.size());

  say(strf("05_phi_tiny_ep: %d rank(s), MPI backend: %s\n", N, comm.describe().c_str()));
  if (o.common.device == "auto")
    say("device: CPU (--device auto stays on the CPU here; the GPU path is --device gpu)\n");
  say(strf("model %s: %d layers, hidden %d, %d experts (top-%d, %s), vocab %d\n", o.common.model.c_str(), L, H, E,
           c.num_experts_per_tok, router_name(c.router), c.vocab_size));
  say(placement->str());
  if (!placement->even())
    say(strf("uneven: rank 0 holds %d experts per layer, rank %d holds %d\n", placement->num_local(0), N - 1,
             placement->num_local(N - 1)));
  if (!tok_note.empty()) say(tok_note + "\n");
  else if (tok->vocab_size() < c.vocab_size)
    say(strf("tokenizer %s: %d tokens, fewer than the model's %d (a test tokenizer): generated ids it does not know "
             "are shown as [#id]\n", tok->path().c_str(), tok->vocab_size(), c.vocab_size));
  else
    say(strf("tokenizer %s (%d tokens)\n", tok->path().c_str(), tok->vocab_size()));

  // --- load: replicated tensors + my experts only; rank 0 prints one line per layer
  WallTimer load_clk;
  std::optional<PhimoeCpuModel> model;
  const std::vector<int>& mine = placement->experts_of(rank);
  dist::all_or_none(comm, [&] {
    PhimoeLoadOptions lo;
    lo.experts = [&](int l) {
      say(strf("loading layer %d/%d: norms, attention, router + experts {%s} (%.1f s)\n", l + 1, L,
               id_list(mine, 64).c_str(), load_clk.ms() / 1e3));
      return mine;
    };
    model.emplace(PhimoeCpuModel::load(*ckpt, lo));
  });
  const double load_s = comm.max(load_clk.ms() / 1e3);
  auto block = std::make_unique<EpMoeCpuBlock>(
      comm, *placement, model->moe_weights(),
      MoeRefOptions{c.router, c.num_experts_per_tok, c.router_jitter_noise, false}, EpInput::Replicated);
  EpMoeCpuBlock* ep = block.get();
  model->set_moe_block(std::move(block));

  // memory per rank: what this rank holds (weights as the CPU model keeps them) and its measured RSS
  const double expert_bytes_each = 3.0 * c.intermediate_size * H * 2;  // w1, w3, w2 in bf16
  const double mem[2] = {expert_bytes_each * L * placement->num_local(rank), rss_bytes()};
  std::vector<double> all_mem(rank == 0 ? 2 * N : 0);
  comm.gather(mem, sizeof mem, all_mem.data(), 0);
  if (rank == 0) {
    std::printf("loaded in %.2f s (slowest rank)\n", load_s);
    Table t({"rank", "experts per layer", "expert weights (bf16)", "resident memory (RSS)"});
    for (int r = 0; r < N; ++r)
      t.add_row({strf("%d", r), strf("%d of %d", placement->num_local(r), E), human_bytes(all_mem[2 * r]),
                 human_bytes(all_mem[2 * r + 1])});
    std::printf("memory per rank (all %d experts on one process: %s of expert weights; the rest is replicated, "
                "widened to fp32 on the CPU)\n%s",
                E, human_bytes(expert_bytes_each * L * E).c_str(), t.str().c_str());
    std::fflush(stdout);
  }

  // --- greedy generation: prefill every prompt together, then one token per unfinished prompt per step
  std::vector<PhimoeSequence> seqs;
  for (int b = 0; b < B; ++b) seqs.push_back(model->new_sequence());
  std::vector<std::vector<int>> out(B);
  std::vector<int> active(B);
  for (int b = 0; b < B; ++b) active[b] = b;
  std::vector<std::vector<int>> step_tokens = prompts;
  std::vector<int> rank_of_expert(E);
  for (int e = 0; e < E; ++e) rank_of_expert[e] = placement->owner(e);
  {  // warm-up: the first message between two ranks sets up the connection; keep that out of the timings
    std::vector<float> a(N), b(N);
    const std::vector<std::size_t> ones(N, 1);
    comm.alltoallv(a.data(), ones, b.data(), ones, sizeof(float));
  }
  double prefill_ms = 0, decode_ms = 0;
  long prefill_tokens = 0, decode_tokens = 0;
  int steps = 0;
  for (int step = 0; !active.empty(); ++step, ++steps) {
    std::vector<PhimoeSequence*> ptrs;
    for (int b : active) ptrs.push_back(&seqs[b]);
    PhimoeTrace tr;
    comm.barrier();  // time the step from a common start
    WallTimer clk;
    const std::vector<float> logits = model->forward(ptrs, step_tokens, LogitRows::Last, &tr);
    const double ms = comm.max(clk.ms());
    long rows = 0;
    for (const auto& s : step_tokens) rows += long(s.size());
    if (step == 0) {
      prefill_ms = ms;
      prefill_tokens = rows;
    } else {
      decode_ms += ms;
      decode_tokens += rows;
    }
    if (trace.active()) {
      std::vector<int> ids, rot;
      std::vector<std::string> pieces;
      for (const auto& s : step_tokens) ids.insert(ids.end(), s.begin(), s.end());
      for (int id : ids)
        if (tok) pieces.push_back(safe_piece(*tok, id));
      for (int r = 0; r < N; ++r) rot.insert(rot.end(), rows_of(r, N, int(ids.size())).count, r);
      for (int l = 0; l < L; ++l)
        trace.write(step, l, N, E, H, ids, pieces, tr.routing[l], rank_of_expert, rot);
    }
    std::vector<int> still;
    std::vector<std::vector<int>> next;
    for (std::size_t i = 0; i < active.size(); ++i) {
      const int b = active[i];
      const int t = argmax(std::span<const float>(&logits[i * c.vocab_size], c.vocab_size));
      out[b].push_back(t);
      const bool stop = std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end();
      if (int(out[b].size()) < o.max_new_tokens && !stop) {
        still.push_back(b);
        next.push_back({t});
      }
    }
    active = std::move(still);
    step_tokens = std::move(next);
  }

  // --- every rank must have generated the same tokens (they all computed the same logits)
  const std::uint64_t sum = fnv1a(out);
  const std::int64_t sum63 = std::int64_t(sum >> 1);
  const std::vector<std::int64_t> sums = comm.allgather(std::span<const std::int64_t>(&sum63, 1));
  int ranks_agree = 1;
  for (std::int64_t s : sums) ranks_agree &= s == sum63;
  const EpMoeTimes& tm = ep->times();
  const double t_route = comm.max(tm.route_ms), t_disp = comm.max(tm.dispatch_ms), t_exp = comm.max(tm.experts_ms),
               t_comb = comm.max(tm.combine_ms), t_gath = comm.max(tm.gather_ms);

  int pass = 0;
  if (rank == 0) {
    std::printf("\ngenerated (greedy, %d prompt(s) in one batch):\n", B);
    const nlohmann::json texts = print_generated(o, tok, prompts, out);

    const double pf = prefill_ms > 0 ? prefill_tokens / (prefill_ms / 1e3) : 0;
    const double dc = decode_ms > 0 ? decode_tokens / (decode_ms / 1e3) : 0;
    std::printf("\nspeed (CPU, %d rank(s), slowest rank's wall time):\n", N);
    std::printf("  prefill: %ld tokens in %.1f ms = %.1f tokens/s\n", prefill_tokens, prefill_ms, pf);
    std::printf("  decode:  %ld tokens in %.1f ms = %.1f tokens/s (batch %d)\n", decode_tokens, decode_ms, dc, B);
    const double moe = std::max(t_route + t_disp + t_exp + t_comb + t_gath, 1e-9);
    std::printf("  MoE blocks, summed over the run (max over ranks): route %.1f ms (%.0f%%), dispatch %.1f ms "
                "(%.0f%%), experts %.1f ms (%.0f%%), combine %.1f ms (%.0f%%), all-gather %.1f ms (%.0f%%)\n",
                t_route, 100 * t_route / moe, t_disp, 100 * t_disp / moe, t_exp, 100 * t_exp / moe, t_comb,
                100 * t_comb / moe, t_gath, 100 * t_gath / moe);

    // per layer: rows (token choices) per expert and per rank, summed over the run
    const auto [jexp, jrank] = print_routing_counts(ep->counts(), L, E, N);
    if (trace.active()) std::printf("trace: %d steps x %d layers = %d lines in %s\n", steps, L, steps * L, o.trace.c_str());

    std::printf("\ngenerated tokens: fnv1a64=%016llx (equal for every EP size and placement)\n",
                (unsigned long long)sum);

    // --- the check: the single-process model with every expert must give the same tokens
    std::string verdict;
    bool same = ranks_agree != 0;
    const double bytes = double(ckpt->disk_counts().bytes);
    if (!ranks_agree) verdict = "ranks generated different tokens";
    if (same && bytes < kReferenceMaxBytes) {
      std::printf("reference: one process, all %d experts per layer (LocalMoeBlock) ...\n", E);
      std::fflush(stdout);
      PhimoeCpuModel ref = PhimoeCpuModel::load(*ckpt);
      std::vector<std::vector<int>> want = ref.generate(prompts, o.max_new_tokens, -1);
      for (auto& w : want)  // the same stop rule as above
        for (std::size_t i = 0; i < w.size(); ++i)
          if (std::find(stop_ids.begin(), stop_ids.end(), w[i]) != stop_ids.end()) {
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
    pass = same;
    std::printf("%s 05_phi_tiny_ep: N=%d %s, %d prompt(s) x up to %d new tokens: %s\n",
                pass ? "CHECK PASS" : "CHECK FAIL", N, placement_name(placement->kind()), B, o.max_new_tokens,
                verdict.c_str());

    if (!o.common.json.empty()) {
      nlohmann::json j = {{"chapter", "05_phi_tiny_ep"},
                          {"ranks", N},
                          {"device", "cpu"},
                          {"backend", comm.backend()},
                          {"placement", placement_name(placement->kind())},
                          {"model", o.common.model},
                          {"expert_map", [&] {
                             nlohmann::json m = nlohmann::json::array();
                             for (int r = 0; r < N; ++r) m.push_back(placement->experts_of(r));
                             return m;
                           }()},
                          {"prompt_ids", prompts},
                          {"generated_ids", out},
                          {"generated_text", texts},
                          {"tokens_checksum", strf("%016llx", (unsigned long long)sum)},
                          {"prefill", {{"tokens", prefill_tokens}, {"ms", prefill_ms}, {"tokens_per_s", pf}}},
                          {"decode", {{"tokens", decode_tokens}, {"ms", decode_ms}, {"tokens_per_s", dc}, {"batch", B}}},
                          {"moe_ms",
                           {{"route", t_route}, {"dispatch", t_disp}, {"experts", t_exp}, {"combine", t_comb},
                            {"allgather", t_gath}}},
                          {"rows_per_expert", jexp},
                          {"rows_per_rank", jrank},
                          {"verdict", verdict},
                          {"pass", pass != 0}};
      write_json(o.common.json, j);
    }
    std::fflush(stdout);
  }
  comm.bcast(&pass, sizeof pass, 0);  // every rank leaves with rank 0's verdict
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
