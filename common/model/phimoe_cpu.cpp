// The CPU reference of the whole PhiMoE model. Semantics and conventions: phimoe_cpu.hpp.
#include "model/phimoe_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <set>

#include "util/bf16.hpp"
#include "util/check.hpp"

namespace eplab {

// ---------------------------------------------------------------- pieces

void layer_norm_cpu(std::span<const float> x, std::span<const float> w, std::span<const float> b, int rows, int n,
                    float eps, std::span<float> y) {
  require(x.size() == size_t(rows) * n && y.size() == x.size() && w.size() == size_t(n) && b.size() == size_t(n),
          "layer_norm_cpu: sizes disagree with rows ", rows, " x n ", n);
  for (int r = 0; r < rows; ++r) {
    const float* xr = &x[size_t(r) * n];
    double mean = 0;
    for (int i = 0; i < n; ++i) mean += xr[i];
    mean /= n;
    double var = 0;
    for (int i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= n;  // biased, as torch's LayerNorm
    const double inv = 1.0 / std::sqrt(var + double(eps));
    float* yr = &y[size_t(r) * n];
    for (int i = 0; i < n; ++i) yr[i] = float((xr[i] - mean) * inv) * w[i] + b[i];
  }
}

void rope_cos_sin(int pos, int head_dim, float theta, float* cos_out, float* sin_out) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    // fp32 like HF: inv_freq = 1 / theta^(2i/D), angle = pos * inv_freq (an fp32 product; it matters at
    // positions in the thousands, where the angle's rounding is ~1e-4 rad)
    const float inv_freq = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
    const float angle = float(pos) * inv_freq;
    cos_out[i] = cos_out[i + half] = std::cos(angle);
    sin_out[i] = sin_out[i + half] = std::sin(angle);
  }
}

void rope_apply(float* v, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];                // rotate_half(v)[i]        = -v[i + D/2]
    v[i + half] = b * cos[i + half] + a * sin[i + half];  // rotate_half(v)[i + D/2] = v[i]
  }
}

int argmax(std::span<const float> v) {
  require(!v.empty(), "argmax of an empty vector");
  int best = 0;
  for (int i = 1; i < int(v.size()); ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

namespace {

// Dot product with 8 independent partial sums: the compiler vectorises it without -ffast-math.
inline float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[R, out] = x[R, in] W^T + b, W row-major [out, in] as stored on disk; b may be empty.
void linear(const float* x, int R, int in, const std::vector<float>& W, const std::vector<float>& b, int out,
            float* y) {
  for (int o = 0; o < out; ++o) {
    const float* wr = &W[size_t(o) * in];
    const float bias = b.empty() ? 0.f : b[o];
    for (int r = 0; r < R; ++r) y[size_t(r) * out + o] = dot(&x[size_t(r) * in], wr, in) + bias;
  }
}

struct Linear {
  std::vector<float> w, b;  // [out, in], [out] or empty
  int out = 0, in = 0;
  void apply(const float* x, int R, float* y) const { linear(x, R, in, w, b, out, y); }
};

struct Norm {
  std::vector<float> w, b;
};

struct DenseLayer {
  Norm ln_in, ln_post;
  Linear q, k, v, o;
};

}  // namespace

// ---------------------------------------------------------------- the local MoE block

LocalMoeBlock::LocalMoeBlock(std::shared_ptr<const std::vector<MoeLayerWeights>> layers, const MoeRefOptions& opt)
    : layers_(std::move(layers)), opt_(opt) {
  require(layers_ != nullptr, "LocalMoeBlock: no layer weights");
}

MoeBlockOutput LocalMoeBlock::forward(int layer, std::span<const float> x, int T) {
  require(layer >= 0 && layer < int(layers_->size()), "LocalMoeBlock: layer ", layer, " out of range");
  const MoeLayerWeights& w = (*layers_)[layer];
  MoeBlockOutput out;
  if (T == 0) {
    out.routing = Routing{0, opt_.router.top_k, {}, {}};
    return out;
  }
  if (w.num_held() == w.num_experts) {
    MoeRefResult r = moe_layer_reference(w, x, T, opt_);
    out.y = std::move(r.y);
    out.routing = std::move(r.routing);
    out.router_logits = std::move(r.logits);
    return out;
  }
  // Some experts only: the same steps as moe_layer_reference; a row routed to an expert not held fails.
  const std::vector<float> gate = bf16_to_float(std::span<const bf16_bits>(w.gate));
  std::vector<float> logits(size_t(T) * w.num_experts);
  router_logits_cpu(x, gate, T, w.hidden, w.num_experts, logits);
  out.routing = route(opt_.router.kind, logits, T, w.num_experts, opt_.router.top_k, opt_.router.jitter_eps);
  out.y = moe_experts_reference(w, x, out.routing, opt_.round_h_to_bf16);
  out.router_logits = std::move(logits);
  return out;
}

// ---------------------------------------------------------------- the model

struct PhimoeCpuModel::Impl {
  ModelConfig c;
  std::vector<float> embed;  // [V, H]
  std::vector<DenseLayer> layers;
  Norm final_norm;
  Linear lm_head;
  std::shared_ptr<const std::vector<MoeLayerWeights>> moe;
  std::unique_ptr<MoeBlock> block;
};

PhimoeCpuModel::PhimoeCpuModel() : impl_(std::make_unique<Impl>()) {}
PhimoeCpuModel::PhimoeCpuModel(PhimoeCpuModel&&) noexcept = default;
PhimoeCpuModel& PhimoeCpuModel::operator=(PhimoeCpuModel&&) noexcept = default;
PhimoeCpuModel::~PhimoeCpuModel() = default;

PhimoeCpuModel PhimoeCpuModel::load(const Checkpoint& ckpt, const PhimoeLoadOptions& opt) {
  const ModelConfig& c = ckpt.config();
  require(c.model_type == "phimoe", ckpt.dir(), "/config.json: model_type '", c.model_type,
          "' is not supported by the PhiMoE forward (expected phimoe: LayerNorm with bias, sparsemixer)");
  require(c.head_dim % 2 == 0, ckpt.dir(), "/config.json: head_dim ", c.head_dim, " must be even for RoPE");
  const std::int64_t H = c.hidden_size, V = c.vocab_size, D = c.head_dim;
  const std::int64_t NQ = std::int64_t(c.num_attention_heads) * D, NKV = std::int64_t(c.num_key_value_heads) * D;

  PhimoeCpuModel m;
  Impl& im = *m.impl_;
  im.c = c;
  auto norm = [&](const std::string& w, const std::string& b) {
    return Norm{ckpt.read_f32(w, {H}), ckpt.read_f32(b, {H})};
  };
  auto lin = [&](int l, const char* proj, std::int64_t out, std::int64_t in) {
    Linear L;
    L.out = int(out);
    L.in = int(in);
    L.w = ckpt.read_f32(names::attn(l, proj, "weight"), {out, in});
    if (c.attention_bias) L.b = ckpt.read_f32(names::attn(l, proj, "bias"), {out});
    return L;
  };

  im.embed = ckpt.read_f32(names::embed_tokens(), {V, H});
  auto moe = std::make_shared<std::vector<MoeLayerWeights>>();
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    DenseLayer d;
    d.ln_in = norm(names::layer_norm(l, "input", "weight"), names::layer_norm(l, "input", "bias"));
    d.ln_post = norm(names::layer_norm(l, "post_attention", "weight"), names::layer_norm(l, "post_attention", "bias"));
    d.q = lin(l, "q", NQ, H);
    d.k = lin(l, "k", NKV, H);
    d.v = lin(l, "v", NKV, H);
    d.o = lin(l, "o", H, NQ);
    im.layers.push_back(std::move(d));
    std::vector<int> experts;
    if (opt.experts) {
      experts = opt.experts(l);
      std::sort(experts.begin(), experts.end());
      require(std::adjacent_find(experts.begin(), experts.end()) == experts.end(),
              "PhimoeLoadOptions::experts: layer ", l, " lists an expert twice");
      // load_moe_layer reads every expert for an empty list; an empty choice must load none
    }
    if (opt.experts && experts.empty()) {  // no expert of this layer here: the router only
      MoeLayerWeights w;
      w.layer = l;
      w.hidden = c.hidden_size;
      w.inter = c.intermediate_size;
      w.num_experts = c.num_local_experts;
      w.gate = ckpt.read_bf16(names::router_gate(l), {std::int64_t(c.num_local_experts), H});
      moe->push_back(std::move(w));
    } else {
      moe->push_back(load_moe_layer(ckpt, l, experts));
    }
  }
  im.final_norm = norm(names::final_norm("weight"), names::final_norm("bias"));
  im.lm_head.out = int(V);
  im.lm_head.in = int(H);
  im.lm_head.w = c.tie_word_embeddings ? im.embed : ckpt.read_f32(names::lm_head("weight"), {V, H});
  if (c.lm_head_bias) im.lm_head.b = ckpt.read_f32(names::lm_head("bias"), {V});
  im.moe = moe;
  im.block = std::make_unique<LocalMoeBlock>(
      im.moe, MoeRefOptions{{c.router, c.num_experts_per_tok, c.router_jitter_noise}, false});
  return m;
}

const ModelConfig& PhimoeCpuModel::config() const { return impl_->c; }
std::shared_ptr<const std::vector<MoeLayerWeights>> PhimoeCpuModel::moe_weights() const { return impl_->moe; }
void PhimoeCpuModel::set_moe_block(std::unique_ptr<MoeBlock> block) {
  require(block != nullptr, "set_moe_block: null block");
  impl_->block = std::move(block);
}
MoeBlock& PhimoeCpuModel::moe_block() { return *impl_->block; }

PhimoeSequence PhimoeCpuModel::new_sequence() const {
  PhimoeSequence s;
  s.k.resize(impl_->c.num_hidden_layers);
  s.v.resize(impl_->c.num_hidden_layers);
  return s;
}

std::vector<float> PhimoeCpuModel::forward(std::span<PhimoeSequence* const> seqs,
                                           std::span<const std::vector<int>> tokens, LogitRows rows,
                                           PhimoeTrace* trace) {
  const Impl& im = *impl_;
  const ModelConfig& c = im.c;
  const int B = int(seqs.size()), H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  const int D = c.head_dim, NH = c.num_attention_heads, KVH = c.num_key_value_heads, group = NH / KVH;
  const int NQ = NH * D, NKV = KVH * D, W = c.sliding_window;
  require(B > 0, "forward: no sequences");
  require(int(tokens.size()) == B, "forward: ", B, " sequences but ", tokens.size(), " token lists");

  // Rows: sequence b's new tokens, in order, at positions length_b + i.
  std::vector<int> row_seq, row_pos, ids, first_row(B + 1, 0);
  std::set<const PhimoeSequence*> seen;
  for (int b = 0; b < B; ++b) {
    PhimoeSequence* s = seqs[b];
    require(s != nullptr, "forward: sequence ", b, " is null");
    require(seen.insert(s).second, "forward: sequence ", b, " appears twice in one batch");
    require(int(s->k.size()) == L && int(s->v.size()) == L,
            "forward: sequence ", b, " was not made by this model's new_sequence()");
    require(!tokens[b].empty(), "forward: sequence ", b, " has no new tokens");
    const int end = s->length + int(tokens[b].size());
    require(c.max_position_embeddings <= 0 || end <= c.max_position_embeddings, "sequence ", b, " would reach ",
            end, " tokens, longer than the model's context (max_position_embeddings ", c.max_position_embeddings,
            "): use a shorter prompt or fewer new tokens");
    for (int i = 0; i < int(tokens[b].size()); ++i) {
      const int id = tokens[b][i];
      require(id >= 0 && id < V, "forward: token id ", id, " (sequence ", b, ", new token ", i,
              ") is outside the vocabulary [0, ", V, ")");
      row_seq.push_back(b);
      row_pos.push_back(s->length + i);
      ids.push_back(id);
    }
    first_row[b + 1] = int(ids.size());
  }
  const int R = int(ids.size());

  // RoPE tables per row
  std::vector<float> cos(size_t(R) * D), sin(size_t(R) * D);
  for (int r = 0; r < R; ++r) rope_cos_sin(row_pos[r], D, c.rope_theta, &cos[size_t(r) * D], &sin[size_t(r) * D]);

  if (trace) {
    trace->routing.assign(L, Routing{});
    trace->router_logits.assign(L, {});
    trace->layer_out.clear();
  }
  std::vector<float> x(size_t(R) * H), h(size_t(R) * H), q(size_t(R) * NQ), k(size_t(R) * NKV),
      v(size_t(R) * NKV), a(size_t(R) * NQ), o(size_t(R) * H);
  for (int r = 0; r < R; ++r) std::copy_n(&im.embed[size_t(ids[r]) * H], H, &x[size_t(r) * H]);
  if (trace && trace->hidden) trace->embed = x;

  // The caches grow as the layers run; put them back if anything throws, so a failed forward changes nothing.
  std::vector<int> old_len(B);
  for (int b = 0; b < B; ++b) old_len[b] = seqs[b]->length;
  auto rollback = [&] {
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < L; ++l) {
        seqs[b]->k[l].resize(size_t(old_len[b]) * NKV);
        seqs[b]->v[l].resize(size_t(old_len[b]) * NKV);
      }
  };
  try {
    const float scale = 1.0f / std::sqrt(float(D));
    std::vector<float> p;
    for (int l = 0; l < L; ++l) {
      const DenseLayer& d = im.layers[l];
      layer_norm_cpu(x, d.ln_in.w, d.ln_in.b, R, H, c.rms_norm_eps, h);
      d.q.apply(h.data(), R, q.data());
      d.k.apply(h.data(), R, k.data());
      d.v.apply(h.data(), R, v.data());
      for (int r = 0; r < R; ++r) {
        for (int hh = 0; hh < NH; ++hh) rope_apply(&q[size_t(r) * NQ + size_t(hh) * D], D, &cos[size_t(r) * D], &sin[size_t(r) * D]);
        for (int hh = 0; hh < KVH; ++hh) rope_apply(&k[size_t(r) * NKV + size_t(hh) * D], D, &cos[size_t(r) * D], &sin[size_t(r) * D]);
      }
      // append this forward's keys and values to each sequence's cache, then attend
      for (int b = 0; b < B; ++b) {
        auto& K = seqs[b]->k[l];
        auto& Vc = seqs[b]->v[l];
        K.insert(K.end(), k.begin() + size_t(first_row[b]) * NKV, k.begin() + size_t(first_row[b + 1]) * NKV);
        Vc.insert(Vc.end(), v.begin() + size_t(first_row[b]) * NKV, v.begin() + size_t(first_row[b + 1]) * NKV);
      }
      for (int r = 0; r < R; ++r) {
        const PhimoeSequence& s = *seqs[row_seq[r]];
        const float* K = s.k[l].data();
        const float* Vc = s.v[l].data();
        const int pos = row_pos[r];
        const int lo = W > 0 ? std::max(0, pos - W + 1) : 0;  // keys j with pos - W < j <= pos
        const int n = pos - lo + 1;
        p.resize(n);
        for (int hh = 0; hh < NH; ++hh) {
          const int kvh = hh / group;
          const float* qr = &q[size_t(r) * NQ + size_t(hh) * D];
          float mx = -INFINITY;
          for (int j = 0; j < n; ++j) {
            p[j] = dot(qr, &K[size_t(lo + j) * NKV + size_t(kvh) * D], D) * scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0;
          for (int j = 0; j < n; ++j) {
            p[j] = std::exp(p[j] - mx);
            sum += p[j];
          }
          const float inv = float(1.0 / sum);
          float* ar = &a[size_t(r) * NQ + size_t(hh) * D];
          std::fill_n(ar, D, 0.f);
          for (int j = 0; j < n; ++j) {
            const float pj = p[j] * inv;
            const float* vr = &Vc[size_t(lo + j) * NKV + size_t(kvh) * D];
            for (int e = 0; e < D; ++e) ar[e] += pj * vr[e];
          }
        }
      }
      d.o.apply(a.data(), R, o.data());
      for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
      layer_norm_cpu(x, d.ln_post.w, d.ln_post.b, R, H, c.rms_norm_eps, h);
      MoeBlockOutput mo = im.block->forward(l, h, R);
      require(mo.y.size() == x.size(), "MoE block of layer ", l, " returned ", mo.y.size(), " values, expected ",
              x.size());
      for (size_t i = 0; i < x.size(); ++i) x[i] += mo.y[i];
      if (trace) {
        trace->routing[l] = std::move(mo.routing);
        trace->router_logits[l] = std::move(mo.router_logits);
        if (trace->hidden) trace->layer_out.push_back(x);
      }
    }
  } catch (...) {
    rollback();
    throw;
  }
  for (int b = 0; b < B; ++b) seqs[b]->length += int(tokens[b].size());

  layer_norm_cpu(x, im.final_norm.w, im.final_norm.b, R, H, c.rms_norm_eps, h);
  if (trace && trace->hidden) trace->norm_out = h;
  if (rows == LogitRows::All) {
    std::vector<float> logits(size_t(R) * V);
    im.lm_head.apply(h.data(), R, logits.data());
    return logits;
  }
  std::vector<float> last(size_t(B) * H);
  for (int b = 0; b < B; ++b) std::copy_n(&h[size_t(first_row[b + 1] - 1) * H], H, &last[size_t(b) * H]);
  std::vector<float> logits(size_t(B) * V);
  im.lm_head.apply(last.data(), B, logits.data());
  return logits;
}

std::vector<float> PhimoeCpuModel::forward_full(std::span<const int> ids, PhimoeTrace* trace) {
  PhimoeSequence s = new_sequence();
  PhimoeSequence* p = &s;
  const std::vector<int> t(ids.begin(), ids.end());
  return forward(std::span<PhimoeSequence* const>(&p, 1), std::span<const std::vector<int>>(&t, 1), LogitRows::All,
                 trace);
}

std::vector<std::vector<int>> PhimoeCpuModel::generate(const std::vector<std::vector<int>>& prompts,
                                                       int max_new_tokens, int eos_token_id) {
  require(max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", max_new_tokens);
  const int B = int(prompts.size()), V = impl_->c.vocab_size;
  std::vector<std::vector<int>> out(B);
  if (B == 0 || max_new_tokens == 0) return out;
  std::vector<PhimoeSequence> seqs;
  for (int b = 0; b < B; ++b) seqs.push_back(new_sequence());
  std::vector<int> active(B);
  for (int b = 0; b < B; ++b) active[b] = b;
  std::vector<std::vector<int>> step_tokens = prompts;  // first step: the prompts (prefill)
  while (!active.empty()) {
    std::vector<PhimoeSequence*> ptrs;
    for (int b : active) ptrs.push_back(&seqs[b]);
    const std::vector<float> logits = forward(ptrs, step_tokens, LogitRows::Last);
    std::vector<int> still;
    std::vector<std::vector<int>> next;
    for (size_t i = 0; i < active.size(); ++i) {
      const int b = active[i];
      const int tok = argmax(std::span<const float>(&logits[i * V], V));
      out[b].push_back(tok);
      if (int(out[b].size()) < max_new_tokens && tok != eos_token_id) {
        still.push_back(b);
        next.push_back({tok});
      }
    }
    active = std::move(still);
    step_tokens = std::move(next);
  }
  return out;
}

}  // namespace eplab
