#include "moe/cost_model.hpp"

#include "util/check.hpp"

namespace eplab {

ParamCounts count_params(const ModelConfig& c) {
  using i64 = std::int64_t;
  const i64 H = c.hidden_size, I = c.intermediate_size, E = c.num_local_experts, L = c.num_hidden_layers;
  const i64 V = c.vocab_size, K = c.num_experts_per_tok;
  const i64 q_out = i64(c.num_attention_heads) * c.head_dim;
  const i64 kv_out = i64(c.num_key_value_heads) * c.head_dim;
  const i64 bias = c.attention_bias ? 1 : 0;

  ParamCounts p;
  p.per_expert = 3 * H * I;
  p.experts_per_layer = E * p.per_expert;
  p.experts_total = L * p.experts_per_layer;
  p.router_per_layer = E * H;
  p.router_total = L * p.router_per_layer;
  p.attention_per_layer = (q_out * H + bias * q_out)       // q_proj
                          + 2 * (kv_out * H + bias * kv_out)  // k_proj, v_proj
                          + (H * q_out + bias * H);        // o_proj
  p.attention_total = L * p.attention_per_layer;
  p.norms_per_layer = 2 * (2 * H);
  p.norms_total = L * p.norms_per_layer + 2 * H;
  p.embeddings = V * H;
  p.lm_head = (c.tie_word_embeddings ? 0 : V * H) + (c.lm_head_bias ? V : 0);
  p.non_expert = p.router_total + p.attention_total + p.norms_total + p.embeddings + p.lm_head;
  p.total = p.non_expert + p.experts_total;
  p.active_per_token = p.non_expert + L * K * p.per_expert;
  p.active_per_token_no_embed = p.active_per_token - p.embeddings;
  return p;
}

int bytes_per_param(const ModelConfig& c) {
  if (c.torch_dtype == "bfloat16" || c.torch_dtype == "float16") return 2;
  if (c.torch_dtype == "float32") return 4;
  fail("torch_dtype '", c.torch_dtype, "' has no known size (expected bfloat16, float16 or float32)");
}

EpMemory ep_memory(const ModelConfig& c, int ep_size, double bytes_per_param) {
  require(ep_size >= 1, "EP size must be >= 1, got ", ep_size);
  const ParamCounts p = count_params(c);
  const int E = c.num_local_experts;
  EpMemory m;
  m.ep_size = ep_size;
  m.experts_per_gpu_max = (E + ep_size - 1) / ep_size;
  m.experts_per_gpu_min = E / ep_size;
  m.even = E % ep_size == 0;
  m.expert_params_per_gpu = std::int64_t(m.experts_per_gpu_max) * c.num_hidden_layers * p.per_expert;
  m.expert_bytes_per_gpu = double(m.expert_params_per_gpu) * bytes_per_param;
  m.replicated_bytes = double(p.non_expert) * bytes_per_param;
  m.total_bytes_per_gpu = m.expert_bytes_per_gpu + m.replicated_bytes;
  return m;
}

int sequences_per_gpu(int batch, int ep_size) {
  require(ep_size >= 1, "EP size must be >= 1, got ", ep_size);
  require(batch >= 0, "batch must be >= 0, got ", batch);
  return (batch + ep_size - 1) / ep_size;
}

double kv_cache_bytes(const ModelConfig& c, std::int64_t seqs, std::int64_t seq_len, double bytes_per_elem) {
  require(seqs >= 0 && seq_len >= 0, "KV cache: sequences and length must be >= 0, got ", seqs, " and ", seq_len);
  return double(seqs) * double(seq_len) * c.num_hidden_layers * 2.0 * c.num_key_value_heads * c.head_dim *
         bytes_per_elem;
}

double activation_bytes(const ModelConfig& c, std::int64_t tokens, double bytes_per_elem) {
  require(tokens >= 0, "activations: tokens must be >= 0, got ", tokens);
  const double H = c.hidden_size, I = c.intermediate_size, k = c.num_experts_per_tok;
  return double(tokens) * (4.0 * H + 2.0 * k * I) * bytes_per_elem;
}

double all_to_all_buffer_bytes(const ModelConfig& c, std::int64_t tokens, double bytes_per_elem) {
  require(tokens >= 0, "all-to-all buffers: tokens must be >= 0, got ", tokens);
  return 2.0 * double(tokens) * c.num_experts_per_tok * double(c.hidden_size) * bytes_per_elem;
}

EpWorkloadMemory ep_workload_memory(const ModelConfig& c, int ep_size, int batch, int seq_len, double bytes_per_elem) {
  require(seq_len >= 0, "sequence length must be >= 0, got ", seq_len);
  EpWorkloadMemory m;
  m.ep_size = ep_size;
  m.sequences_per_gpu = sequences_per_gpu(batch, ep_size);
  m.tokens_per_gpu = std::int64_t(m.sequences_per_gpu) * seq_len;
  m.kv_cache_bytes = kv_cache_bytes(c, m.sequences_per_gpu, seq_len, bytes_per_elem);
  m.activation_bytes = activation_bytes(c, m.tokens_per_gpu, bytes_per_elem);
  m.all_to_all_bytes = all_to_all_buffer_bytes(c, m.tokens_per_gpu, bytes_per_elem);
  return m;
}

ModelConfig phi_tiny_moe_config() {
  ModelConfig c;
  c.model_type = "phimoe";
  c.hidden_size = 4096;
  c.intermediate_size = 448;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 4;
  c.head_dim = 128;
  c.num_local_experts = 16;
  c.num_experts_per_tok = 2;
  c.vocab_size = 32064;
  c.max_position_embeddings = 4096;
  c.sliding_window = 2047;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.f;
  c.router_jitter_noise = 0.01f;
  c.input_jitter_noise = 0.01f;
  c.attention_bias = true;
  c.lm_head_bias = true;
  c.tie_word_embeddings = false;
  c.router = RouterKind::SparseMixer;
  return c;
}

}  // namespace eplab
