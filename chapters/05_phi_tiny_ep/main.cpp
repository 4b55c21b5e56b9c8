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
// Run: scripts/mpirun.sh -np 4 05_phi_tiny_ep --prompt "The capital of France is" --max-new-tokens 16
//      scripts/mpirun.sh -np 2 05_phi_tiny_ep --device gpu --prompt-ids 1,450,4996 --max-new-tokens 16
//      scripts/mpirun.sh -np 1 05_phi_tiny_ep --device gpu --model PHI_TINY_DIR --bench
//      scripts/mpirun.sh -np 2 05_phi_tiny_ep --model DIR --prompt "The capital of France is" --chat --trace run.jsonl
//
// This file is the CPU lesson: load my experts, generate, check. The options, prompts and the reference
// check are in setup.cpp, the printing helpers in chapter05.cpp, the GPU path in run_gpu.cpp.
#include <algorithm>
#include <optional>

#include "chapter05.hpp"
#include "dist/communicator.hpp"
#include "model/phimoe_cpu.hpp"
#include "moe/ep_moe_cpu.hpp"
#include "setup.hpp"
#include "util/check.hpp"
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
  Ch05Setup setup;
  TraceWriter trace;
  if (auto early = setup_ch05(comm, argc, argv, o, setup, trace)) return *early;
  if (o.common.device == "gpu")
    return run_gpu(o, comm, *setup.ckpt, *setup.placement, setup.tok, setup.prompts, setup.stop_ids, trace);
  const Checkpoint& ckpt = *setup.ckpt;
  const Placement& placement = *setup.placement;
  const std::optional<Tokenizer>& tok = setup.tok;
  const std::vector<std::vector<int>>& prompts = setup.prompts;
  const std::vector<int>& stop_ids = setup.stop_ids;
  const ModelConfig& c = ckpt.config();
  const int L = c.num_hidden_layers, E = c.num_local_experts, H = c.hidden_size, B = int(prompts.size());

  print_ch05_header(o, setup, comm);

  // --- load: replicated tensors + my experts only; rank 0 prints one line per layer
  WallTimer load_clk;
  std::optional<PhimoeCpuModel> model;
  const std::vector<int>& mine = placement.experts_of(rank);
  dist::all_or_none(comm, [&] {
    PhimoeLoadOptions lo;
    lo.experts = [&](int l) {
      say(strf("loading layer %d/%d: norms, attention, router + experts {%s} (%.1f s)\n", l + 1, L,
               id_list(mine, 64).c_str(), load_clk.ms() / 1e3));
      return mine;
    };
    model.emplace(PhimoeCpuModel::load(ckpt, lo));
  });
  const double load_s = comm.max(load_clk.ms() / 1e3);
  auto block = std::make_unique<EpMoeCpuBlock>(
      comm, placement, model->moe_weights(),
      MoeRefOptions{{c.router, c.num_experts_per_tok, c.router_jitter_noise}, false}, EpInput::Replicated);
  EpMoeCpuBlock* ep = block.get();
  model->set_moe_block(std::move(block));

  print_cpu_memory_per_rank(comm, placement, c, load_s);

  // --- greedy generation: prefill every prompt together, then one token per unfinished prompt per step
  std::vector<PhimoeSequence> seqs;
  for (int b = 0; b < B; ++b) seqs.push_back(model->new_sequence());
  std::vector<std::vector<int>> out(B);
  std::vector<int> active(B);
  for (int b = 0; b < B; ++b) active[b] = b;
  std::vector<std::vector<int>> step_tokens = prompts;
  std::vector<int> rank_of_expert(E);
  for (int e = 0; e < E; ++e) rank_of_expert[e] = placement.owner(e);
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
        trace.write({step, l, N, E, H, ids, pieces, tr.routing[l], rank_of_expert, rot, /*probs=*/{}});
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
    bool same = false;
    const std::string verdict = compare_with_single_process(setup, o.max_new_tokens, out, ranks_agree != 0, N, &same);
    pass = same;
    std::printf("%s 05_phi_tiny_ep: N=%d %s, %d prompt(s) x up to %d new tokens: %s\n",
                pass ? "CHECK PASS" : "CHECK FAIL", N, placement_name(placement.kind()), B, o.max_new_tokens,
                verdict.c_str());

    if (!o.common.json.empty()) {
      nlohmann::json j = {{"chapter", "05_phi_tiny_ep"},
                          {"ranks", N},
                          {"device", "cpu"},
                          {"backend", comm.backend()},
                          {"placement", placement_name(placement.kind())},
                          {"model", o.common.model},
                          {"expert_map", expert_map_json(placement)},
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
  // Every rank leaves with rank 0's verdict; rank 0's single-process reference may outlast the watchdog's limit.
  comm.set_long_wait(true);
  comm.bcast(&pass, sizeof pass, 0);
  comm.set_long_wait(false);
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace eplab

int main(int argc, char** argv) {
  return eplab::dist::mpi_main(argc, argv, [&] { return eplab::run(argc, argv); });
}
