// Chapter 05 on GPUs: the whole model, bf16, one GPU per rank.
//
// One data path at every -np N: every rank holds the replicated tensors and only its experts, runs attention
// for the whole batch, and each layer's MoE goes through the MoE engine (chapter 04's, kernels/ep) on its share
// of the rows, then an all-gather (kernels/ep/ep_moe_step.hpp). Every rank computes the same logits, hence the
// same tokens. -np 1 is the engine's one-rank case: every expert on the one GPU, no exchange, decode steps
// replayed as CUDA graphs.
//
// Check: the fp32 CPU reference runs the GPU's own tokens (teacher forcing), and at every step the GPU's token
// must be the reference's argmax for the same prefix, or within kTieMargin * rms(logits row) of the reference's
// best logit (4 x the logits' rel-L2 tolerance 3e-2: tests/gpu/test_phimoe_gpu.cu says why): bf16 activations
// may pick the other token of a near-tie. Following the GPU's tokens keeps every step comparable, where
// comparing two free greedy runs would have to stop at the first near-tie. Every rank must also have generated
// the same tokens.
//
// --bench: the chapter's speed table on random token ids: prefill of one 2048-token prompt, then decode
// tokens/s at batch 1 and batch 16 (each sequence first prefilled with 128 tokens).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>

#include "chapter05.hpp"
#include "device.hpp"
#include "bench_peer.hpp"
#include "ep_moe_step.hpp"
#include "model/phimoe_cpu.hpp"
#include "moe/cost_model.hpp"
#include "moe/routing.hpp"
#include "phimoe_gpu.hpp"
#include "util/check.hpp"
#include "util/report.hpp"
#include "util/rng.hpp"
#include "util/timer.hpp"

namespace eplab {
namespace {

constexpr double kTieMargin = 4 * 3e-2;

// Bench shapes: a 2048-token prefill; decode at batch 1 and 16 after a 128-token prompt each.
constexpr int kBenchPrefill = 2048, kBenchContext = 128, kBenchSteps = 64, kBenchWarmup = 4, kPrefillRuns = 3;

// One row's routing in every layer: expert ids and multipliers, layer after layer.
struct RowRouting {
  std::vector<int> ids;
  std::vector<float> weights;
};

// Did bf16 flip a routing decision of this row against the reference? A different expert, or a multiplier
// more than 1e-2 away (sparsemixer's threshold mask at 2 * jitter_eps is a hard decision too).
// Returns the first layer where the two differ, or -1. k: experts per token (the layout of ids/weights).
int first_flipped_layer(const RowRouting& a, const RowRouting& b, int k) {
  for (std::size_t i = 0; i < a.ids.size(); ++i)
    if (a.ids[i] != b.ids[i] || std::fabs(a.weights[i] - b.weights[i]) > 1e-2f) return int(i) / k;
  return -1;
}

// A flip is legitimate only where the fp32 reference itself decided by a hair: its routing margin (the gap
// between the deciding router logit and its competitor, relative to the logits' scale, moe/routing.hpp)
// below 5x the bf16 model's relative error at the router's input, as tests/gpu/test_model_kernels.cu
// checks against HF. A routing bug flips rows with large margins.
constexpr float kFlipMargin = 5e-2f;

struct GpuRun {
  std::vector<std::vector<int>> out;
  // routing[b][i]: the routing, layer after layer, of the row whose logits gave out[b][i] (when recorded)
  std::vector<std::vector<RowRouting>> routing;
  double prefill_ms = 0, decode_ms = 0;
  long prefill_tokens = 0, decode_tokens = 0;
};

// Greedy generation of every prompt in one batch: one prefill forward for all prompts, then one token per
// sequence per step. A sequence that has stopped keeps being fed its last token (the batch keeps its shape,
// so the decode graph keeps replaying); its output stops growing.
// One row's routing of the last forward, every layer.
RowRouting routing_of_row(const std::vector<Routing>& layers, int row) {
  RowRouting rr;
  for (const Routing& r : layers)
    for (int j = 0; j < r.k; ++j) {
      rr.ids.push_back(r.id(row, j));
      rr.weights.push_back(r.weight(row, j));
    }
  return rr;
}

// Called after every forward (outside the timed part) with the tokens it was fed and every layer's routing
// of its rows (the EP step gathers them from all ranks: every rank calls it).
using StepHook = std::function<void(int step, const std::vector<std::vector<int>>& fed, const std::vector<Routing>&)>;

GpuRun generate(GpuPhimoeModel& model, const std::vector<std::vector<int>>& prompts, int max_new,
                const std::vector<int>& stop_ids, bool record_routing, const StepHook& hook) {
  const int B = int(prompts.size()), V = model.config().vocab_size;
  GpuRun r;
  r.out.assign(std::size_t(B), {});
  r.routing.assign(std::size_t(B), {});
  std::vector<bool> done(std::size_t(B), false);
  model.reset();
  WallTimer clk;
  std::vector<float> logits = model.forward_batch(prompts);
  r.prefill_ms = clk.ms();
  std::vector<int> last_rows;
  for (const auto& p : prompts) {
    r.prefill_tokens += long(p.size());
    last_rows.push_back(int(r.prefill_tokens) - 1);
  }
  std::vector<std::vector<int>> fed = prompts;
  for (int step = 0;; ++step) {
    if (record_routing || hook) {  // outside the timed forwards: it synchronises and copies every layer's routing
      const std::vector<Routing> rt = model.last_routing();
      if (record_routing)
        for (int b = 0; b < B; ++b)
          if (!done[b]) r.routing[b].push_back(routing_of_row(rt, last_rows[b]));
      if (hook) hook(step, fed, rt);
    }
    for (int b = 0; b < B; ++b) last_rows[b] = b;  // decode: one row per sequence
    std::vector<std::vector<int>> next(static_cast<std::size_t>(B));
    int live = 0;
    for (int b = 0; b < B; ++b) {
      const int t = argmax(std::span<const float>(&logits[std::size_t(b) * V], std::size_t(V)));
      if (!done[b]) {
        r.out[b].push_back(t);
        done[b] = int(r.out[b].size()) == max_new || std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end();
      }
      live += !done[b];
      next[b] = {done[b] ? r.out[b].back() : t};
    }
    if (live == 0) break;
    fed = next;
    clk.reset();
    logits = model.forward_batch(next);
    r.decode_ms += clk.ms();
    r.decode_tokens += live;
  }
  return r;
}

// The fp32 CPU model along the GPU's tokens (chapter header). Returns "" on success, else what failed.
// A token whose row the GPU routed differently from the reference in some layer (a routing flip) is not
// judged by its logits: the two models ran different experts for it. The first flip of a sequence must sit
// at a near-tie of the reference's router (kFlipMargin) in the first layer that differs; after it, the
// sequence's K/V differ, so later flips of that sequence are counted without a margin test. On the generated
// models many rows flip (their routers share a large common direction, generator.cpp: bf16 noise crosses
// sparsemixer's mask), on a realistic router few do; at least one token in 8 must be judged, and every
// judged token must pass. (Only the last prompt row's routing is recorded: a flip in an earlier prompt row
// shows only through the logits, which the near-tie margin of the token check still bounds.)
std::string check_against_cpu(const Checkpoint& ckpt, const std::vector<std::vector<int>>& prompts,
                              const GpuRun& run, std::string& note) {
  const std::vector<std::vector<int>>& out = run.out;
  const ModelConfig& c = ckpt.config();
  const int V = c.vocab_size, E = c.num_local_experts, k = c.num_experts_per_tok;
  PhimoeCpuModel ref = PhimoeCpuModel::load(ckpt);
  int exact = 0, near = 0, flips = 0, tokens = 0;
  float worst_first_flip = 0.f;
  std::string near_note;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    PhimoeSequence seq = ref.new_sequence();
    std::vector<PhimoeSequence*> ptrs{&seq};
    std::vector<std::vector<int>> step{prompts[b]};
    bool flipped_before = false;
    for (std::size_t i = 0; i < out[b].size(); ++i) {
      PhimoeTrace tr;
      const std::vector<float> lg = ref.forward(ptrs, step, LogitRows::Last, &tr);
      const int want = argmax(lg), got = out[b][i];
      const int row = tr.routing[0].tokens - 1;
      ++tokens;
      const int l = first_flipped_layer(routing_of_row(tr.routing, row), run.routing[b][i], k);
      if (l >= 0) {
        ++flips;  // different experts ran for this row: not comparable
        if (!flipped_before) {
          const float m = routing_margin(c.router, tr.router_logits[std::size_t(l)], row, E, c.router_jitter_noise);
          if (m > kFlipMargin)
            return strf("prompt %zu, new token %zu: the GPU routed layer %d differently from the fp32 reference, "
                        "whose decision margin there is %.3g > %.3g: not a bf16 near-tie (a routing bug)",
                        b, i, l, m, kFlipMargin);
          worst_first_flip = std::max(worst_first_flip, m);
        }
        flipped_before = true;
        step = std::vector<std::vector<int>>{std::vector<int>{got}};
        continue;
      }
      double ss = 0;
      for (float x : lg) ss += double(x) * x;
      const double margin = kTieMargin * std::sqrt(ss / V);
      const double behind = double(lg[want]) - double(lg[got]);  // the GPU's pick below the reference's best
      if (got == want) {
        ++exact;
      } else if (behind <= margin) {
        if (near++ == 0)
          near_note = strf(" (first: prompt %zu, new token %zu: GPU %d, reference %d, %.3g below it <= margin %.3g)",
                           b, i, got, want, behind, margin);
      } else {
        return strf("prompt %zu, new token %zu: GPU gave %d, the CPU reference %d for the same prefix; the GPU's "
                    "token is %.3g below the best logit, more than the bf16 margin %.3g",
                    b, i, got, want, behind, margin);
      }
      step = std::vector<std::vector<int>>{std::vector<int>{got}};  // the reference follows the GPU's tokens
    }
  }
  if ((tokens - flips) * 8 < tokens)
    return strf("%d of %d tokens came from rows the GPU routed differently from the fp32 reference: too few "
                "left to judge", flips, tokens);
  note = strf("every GPU token is the fp32 CPU reference's greedy choice for the same prefix: %d exact, %d within "
              "the bf16 near-tie margin%s, %d from a row routed differently (each sequence's first such row at a "
              "reference routing margin <= %.3g, the bound %.3g)",
              exact, near, near_note.c_str(), flips, worst_first_flip, kFlipMargin);
  return "";
}

std::vector<int> random_ids(Rng& rng, int n, int V) {
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (int& id : ids) id = int(rng.next_u64() % std::uint64_t(V));
  return ids;
}

// Decode tokens/s at batch B: prefill kBenchContext random tokens per sequence, a few warm-up steps (graph
// capture), then kBenchSteps timed steps.
double bench_decode(GpuPhimoeModel& model, Rng& rng, int B) {
  const int V = model.config().vocab_size;
  std::vector<std::vector<int>> prompts;
  for (int b = 0; b < B; ++b) prompts.push_back(random_ids(rng, kBenchContext, V));
  model.reset();
  std::vector<float> logits = model.forward_batch(prompts);
  auto next = [&] {
    std::vector<std::vector<int>> n(static_cast<std::size_t>(B));
    for (int b = 0; b < B; ++b) n[b] = {argmax(std::span<const float>(&logits[std::size_t(b) * V], std::size_t(V)))};
    return n;
  };
  for (int i = 0; i < kBenchWarmup; ++i) logits = model.forward_batch(next());
  WallTimer clk;
  for (int i = 0; i < kBenchSteps; ++i) logits = model.forward_batch(next());
  return double(kBenchSteps) * B / (clk.ms() / 1e3);
}

}  // namespace

int run_gpu(const Options& o, dist::Communicator& mpi, const Checkpoint& ckpt, const Placement& placement,
            const std::optional<Tokenizer>& tok, const std::vector<std::vector<int>>& prompts,
            const std::vector<int>& stop_ids, TraceWriter& trace) {
  const ModelConfig& c = ckpt.config();
  const int rank = mpi.rank(), N = mpi.size(), V = c.vocab_size, L = c.num_hidden_layers, E = c.num_local_experts;
  auto say = [&](const std::string& s) {
    if (rank == 0) {
      std::fputs(s.c_str(), stdout);
      std::fflush(stdout);
    }
  };

  // --- one GPU per rank: NCCL for N >= 2 (it picks the GPU by local rank and fails on every rank with one
  //     line when there are more ranks than GPUs); the first GPU for N = 1
  std::unique_ptr<dist::Communicator> nccl;
  std::string gpu_name;
  dist::all_or_none(mpi, [&] {
    nccl = dist::make_nccl_communicator();
    gpu_name = nccl->describe();
  });
  say(strf("05_phi_tiny_ep: %d rank(s), --device gpu: %s\n", N, gpu_name.c_str()));
  say(strf("model %s: %d layers, hidden %d, %d experts (top-%d, %s), vocab %d\n", o.common.model.c_str(), L,
           c.hidden_size, E, c.num_experts_per_tok, router_name(c.router), V));
  if (N >= 2) say(placement.str());
  if (tok) say(strf("tokenizer %s (%d tokens)\n", tok->path().c_str(), tok->vocab_size()));
  else say("no tokenizer: prompts and output as token ids\n");

  // --- shapes: the batch of prompts, or the benchmark's
  const int B = o.bench ? 16 : int(prompts.size());
  int max_len = 0, rows = 0;
  if (o.bench) {
    max_len = std::max(kBenchPrefill, kBenchContext + kBenchWarmup + kBenchSteps + 1);
    rows = std::max(kBenchPrefill, 16 * kBenchContext);
  } else {
    for (const auto& p : prompts) {
      max_len = std::max(max_len, int(p.size()) + o.max_new_tokens);
      rows += int(p.size());
    }
  }

  // --- load: replicated tensors + this rank's experts (N >= 2) or all of them (N = 1)
  say(strf("loading %d layers to the GPU%s (bf16): norms, attention, router + %s (MoE: %s) ...\n", L,
           N > 1 ? "s" : "", N > 1 ? "this rank's experts" : strf("all %d experts", E).c_str(),
           N > 1 ? "the EP engine, NCCL" : "the engine's one-rank case, CUDA graphs"));
  WallTimer load_clk;
  std::optional<GpuPhimoeModel> model;
  // A progress bar on rank 0 (every rank loads at about the same pace): one line, redrawn per layer.
  const LoadProgress progress = [&](const char* what, int done, int layers) {
    if (rank != 0) return;
    constexpr int kWidth = 32;
    const int filled = layers ? done * kWidth / layers : kWidth;
    std::printf("\r  %-9s [%s%s] %2d/%d layers (%.1f s)%s", what, std::string(std::size_t(filled), '#').c_str(),
                std::string(std::size_t(kWidth - filled), '.').c_str(), done, layers, load_clk.ms() / 1e3,
                done == layers ? "\n" : "");
    std::fflush(stdout);
  };
  dist::all_or_none(mpi, [&] {
    GpuModelOptions mo;
    mo.progress = progress;
    mo.max_len = max_len;
    mo.max_batch = B;
    mo.max_rows = rows;
    mo.moe = make_ep_moe_step(*nccl, placement, ckpt, EpLayout::InPlace, progress);
    mo.stream = nccl->stream();
    model.emplace(GpuPhimoeModel::load(ckpt, std::move(mo)));
  });
  // Warm-up, after every rank has loaded (it is a collective under EP: inside the load's all_or_none, a rank
  // that failed to load would leave the others waiting in NCCL): cuBLAS handles, lazy module loading and NCCL
  // connections stay out of the timings.
  model->forward({0});
  model->reset();
  const double load_s = mpi.max(load_clk.ms() / 1e3);

  // --- memory per rank: measured (cudaMemGetInfo) next to chapter 00's model of the weights
  const double mine[4] = {double(model->weight_bytes()), double(model->kv_cache_bytes()),
                          double(gpu_memory_used_bytes()), double(placement.num_local(rank))};
  std::vector<double> all(rank == 0 ? 4 * std::size_t(N) : 0);
  mpi.gather(mine, sizeof mine, all.data(), 0);
  if (rank == 0) {
    const EpMemory pred = ep_memory(c, N);
    std::printf("loaded in %.2f s (slowest rank); %s\n", load_s, model->moe().describe().c_str());
    Table t({"rank", "experts/layer", "weights on GPU", "chapter 00 predicts", "KV cache", "in use (cudaMemGetInfo)"});
    for (int r = 0; r < N; ++r) {
      const double* m = &all[4 * std::size_t(r)];
      const double predicted = pred.replicated_bytes + (N == 1 ? pred.expert_bytes_per_gpu
                                                                : pred.expert_bytes_per_gpu * m[3] / pred.experts_per_gpu_max);
      t.add_row({strf("%d", r), strf("%d of %d", int(m[3]), E), human_bytes(m[0]), human_bytes(predicted),
                 human_bytes(m[1]), human_bytes(m[2])});
    }
    std::printf("memory per GPU (in use = weights + KV cache for %d x %d positions + activations + CUDA context "
                "and workspaces):\n%s",
                B, max_len, t.str().c_str());
    std::fflush(stdout);
  }

  // --- the benchmark
  if (o.bench) {
    Rng rng(o.common.seed);
    model->reset();
    const std::vector<int> long_prompt = random_ids(rng, kBenchPrefill, V);
    // One untimed prefill first: the buffers grow to 2048 rows and cuBLAS picks its kernels for the shapes.
    // Then the median of kPrefillRuns (the slowest rank's time each).
    model->forward_batch({long_prompt});
    std::vector<double> runs;
    for (int i = 0; i < kPrefillRuns; ++i) {
      model->reset();
      WallTimer clk;
      model->forward_batch({long_prompt});
      runs.push_back(mpi.max(clk.ms()));
    }
    std::sort(runs.begin(), runs.end());
    const double prefill_ms = runs[runs.size() / 2];
    const double prefill_tps = prefill_ms > 0 ? kBenchPrefill / (prefill_ms / 1e3) : 0;
    const double d1 = bench_decode(*model, rng, 1), d16 = bench_decode(*model, rng, 16);
    const double dec1 = -mpi.max(-d1), dec16 = -mpi.max(-d16);  // the slowest rank's rate
    if (rank == 0) {
      // The peer, measured in this machine session (--peer-json), or nothing: no quoted numbers.
      const ModelPeer peer = load_model_peer(o.peer_json);
      Table t({"measurement", "tokens/s", "HF peer (best impl)", "vs HF"});
      auto row = [&](const std::string& what, double ours, double hf, const std::string& impl, const char* fmt) {
        t.add_row({what, strf(fmt, ours), peer.present ? strf(fmt, hf) + " (" + impl + ")" : "-",
                   peer.present ? strf("%.2fx", ours / hf) : "-"});
      };
      row(strf("prefill, one %d-token prompt", kBenchPrefill), prefill_tps, peer.prefill, peer.prefill_impl, "%.0f");
      row("decode, batch 1", dec1, peer.decode_b1, peer.decode_b1_impl, "%.1f");
      row("decode, batch 16", dec16, peer.decode_b16, peer.decode_b16_impl, "%.1f");
      std::printf("\nspeed, EP = %d (%s; decode: %d steps after %d warm-up steps, %d-token context%s):\n%s", N,
                  gpu_name.c_str(), kBenchSteps, kBenchWarmup, kBenchContext,
                  model->graphs_captured() ? ", CUDA graphs" : ", no CUDA graphs", t.str().c_str());
      std::printf("batch-1 ceiling: the active weights per token (%.2f B params, %s) read at the measured HBM "
                  "bandwidth; see the chapter README\n",
                  double(count_params(c).active_per_token) / 1e9, human_bytes(2.0 * count_params(c).active_per_token).c_str());
      if (!o.common.json.empty())
        write_json(o.common.json, {{"chapter", "05_phi_tiny_ep"},
                                   {"bench", true},
                                   {"ranks", N},
                                   {"gpu", gpu_name},
                                   {"prefill_tokens_per_s", prefill_tps},
                                   {"decode_batch1_tokens_per_s", dec1},
                                   {"decode_batch16_tokens_per_s", dec16},
                                   {"peer", peer.present ? nlohmann::json{{"prefill_tokens_per_s", peer.prefill},
                                                                          {"decode_batch1_tokens_per_s", peer.decode_b1},
                                                                          {"decode_batch16_tokens_per_s", peer.decode_b16}}
                                                         : nlohmann::json(nullptr)},
                                   {"graphs", model->graphs_captured()}});
      std::printf("CHECK PASS 05_phi_tiny_ep --bench: EP=%d\n", N);
    }
    return 0;
  }

  // --- greedy generation, every prompt in one batch
  const bool checking = double(ckpt.disk_counts().bytes) < kReferenceMaxBytes;
  // Per layer: rows per expert, and the rank-to-rank traffic of rows (token's rank -> expert's rank), over
  // the whole run; and the --trace lines. Row r of a forward belongs to the rank rows_of() gives it (the
  // EP step's shares). Unlike the CPU path, a sequence that has stopped keeps its row in the batch (the
  // decode graph keeps its shape), so its rows are counted and traced too.
  EpMoeCounts counts;
  counts.expert_rows.assign(std::size_t(L), std::vector<std::int64_t>(std::size_t(E), 0));
  counts.traffic.assign(std::size_t(L), std::vector<std::int64_t>(std::size_t(N) * N, 0));
  std::vector<int> rank_of_expert(static_cast<std::size_t>(E));
  for (int e = 0; e < E; ++e) rank_of_expert[e] = placement.owner(e);
  int steps = 0;
  const StepHook hook = [&](int step, const std::vector<std::vector<int>>& fed, const std::vector<Routing>& rt) {
    steps = step + 1;
    if (rank != 0) return;
    std::vector<int> ids, rank_of_row;
    std::vector<std::string> pieces;
    for (const auto& f : fed) ids.insert(ids.end(), f.begin(), f.end());
    for (int r = 0; r < N; ++r) rank_of_row.insert(rank_of_row.end(), rows_of(r, N, int(ids.size())).count, r);
    if (tok)
      for (int id : ids) pieces.push_back(safe_piece(*tok, id));
    for (int l = 0; l < L; ++l) {
      const Routing& r = rt[std::size_t(l)];
      for (int t = 0; t < r.tokens; ++t)
        for (int j = 0; j < r.k; ++j) {
          const int e = r.id(t, j);
          if (e < 0 || e >= E) continue;
          ++counts.expert_rows[l][e];
          ++counts.traffic[l][std::size_t(rank_of_row[t]) * N + rank_of_expert[e]];
        }
      if (trace.active())
        trace.write({step, l, N, E, c.hidden_size, ids, pieces, r, rank_of_expert, rank_of_row, /*probs=*/{}});
    }
  };
  GpuRun run = generate(*model, prompts, o.max_new_tokens, stop_ids, checking, hook);
  const double prefill_ms = mpi.max(run.prefill_ms), decode_ms = mpi.max(run.decode_ms);
  const std::uint64_t sum = fnv1a(run.out);
  const std::int64_t sum63 = std::int64_t(sum >> 1);
  int ranks_agree = 1;
  for (std::int64_t s : mpi.allgather(std::span<const std::int64_t>(&sum63, 1))) ranks_agree &= s == sum63;

  int pass = 0;
  if (rank == 0) {
    std::printf("\ngenerated (greedy, %d prompt(s) in one batch):\n", int(prompts.size()));
    const nlohmann::json texts = print_generated(o, tok, prompts, run.out);
    const double pf = prefill_ms > 0 ? run.prefill_tokens / (prefill_ms / 1e3) : 0;
    const double dc = decode_ms > 0 ? run.decode_tokens / (decode_ms / 1e3) : 0;
    std::printf("\nspeed (GPU, %d rank(s), CUDA-synchronised wall time of the slowest rank%s):\n", N,
                model->graphs_captured() ? ", decode steps as CUDA graphs" : "");
    std::printf("  prefill: %ld tokens in %.1f ms = %.1f tokens/s\n", run.prefill_tokens, prefill_ms, pf);
    std::printf("  decode:  %ld tokens in %.1f ms = %.1f tokens/s (batch %d)\n", run.decode_tokens, decode_ms, dc,
                int(prompts.size()));
    const auto [jexp, jrank] = print_routing_counts(counts, L, E, N);
    if (trace.active()) std::printf("trace: %d steps x %d layers = %d lines\n", steps, L, steps * L);
    std::printf("\ngenerated tokens: fnv1a64=%016llx\n", (unsigned long long)sum);

    std::string verdict;
    bool ok = ranks_agree != 0;
    if (!ok) {
      verdict = "ranks generated different tokens";
    } else if (checking) {
      std::printf("reference: the fp32 CPU model, all %d experts per layer ...\n", E);
      std::fflush(stdout);
      std::string note;
      verdict = check_against_cpu(ckpt, prompts, run, note);
      ok = verdict.empty();
      if (ok) verdict = note + (N > 1 ? strf("; all %d ranks generated the same tokens", N) : "");
    } else {
      verdict = strf("reference skipped: the checkpoint is %s (> %s), too big for a second copy on the CPU; all %d "
                     "rank(s) generated the same tokens",
                     human_bytes(double(ckpt.disk_counts().bytes)).c_str(), human_bytes(kReferenceMaxBytes).c_str(), N);
    }
    pass = ok;
    std::printf("%s 05_phi_tiny_ep: N=%d gpu, %d prompt(s) x up to %d new tokens: %s\n",
                pass ? "CHECK PASS" : "CHECK FAIL", N, int(prompts.size()), o.max_new_tokens, verdict.c_str());
    if (!o.common.json.empty())
      write_json(o.common.json,
                 {{"chapter", "05_phi_tiny_ep"},
                  {"ranks", N},
                  {"device", "gpu"},
                  {"gpu", gpu_name},
                  {"placement", placement_name(placement.kind())},
                  {"model", o.common.model},
                  {"prompt_ids", prompts},
                  {"generated_ids", run.out},
                  {"generated_text", texts},
                  {"tokens_checksum", strf("%016llx", (unsigned long long)sum)},
                  {"prefill", {{"tokens", run.prefill_tokens}, {"ms", prefill_ms}, {"tokens_per_s", pf}}},
                  {"decode",
                   {{"tokens", run.decode_tokens}, {"ms", decode_ms}, {"tokens_per_s", dc}, {"batch", int(prompts.size())}}},
                  {"rows_per_expert", jexp},
                  {"rows_per_rank", jrank},
                  {"weight_bytes", model->weight_bytes()},
                  {"gpu_memory_used_bytes", gpu_memory_used_bytes()},
                  {"verdict", verdict},
                  {"pass", pass != 0}});
    std::fflush(stdout);
  }
  // Every rank leaves with rank 0's verdict; rank 0's single-process reference may outlast the watchdog's limit.
  mpi.set_long_wait(true);
  mpi.bcast(&pass, sizeof pass, 0);
  mpi.set_long_wait(false);
  return pass ? 0 : 1;
}

}  // namespace eplab
