// GpuPhimoeModel: the layer loop of phimoe_gpu.hpp over the topic kernels. No kernels of its own.
#include "phimoe_gpu.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "attention.cuh"
#include "cuda_check.hpp"
#include "embedding.cuh"
#include "layernorm.cuh"
#include "linear.cuh"
#include "model/phimoe_cpu.hpp"  // argmax (ties to the lowest id, like the CPU model)
#include "moe_gpu.hpp"
#include "rope.cuh"
#include "util/check.hpp"

namespace eplab {
namespace {

using gpu::bf16;

// An owning device array of n elements of T (moved, never copied).
template <typename T>
class DevArray {
 public:
  DevArray() = default;
  explicit DevArray(std::size_t n) : n_(n) {
    if (n_) CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  DevArray(DevArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DevArray& operator=(DevArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  DevArray(const DevArray&) = delete;
  DevArray& operator=(const DevArray&) = delete;
  ~DevArray() {
    if (p_) cudaFree(p_);
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

// bf16 as the kernels take it; the host keeps bf16 as bf16_bits (same 16 bits).
static_assert(sizeof(bf16) == sizeof(bf16_bits));
bf16* B(const DevArray<bf16_bits>& a) { return reinterpret_cast<bf16*>(a.get()); }

struct LayerWeights {
  DevArray<bf16_bits> ln_in_w, ln_in_b, ln_post_w, ln_post_b;
  DevArray<bf16_bits> qw, qb, kw, kb, vw, vb, ow, ob;  // biases empty when attention_bias is false
  DevArray<bf16_bits> k_cache, v_cache;                // [max_len, kv_heads, head_dim]
  std::unique_ptr<GpuMoeLayer> moe;
};

}  // namespace

struct GpuPhimoeModel::Impl {
  ModelConfig c;
  int max_len = 0, pos = 0;
  std::size_t weight_bytes = 0;
  cudaStream_t stream{};
  cublasHandle_t cublas{};
  std::unique_ptr<gpu::RopeTable> rope;
  DevArray<bf16_bits> embed, final_w, final_b, lm_w, lm_b;  // lm_w empty when tied to the embedding
  std::vector<LayerWeights> layers;
  // activations for up to max_len rows: x residual stream, h normed, q/a [*, heads*D], k/v [*, kv*D],
  // o attention projection, y MoE output
  DevArray<bf16_bits> x, h, q, k, v, a, o, y;
  DevArray<int> ids;
  DevArray<float> logits;  // [vocab], the last row only

  ~Impl() {
    layers.clear();  // GpuMoeLayers and device arrays free before the stream and handle go
    if (cublas) cublasDestroy(cublas);
    if (stream) cudaStreamDestroy(stream);
  }

  DevArray<bf16_bits> upload(const Checkpoint& ckpt, const std::string& name, std::vector<std::int64_t> shape) {
    const std::vector<bf16_bits> host = ckpt.read_bf16(name, shape);
    DevArray<bf16_bits> d(host.size());
    CUDA_CHECK(cudaMemcpy(d.get(), host.data(), d.bytes(), cudaMemcpyHostToDevice));
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
};

GpuPhimoeModel::GpuPhimoeModel() : impl_(std::make_unique<Impl>()) {}
GpuPhimoeModel::GpuPhimoeModel(GpuPhimoeModel&&) noexcept = default;
GpuPhimoeModel& GpuPhimoeModel::operator=(GpuPhimoeModel&&) noexcept = default;
GpuPhimoeModel::~GpuPhimoeModel() = default;

GpuPhimoeModel GpuPhimoeModel::load(const Checkpoint& ckpt, int max_len) {
  const ModelConfig& c = ckpt.config();
  const std::string where = "GpuPhimoeModel (" + ckpt.dir() + "): ";
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

  GpuPhimoeModel m;
  Impl& I = *m.impl_;
  I.c = c;
  I.max_len = max_len;
  CUDA_CHECK(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&I.cublas));
  I.rope = std::make_unique<gpu::RopeTable>(max_len, c.head_dim, c.rope_theta);

  const std::int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const std::int64_t NQ = c.num_attention_heads * D, NKV = c.num_key_value_heads * D;
  I.embed = I.upload(ckpt, names::embed_tokens(), {V, H});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
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
    L.k_cache = DevArray<bf16_bits>(std::size_t(max_len) * NKV);
    L.v_cache = DevArray<bf16_bits>(std::size_t(max_len) * NKV);
    L.moe = std::make_unique<GpuMoeLayer>(load_moe_layer(ckpt, l), c.router, c.num_experts_per_tok,
                                          c.router_jitter_noise);
    I.weight_bytes += L.moe->weight_bytes();
    I.layers.push_back(std::move(L));
  }
  I.final_w = I.upload(ckpt, names::final_norm("weight"), {H});
  I.final_b = I.upload(ckpt, names::final_norm("bias"), {H});
  if (!c.tie_word_embeddings) I.lm_w = I.upload(ckpt, names::lm_head("weight"), {V, H});
  if (c.lm_head_bias) I.lm_b = I.upload(ckpt, names::lm_head("bias"), {V});

  const std::size_t R = std::size_t(max_len);
  I.x = DevArray<bf16_bits>(R * H);
  I.h = DevArray<bf16_bits>(R * H);
  I.o = DevArray<bf16_bits>(R * H);
  I.y = DevArray<bf16_bits>(R * H);
  I.q = DevArray<bf16_bits>(R * NQ);
  I.a = DevArray<bf16_bits>(R * NQ);
  I.k = DevArray<bf16_bits>(R * NKV);
  I.v = DevArray<bf16_bits>(R * NKV);
  I.ids = DevArray<int>(R);
  I.logits = DevArray<float>(std::size_t(V));
  I.poison_caches();
  return m;
}

const ModelConfig& GpuPhimoeModel::config() const { return impl_->c; }
int GpuPhimoeModel::max_len() const { return impl_->max_len; }
int GpuPhimoeModel::length() const { return impl_->pos; }
std::size_t GpuPhimoeModel::weight_bytes() const { return impl_->weight_bytes; }

void GpuPhimoeModel::reset() {
  impl_->pos = 0;
  impl_->poison_caches();
}

std::vector<float> GpuPhimoeModel::forward(const std::vector<int>& new_tokens) {
  Impl& I = *impl_;
  const ModelConfig& c = I.c;
  const int T = int(new_tokens.size()), H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const int NH = c.num_attention_heads, KVH = c.num_key_value_heads, NQ = NH * D;
  const float eps = c.rms_norm_eps;
  cudaStream_t s = I.stream;
  require(T >= 1, "GpuPhimoeModel::forward: no tokens given");
  require(I.pos + T <= I.max_len, "GpuPhimoeModel::forward: ", I.pos, " tokens in the cache + ", T,
          " new ones exceed max_len ", I.max_len, " (load with a larger max_len, or reset())");
  for (int t = 0; t < T; ++t)
    require(new_tokens[t] >= 0 && new_tokens[t] < V, "GpuPhimoeModel::forward: token ", t, " has id ",
            new_tokens[t], ", outside the vocabulary [0, ", V, ")");

  CUDA_CHECK(cudaMemcpyAsync(I.ids.get(), new_tokens.data(), sizeof(int) * T, cudaMemcpyHostToDevice, s));
  gpu::embedding(B(I.embed), V, H, I.ids.get(), T, B(I.x), /*d_error=*/nullptr, s);  // ids checked above
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = I.layers[l];
    if (l == 0)
      gpu::layer_norm(B(I.x), B(L.ln_in_w), B(L.ln_in_b), T, H, eps, B(I.h), s);
    else  // x += previous layer's MoE output, h = LN_in(x)
      gpu::add_layer_norm(B(I.x), B(I.y), B(I.x), B(L.ln_in_w), B(L.ln_in_b), T, H, eps, B(I.h), s);
    gpu::linear(I.cublas, B(I.h), T, H, B(L.qw), NQ, B(L.qb), B(I.q), s);  // B(empty) = null: no bias
    gpu::linear(I.cublas, B(I.h), T, H, B(L.kw), KVH * D, B(L.kb), B(I.k), s);
    gpu::linear(I.cublas, B(I.h), T, H, B(L.vw), KVH * D, B(L.vb), B(I.v), s);
    gpu::rope_inplace(B(I.q), NH, B(I.k), KVH, T, I.pos, *I.rope, s);
    gpu::kv_append(B(I.k), B(I.v), T, KVH, D, I.pos, B(L.k_cache), B(L.v_cache), I.max_len, s);
    gpu::attention(B(I.q), T, NH, KVH, D, I.pos, B(L.k_cache), B(L.v_cache), I.max_len, c.sliding_window, B(I.a),
                   s);
    gpu::linear(I.cublas, B(I.a), T, NQ, B(L.ow), H, B(L.ob), B(I.o), s);
    // x += o, h = LN_post(x)
    gpu::add_layer_norm(B(I.x), B(I.o), B(I.x), B(L.ln_post_w), B(L.ln_post_b), T, H, eps, B(I.h), s);
    L.moe->forward_device(B(I.h), T, B(I.y), MoePath::Grouped, s);
  }
  // Only the last row's logits are needed: x_last += y_last, h_last = LN_final(x_last), lm_head on one row.
  // Row offsets (T - 1) * H keep the 16-byte alignment (H % 8 == 0).
  const std::size_t last = std::size_t(T - 1) * H;
  gpu::add_layer_norm(B(I.x) + last, B(I.y) + last, B(I.x) + last, B(I.final_w), B(I.final_b), 1, H, eps,
                      B(I.h) + last, s);
  const bf16* lm_w = c.tie_word_embeddings ? B(I.embed) : B(I.lm_w);
  gpu::linear_f32(I.cublas, B(I.h) + last, 1, H, lm_w, V, B(I.lm_b), I.logits.get(), s);
  std::vector<float> out(std::size_t(V), 0.f);
  CUDA_CHECK(cudaMemcpyAsync(out.data(), I.logits.get(), sizeof(float) * V, cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  CUDA_CHECK(cudaGetLastError());
  const int first_pos = I.pos;
  I.pos += T;
  for (int i = 0; i < V; ++i)
    require(std::isfinite(out[i]), "GpuPhimoeModel::forward: logit ", i, " at position ", first_pos + T - 1,
            " is ", out[i], " (a kernel read an unwritten KV-cache row or overflowed)");
  return out;
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
