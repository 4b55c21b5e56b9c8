// GpuPhimoeModel: the layer loop of phimoe_gpu.hpp over the topic kernels, for a batch of sequences, plus
// the decode-step CUDA graphs. No kernels of its own.
#include "phimoe_gpu.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <utility>

#include "attention.cuh"
#include "cuda_check.hpp"
#include "device_buffer.hpp"
#include "embedding.cuh"
#include "layernorm.cuh"
#include "linear.cuh"
#include "model/phimoe_cpu.hpp"  // argmax (ties to the lowest id, like the CPU model)
#include "moe_gpu.hpp"
#include "permute.cuh"
#include "rope.cuh"
#include "util/check.hpp"

namespace eplab {
namespace {

using gpu::bf16;

// bf16 as the kernels take it; the host keeps bf16 as bf16_bits (same 16 bits).
static_assert(sizeof(bf16) == sizeof(bf16_bits));
bf16* B(const DeviceBuffer<bf16_bits>& a) { return reinterpret_cast<bf16*>(a.get()); }

struct LayerWeights {
  DeviceBuffer<bf16_bits> ln_in_w, ln_in_b, ln_post_w, ln_post_b;
  DeviceBuffer<bf16_bits> qw, qb, kw, kb, vw, vb, ow, ob;  // biases empty when attention_bias is false
  DeviceBuffer<bf16_bits> k_cache, v_cache;                // [max_batch, max_len, kv_heads, head_dim]
};

// ------------------------------------------------------------------ every expert on this GPU
class LocalMoeStep final : public GpuMoeStep {
 public:
  LocalMoeStep(const Checkpoint& ckpt, const LoadProgress& progress) {
    const ModelConfig& c = ckpt.config();
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      if (progress) progress("experts", l, c.num_hidden_layers);
      layers_.push_back(std::make_unique<GpuMoeLayer>(load_moe_layer(ckpt, l), c.router, c.num_experts_per_tok,
                                                      c.router_jitter_noise));
      // The model captures whole decode steps; a layer capturing its own graph inside that would fail.
      layers_.back()->set_use_graphs(false);
      bytes_ += layers_.back()->weight_bytes();
    }
    experts_ = c.num_local_experts;
  }
  void forward(int layer, const void* d_h, int R, void* d_y, CUstream_st* s) override {
    layers_.at(std::size_t(layer))
        ->forward_device(static_cast<const bf16*>(d_h), R, static_cast<bf16*>(d_y), MoePath::Grouped, s);
  }
  bool graph_safe() const override { return true; }  // decode batches take the weight-stream path (no sync)
  std::size_t weight_bytes() const override { return bytes_; }
  std::string describe() const override { return "all " + std::to_string(experts_) + " experts on this GPU"; }
  Routing last_routing(int layer, int rows) override { return layers_.at(std::size_t(layer))->last_routing(rows); }
  std::uint64_t buffers_epoch() const override {
    std::uint64_t e = 0;
    for (const auto& l : layers_) e = e * 0x9E3779B97F4A7C15ull + l->buffers_generation();
    return e;
  }

 private:
  std::vector<std::unique_ptr<GpuMoeLayer>> layers_;
  std::size_t bytes_ = 0;
  int experts_ = 0;
};

}  // namespace

void GpuMoeStep::synchronize(CUstream_st* s) { CUDA_CHECK(cudaStreamSynchronize(s)); }

std::unique_ptr<GpuMoeStep> make_local_moe_step(const Checkpoint& ckpt, const LoadProgress& progress) {
  std::unique_ptr<GpuMoeStep> step = std::make_unique<LocalMoeStep>(ckpt, progress);
  if (progress) progress("experts", ckpt.config().num_hidden_layers, ckpt.config().num_hidden_layers);
  return step;
}

struct GpuPhimoeModel::Impl {
  ModelConfig c;
  int max_len = 0, max_batch = 1, max_rows = 0;
  std::vector<int> lens;  // tokens in each sequence's cache
  std::size_t weight_bytes = 0;
  cudaStream_t stream{};
  bool own_stream = false;
  cublasHandle_t cublas{};
  DeviceBuffer<char> cublas_ws;  // a fixed workspace: cuBLAS must not allocate inside a graph capture
  std::unique_ptr<gpu::RopeTable> rope;
  DeviceBuffer<bf16_bits> embed, final_w, final_b, lm_w, lm_b;  // lm_w empty when tied to the embedding
  std::vector<LayerWeights> layers;
  std::unique_ptr<GpuMoeStep> moe;
  // activations for up to max_rows rows: x residual stream, h normed, q/a [*, heads*D], k/v [*, kv*D],
  // o attention projection, y MoE output; xl/yl/hl the last row of each sequence
  DeviceBuffer<bf16_bits> x, h, q, k, v, a, o, y, xl, yl, hl;
  // row metadata, one upload per forward: [ids (max_rows) | seq (max_rows) | pos (max_rows) | last (max_batch)]
  DeviceBuffer<int> d_meta;
  PinnedBuffer<int> h_meta;
  DeviceBuffer<float> logits;  // [max_batch, vocab]
  PinnedBuffer<float> h_logits;
  // decode graphs by batch size: seen once (eager), then captured; failed = capture not possible
  bool graphs = true;
  std::map<int, int> decode_seen;
  std::map<int, cudaGraphExec_t> graph_execs;
  std::set<int> graph_failed;
  std::uint64_t graphs_epoch = 0;  // the MoE step's buffers_epoch() the graphs were captured with
  int last_rows = 0;               // rows of the last forward (last_routing)

  int* d_ids() const { return d_meta.get(); }
  int* d_seq() const { return d_meta.get() + max_rows; }
  int* d_pos() const { return d_meta.get() + 2 * std::size_t(max_rows); }
  int* d_last() const { return d_meta.get() + 3 * std::size_t(max_rows); }

  ~Impl() {
    drop_graphs();
    layers.clear();
    moe.reset();  // MoE layers and device arrays free before the stream and handle go
    if (cublas) cublasDestroy(cublas);
    if (own_stream && stream) cudaStreamDestroy(stream);
  }

  DeviceBuffer<bf16_bits> upload(const Checkpoint& ckpt, const std::string& name, std::vector<std::int64_t> shape) {
    DeviceBuffer<bf16_bits> d(ckpt.read_bf16(name, shape));
    weight_bytes += d.bytes();
    return d;
  }

  void poison_caches() {  // 0xFF bytes = bf16 NaN: a row read before it is written poisons the logits
    for (auto& L : layers) {
      CUDA_CHECK(cudaMemsetAsync(L.k_cache.get(), 0xFF, L.k_cache.bytes(), stream));
      CUDA_CHECK(cudaMemsetAsync(L.v_cache.get(), 0xFF, L.v_cache.bytes(), stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // The whole forward for R rows of nb sequences, enqueued on `stream` (h_meta already filled): upload the
  // row metadata, every layer, the last rows' logits, and their copy to h_logits. No host synchronisation
  // here, except what the MoE step does (the EP step waits for message sizes).
  void enqueue(int R, int nb) {
    const int H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
    const int NH = c.num_attention_heads, KVH = c.num_key_value_heads, NQ = NH * D;
    const float eps = c.rms_norm_eps;
    cudaStream_t s = stream;
    // the four sections of the metadata are max_rows apart: copy the whole block (a few KB at most)
    CUDA_CHECK(cudaMemcpyAsync(d_meta.get(), h_meta.get(), d_meta.bytes(), cudaMemcpyHostToDevice, s));
    gpu::embedding(B(embed), V, H, d_ids(), R, B(x), /*d_error=*/nullptr, s);  // ids checked on the host
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      LayerWeights& L = layers[l];
      if (l == 0)
        gpu::layer_norm(B(x), B(L.ln_in_w), B(L.ln_in_b), R, H, eps, B(h), s);
      else  // x += previous layer's MoE output, h = LN_in(x)
        gpu::add_layer_norm(B(x), B(y), B(x), B(L.ln_in_w), B(L.ln_in_b), R, H, eps, B(h), s);
      gpu::linear(cublas, B(h), R, H, B(L.qw), NQ, B(L.qb), B(q), s);  // B(empty) = null: no bias
      gpu::linear(cublas, B(h), R, H, B(L.kw), KVH * D, B(L.kb), B(k), s);
      gpu::linear(cublas, B(h), R, H, B(L.vw), KVH * D, B(L.vb), B(v), s);
      gpu::rope_inplace_rows(B(q), NH, B(k), KVH, R, d_pos(), *rope, s);
      gpu::kv_append_rows(B(k), B(v), R, KVH, D, d_seq(), d_pos(), B(L.k_cache), B(L.v_cache), max_len, s);
      gpu::attention_rows(B(q), R, NH, KVH, D, d_seq(), d_pos(), B(L.k_cache), B(L.v_cache), max_len,
                          c.sliding_window, B(a), s);
      gpu::linear(cublas, B(a), R, NQ, B(L.ow), H, B(L.ob), B(o), s);
      // x += o, h = LN_post(x)
      gpu::add_layer_norm(B(x), B(o), B(x), B(L.ln_post_w), B(L.ln_post_b), R, H, eps, B(h), s);
      moe->forward(l, B(h), R, B(y), s);
    }
    // Only each sequence's last row needs logits: gather x and y there, x += y, LN_final, lm_head (fp32).
    gpu::gather_rows(B(x), R, d_last(), nb, H, B(xl), s);
    gpu::gather_rows(B(y), R, d_last(), nb, H, B(yl), s);
    gpu::add_layer_norm(B(xl), B(yl), B(xl), B(final_w), B(final_b), nb, H, eps, B(hl), s);
    const bf16* lm = c.tie_word_embeddings ? B(embed) : B(lm_w);
    gpu::linear_f32(cublas, B(hl), nb, H, lm, V, B(lm_b), logits.get(), s);
    CUDA_CHECK(cudaMemcpyAsync(h_logits.get(), logits.get(), sizeof(float) * std::size_t(nb) * V,
                               cudaMemcpyDeviceToHost, s));
  }

  // A decode step of nb sequences as one graph launch, capturing it on the second sight of nb. Returns
  // false (and the caller runs eagerly) when graphs are off or the capture failed once for this nb.
  void drop_graphs() {
    for (auto& [n, g] : graph_execs) cudaGraphExecDestroy(g);
    graph_execs.clear();
    decode_seen.clear();
    graph_failed.clear();
  }

  bool run_decode_graph(int nb) {
    if (!graphs || !moe->graph_safe()) return false;
    // An eager forward with more rows than before may have reallocated the MoE's buffers: graphs captured
    // earlier point at freed memory. Capture again (the next decode runs eagerly first).
    if (moe->buffers_epoch() != graphs_epoch) {
      drop_graphs();
      graphs_epoch = moe->buffers_epoch();
    }
    if (graph_failed.count(nb)) return false;
    auto it = graph_execs.find(nb);
    if (it == graph_execs.end()) {
      if (decode_seen[nb]++ == 0) return false;  // first time eager: lazy allocations happen outside capture
      cudaGraph_t graph = nullptr;
      CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      bool ok = true;
      std::exception_ptr other;
      std::string why;
      try {
        enqueue(nb, nb);
      } catch (const Error& e) {
        ok = false;  // something in the step synchronised or allocated: run this nb eagerly from now on
        why = e.what();
      } catch (...) {
        ok = false;
        other = std::current_exception();  // not a capture problem: end the capture, then rethrow
      }
      const cudaError_t end = cudaStreamEndCapture(stream, &graph);
      cudaGetLastError();  // a failed capture leaves a (non-sticky) error behind
      if (other) {
        if (graph) cudaGraphDestroy(graph);
        std::rethrow_exception(other);
      }
      if (!ok)
        std::fprintf(stderr, "note: decode step with %d sequence(s) not captured as a CUDA graph (%s); it runs "
                     "eagerly\n", nb, why.c_str());
      cudaGraphExec_t exec = nullptr;
      if (ok && end == cudaSuccess && graph && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess) {
        graph_execs[nb] = exec;
      } else {
        cudaGetLastError();
        graph_failed.insert(nb);
      }
      if (graph) cudaGraphDestroy(graph);
      if (!graph_execs.count(nb)) return false;
      it = graph_execs.find(nb);
    }
    CUDA_CHECK(cudaGraphLaunch(it->second, stream));
    return true;
  }
};

GpuPhimoeModel::GpuPhimoeModel() : impl_(std::make_unique<Impl>()) {}
GpuPhimoeModel::GpuPhimoeModel(GpuPhimoeModel&&) noexcept = default;
GpuPhimoeModel& GpuPhimoeModel::operator=(GpuPhimoeModel&&) noexcept = default;
GpuPhimoeModel::~GpuPhimoeModel() = default;

GpuPhimoeModel GpuPhimoeModel::load(const Checkpoint& ckpt, int max_len) {
  GpuModelOptions o;
  o.max_len = max_len;
  return load(ckpt, std::move(o));
}

GpuPhimoeModel GpuPhimoeModel::load(const Checkpoint& ckpt, GpuModelOptions opt) {
  const ModelConfig& c = ckpt.config();
  const std::string where = "GpuPhimoeModel (" + ckpt.dir() + "): ";
  const int max_len = opt.max_len;
  require(c.model_type == "phimoe", where, "model_type is '", c.model_type, "', expected phimoe");
  // the kernels' preconditions (embedding.cuh, layernorm.cuh, attention.cuh, rope.cuh)
  require(c.hidden_size > 0 && c.hidden_size % 8 == 0 && c.hidden_size <= 8192, where, "hidden_size ",
          c.hidden_size, " must be a multiple of 8 and <= 8192 (the embedding and LayerNorm kernels' 16-byte rows)");
  require(c.head_dim > 0 && c.head_dim % 2 == 0 && c.head_dim <= 256, where, "head_dim ", c.head_dim,
          " must be even and <= 256 (the attention and RoPE kernels)");
  require(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0, where,
          "num_attention_heads ", c.num_attention_heads, " must be a multiple of num_key_value_heads ",
          c.num_key_value_heads, " (GQA)");
  require(max_len >= 1, where, "max_len must be >= 1, got ", max_len);
  require(c.max_position_embeddings <= 0 || max_len <= c.max_position_embeddings, where, "max_len ", max_len,
          " is longer than the model's context (max_position_embeddings ", c.max_position_embeddings, ")");
  require(opt.max_batch >= 1, where, "max_batch must be >= 1, got ", opt.max_batch);
  const int max_rows = opt.max_rows > 0 ? opt.max_rows : max_len;

  GpuPhimoeModel m;
  Impl& I = *m.impl_;
  I.c = c;
  I.max_len = max_len;
  I.max_batch = opt.max_batch;
  I.max_rows = max_rows;
  I.lens.assign(std::size_t(opt.max_batch), 0);
  I.graphs = opt.graphs;
  if (opt.stream) {
    I.stream = reinterpret_cast<cudaStream_t>(opt.stream);
  } else {
    CUDA_CHECK(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking));
    I.own_stream = true;
  }
  CUBLAS_CHECK(cublasCreate(&I.cublas));
  I.cublas_ws = DeviceBuffer<char>(std::size_t(32) << 20);
  // cublasSetStream resets the workspace to cuBLAS's default pool, so the stream is set first, once, and
  // linear() does not set it again while it is the same (linear.cuh).
  CUBLAS_CHECK(cublasSetStream(I.cublas, I.stream));
  CUBLAS_CHECK(cublasSetWorkspace(I.cublas, I.cublas_ws.get(), I.cublas_ws.bytes()));
  I.rope = std::make_unique<gpu::RopeTable>(max_len, c.head_dim, c.rope_theta);

  const std::int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const std::int64_t NQ = c.num_attention_heads * D, NKV = c.num_key_value_heads * D;
  const std::size_t cache_elems = std::size_t(opt.max_batch) * max_len * NKV;
  I.embed = I.upload(ckpt, names::embed_tokens(), {V, H});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    if (opt.progress) opt.progress("attention", l, c.num_hidden_layers);
    LayerWeights L;
    L.ln_in_w = I.upload(ckpt, names::layer_norm(l, "input", "weight"), {H});
    L.ln_in_b = I.upload(ckpt, names::layer_norm(l, "input", "bias"), {H});
    L.ln_post_w = I.upload(ckpt, names::layer_norm(l, "post_attention", "weight"), {H});
    L.ln_post_b = I.upload(ckpt, names::layer_norm(l, "post_attention", "bias"), {H});
    L.qw = I.upload(ckpt, names::attn(l, "q", "weight"), {NQ, H});
    L.kw = I.upload(ckpt, names::attn(l, "k", "weight"), {NKV, H});
    L.vw = I.upload(ckpt, names::attn(l, "v", "weight"), {NKV, H});
    L.ow = I.upload(ckpt, names::attn(l, "o", "weight"), {H, NQ});
    if (c.attention_bias) {
      L.qb = I.upload(ckpt, names::attn(l, "q", "bias"), {NQ});
      L.kb = I.upload(ckpt, names::attn(l, "k", "bias"), {NKV});
      L.vb = I.upload(ckpt, names::attn(l, "v", "bias"), {NKV});
      L.ob = I.upload(ckpt, names::attn(l, "o", "bias"), {H});
    }
    L.k_cache = DeviceBuffer<bf16_bits>(cache_elems);
    L.v_cache = DeviceBuffer<bf16_bits>(cache_elems);
    I.layers.push_back(std::move(L));
  }
  I.final_w = I.upload(ckpt, names::final_norm("weight"), {H});
  I.final_b = I.upload(ckpt, names::final_norm("bias"), {H});
  if (!c.tie_word_embeddings) I.lm_w = I.upload(ckpt, names::lm_head("weight"), {V, H});
  if (c.lm_head_bias) I.lm_b = I.upload(ckpt, names::lm_head("bias"), {V});
  if (opt.progress) opt.progress("attention", c.num_hidden_layers, c.num_hidden_layers);
  I.moe = opt.moe ? std::move(opt.moe) : make_local_moe_step(ckpt, opt.progress);

  const std::size_t R = std::size_t(max_rows), NB = std::size_t(opt.max_batch);
  for (auto* buf : {&I.x, &I.h, &I.o, &I.y}) *buf = DeviceBuffer<bf16_bits>(R * H);
  I.q = DeviceBuffer<bf16_bits>(R * NQ);
  I.a = DeviceBuffer<bf16_bits>(R * NQ);
  I.k = DeviceBuffer<bf16_bits>(R * NKV);
  I.v = DeviceBuffer<bf16_bits>(R * NKV);
  for (auto* buf : {&I.xl, &I.yl, &I.hl}) *buf = DeviceBuffer<bf16_bits>(NB * H);
  I.d_meta = DeviceBuffer<int>(3 * R + NB);
  I.h_meta = PinnedBuffer<int>(3 * R + NB);
  std::fill_n(I.h_meta.get(), 3 * R + NB, 0);
  I.logits = DeviceBuffer<float>(NB * std::size_t(V));
  I.h_logits = PinnedBuffer<float>(NB * std::size_t(V));
  I.poison_caches();
  return m;
}

const ModelConfig& GpuPhimoeModel::config() const { return impl_->c; }
int GpuPhimoeModel::max_len() const { return impl_->max_len; }
int GpuPhimoeModel::max_batch() const { return impl_->max_batch; }
int GpuPhimoeModel::length(int seq) const { return impl_->lens.at(std::size_t(seq)); }
std::size_t GpuPhimoeModel::weight_bytes() const { return impl_->weight_bytes + impl_->moe->weight_bytes(); }
std::size_t GpuPhimoeModel::kv_cache_bytes() const {
  std::size_t b = 0;
  for (const auto& L : impl_->layers) b += L.k_cache.bytes() + L.v_cache.bytes();
  return b;
}
GpuMoeStep& GpuPhimoeModel::moe() { return *impl_->moe; }
std::vector<Routing> GpuPhimoeModel::last_routing() {
  std::vector<Routing> r;
  for (int l = 0; l < impl_->c.num_hidden_layers; ++l) r.push_back(impl_->moe->last_routing(l, impl_->last_rows));
  return r;
}
int GpuPhimoeModel::graphs_captured() const { return int(impl_->graph_execs.size()); }

void GpuPhimoeModel::reset() {
  std::fill(impl_->lens.begin(), impl_->lens.end(), 0);
  impl_->poison_caches();
}

std::vector<float> GpuPhimoeModel::forward_batch(const std::vector<std::vector<int>>& tokens) {
  Impl& I = *impl_;
  const int V = I.c.vocab_size, nb = int(tokens.size());
  require(nb >= 1 && nb <= I.max_batch, "GpuPhimoeModel::forward: ", nb, " sequences, the model holds 1 to ",
          I.max_batch, " (load with a larger max_batch)");
  // Validate everything before touching the GPU: a failed call changes nothing.
  int R = 0;
  for (int b = 0; b < nb; ++b) {
    const int T = int(tokens[b].size());
    require(T >= 1, "GpuPhimoeModel::forward: sequence ", b, " has no new tokens");
    require(I.lens[b] + T <= I.max_len, "GpuPhimoeModel::forward: sequence ", b, " has ", I.lens[b],
            " tokens in its cache + ", T, " new ones, more than max_len ", I.max_len,
            " (load with a larger max_len, or reset())");
    for (int t = 0; t < T; ++t)
      require(tokens[b][t] >= 0 && tokens[b][t] < V, "GpuPhimoeModel::forward: sequence ", b, " token ", t,
              " has id ", tokens[b][t], ", outside the vocabulary [0, ", V, ")");
    R += T;
  }
  require(R <= I.max_rows, "GpuPhimoeModel::forward: ", R, " new rows in one call, more than max_rows ", I.max_rows,
          " (prefill the prompts one at a time, or load with a larger max_rows)");
  int* ids = I.h_meta.get();
  int* seq = ids + I.max_rows;
  int* pos = ids + 2 * std::size_t(I.max_rows);
  int* last = ids + 3 * std::size_t(I.max_rows);
  for (int b = 0, r = 0; b < nb; ++b) {
    for (std::size_t t = 0; t < tokens[b].size(); ++t, ++r) {
      ids[r] = tokens[b][t];
      seq[r] = b;
      pos[r] = I.lens[b] + int(t);
    }
    last[b] = r - 1;
  }

  const bool decode = R == nb;  // one new token per sequence: fixed shapes, a graph can replay it
  if (!(decode && I.run_decode_graph(nb))) I.enqueue(R, nb);
  I.last_rows = R;
  I.moe->synchronize(I.stream);
  CUDA_CHECK(cudaGetLastError());
  std::vector<float> out(I.h_logits.get(), I.h_logits.get() + std::size_t(nb) * V);
  for (int b = 0; b < nb; ++b) I.lens[b] += int(tokens[b].size());
  for (std::size_t i = 0; i < out.size(); ++i)
    require(std::isfinite(out[i]), "GpuPhimoeModel::forward: logit ", i % V, " of sequence ", i / V, " at position ",
            I.lens[i / V] - 1, " is ", out[i], " (a kernel read an unwritten KV-cache row or overflowed)");
  return out;
}

std::vector<float> GpuPhimoeModel::forward(const std::vector<int>& new_tokens) {
  return forward_batch({new_tokens});
}

std::vector<int> GpuPhimoeModel::generate(const std::vector<int>& prompt_ids, int max_new_tokens,
                                          const std::vector<int>& stop_ids) {
  require(!prompt_ids.empty(), "GpuPhimoeModel::generate: empty prompt");
  reset();
  std::vector<int> out;
  std::vector<float> logits = forward(prompt_ids);
  while (int(out.size()) < max_new_tokens) {
    const int t = argmax(logits);
    out.push_back(t);
    if (int(out.size()) == max_new_tokens || std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end())
      break;
    logits = forward({t});
  }
  return out;
}

std::size_t gpu_memory_used_bytes() {
  std::size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

}  // namespace eplab
