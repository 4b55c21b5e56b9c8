// Cost model: Phi-tiny-MoE's parameter counts checked against formulas derived by hand here (from the
// tensor shapes in DESIGN.md), the published round numbers, and an independent second count (summing
// the numel of every tensor phimoe_tensor_specs lists) for several configs; EP memory per GPU.
#include <doctest/doctest.h>

#include "model/checkpoint.hpp"
#include "moe/cost_model.hpp"
#include "util/check.hpp"

using namespace eplab;

namespace {

std::int64_t sum_of_specs(const ModelConfig& c, bool experts_only = false) {
  std::int64_t n = 0;
  for (const auto& s : phimoe_tensor_specs(c)) {
    if (experts_only && s.name.find(".experts.") == std::string::npos) continue;
    std::int64_t k = 1;
    for (auto d : s.shape) k *= d;
    n += k;
  }
  return n;
}

}  // namespace

TEST_CASE("cost model: Phi-tiny-MoE by hand") {
  const ModelConfig c = phi_tiny_moe_config();
  const ParamCounts p = count_params(c);

  // Hand derivation. H=4096, I=448, E=16, L=32, V=32064, 16 q heads and 4 kv heads of 128.
  const std::int64_t expert = 448LL * 4096 + 448LL * 4096 + 4096LL * 448;  // w1 + w3 + w2
  const std::int64_t q = 4096LL * 2048 + 2048, k = 4096LL * 512 + 512, v = k, o = 2048LL * 4096 + 4096;
  const std::int64_t attn_layer = q + k + v + o;
  const std::int64_t router_layer = 16LL * 4096;
  const std::int64_t norms_layer = 4LL * 4096;  // two LayerNorms, weight + bias
  const std::int64_t layer = 16 * expert + attn_layer + router_layer + norms_layer;
  const std::int64_t embed = 32064LL * 4096, head = 32064LL * 4096 + 32064, final_norm = 2 * 4096;
  const std::int64_t total = 32 * layer + embed + head + final_norm;

  CHECK(p.per_expert == expert);
  CHECK(p.per_expert == 5505024);
  CHECK(p.experts_per_layer == 16 * expert);
  CHECK(p.experts_total == 32 * 16 * expert);
  CHECK(p.attention_per_layer == attn_layer);
  CHECK(p.attention_total == 32 * attn_layer);
  CHECK(p.router_total == 32 * router_layer);
  CHECK(p.norms_total == 32 * norms_layer + final_norm);
  CHECK(p.embeddings == embed);
  CHECK(p.lm_head == head);
  CHECK(p.total == total);
  CHECK(p.non_expert == total - 32 * 16 * expert);
  CHECK(p.active_per_token == total - 32 * 16 * expert + 32 * 2 * expert);
  CHECK(p.active_per_token_no_embed == p.active_per_token - embed);

  // The published round numbers (DESIGN.md): 5.51 M per expert (not 55 M), 88.1 M per layer,
  // 2.819 B in experts, 3.755 B total.
  CHECK(double(p.per_expert) / 1e6 == doctest::Approx(5.51).epsilon(0.001));
  CHECK(double(p.experts_per_layer) / 1e6 == doctest::Approx(88.1).epsilon(0.001));
  CHECK(double(p.experts_total) / 1e9 == doctest::Approx(2.819).epsilon(0.0005));
  CHECK(double(p.total) / 1e9 == doctest::Approx(3.755).epsilon(0.0005));
  CHECK(p.per_expert * 16 * 32 < 4'000'000'000LL);  // 55 M per expert could not fit in 3.76 B
}

TEST_CASE("cost model: equals the numel sum over the tensor list, for several configs") {
  ModelConfig c = phi_tiny_moe_config();
  CHECK(count_params(c).total == sum_of_specs(c));
  CHECK(count_params(c).experts_total == sum_of_specs(c, true));

  c.hidden_size = 96;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 3;
  c.head_dim = 20;  // heads * head_dim != hidden: q/o are not square
  c.num_local_experts = 5;
  c.vocab_size = 77;
  CHECK(count_params(c).total == sum_of_specs(c));

  c.attention_bias = false;
  c.lm_head_bias = false;
  CHECK(count_params(c).total == sum_of_specs(c));
  c.tie_word_embeddings = true;
  CHECK(count_params(c).total == sum_of_specs(c));
  CHECK(count_params(c).lm_head == 0);
}

TEST_CASE("cost model: experts' memory per GPU under EP") {
  const ModelConfig c = phi_tiny_moe_config();
  const std::int64_t expert = 3LL * 4096 * 448;
  const double replicated = double(count_params(c).total - 32LL * 16 * expert) * 2.0;
  struct Case { int n, busiest; bool even; };
  for (Case k : {Case{1, 16, true}, Case{2, 8, true}, Case{4, 4, true}, Case{8, 2, true}, Case{16, 1, true},
                 Case{3, 6, false}, Case{5, 4, false}, Case{32, 1, false}}) {
    CAPTURE(k.n);
    const EpMemory m = ep_memory(c, k.n);
    CHECK(m.experts_per_gpu_max == k.busiest);
    CHECK(m.even == k.even);
    CHECK(m.expert_params_per_gpu == std::int64_t(k.busiest) * 32 * expert);
    CHECK(m.expert_bytes_per_gpu == doctest::Approx(double(k.busiest) * 32 * expert * 2));
    CHECK(m.replicated_bytes == doctest::Approx(replicated));
    CHECK(m.total_bytes_per_gpu == doctest::Approx(m.expert_bytes_per_gpu + replicated));
  }
  // EP = 1: all experts, bf16: 2.819 B x 2 bytes = 5.64 GB.
  CHECK(ep_memory(c, 1).expert_bytes_per_gpu / 1e9 == doctest::Approx(5.637).epsilon(0.001));
  CHECK(ep_memory(c, 4, 4.0).expert_bytes_per_gpu == doctest::Approx(4.0 * 32 * expert * 4));  // fp32
  CHECK_THROWS(ep_memory(c, 0));
}

TEST_CASE("cost model: KV cache, activation and all-to-all estimates, by hand") {
  const ModelConfig c = phi_tiny_moe_config();
  // Phi-tiny-MoE: L=32 layers, 4 kv heads of 128, H=4096, I=448, top-2; bf16 = 2 bytes.
  // KV cache per token: 32 layers * 2 (K, V) * 4 * 128 * 2 bytes = 65,536 bytes = 64 KiB.
  CHECK(kv_cache_bytes(c, 1, 1) == 65536.0);
  CHECK(kv_cache_bytes(c, 3, 1000) == 3.0 * 1000 * 65536);
  CHECK(kv_cache_bytes(c, 3, 1000, 1.0) == 3.0 * 1000 * 32768);  // fp8 cache: half
  CHECK(kv_cache_bytes(c, 0, 1000) == 0.0);
  // Activations per token: (4 * 4096 + 2 * 2 * 448) * 2 bytes = (16384 + 1792) * 2 = 36,352 bytes.
  CHECK(activation_bytes(c, 1) == 36352.0);
  CHECK(activation_bytes(c, 10) == 363520.0);
  // All-to-all per token: 2 buffers * 2 rows * 4096 * 2 bytes = 32,768 bytes.
  CHECK(all_to_all_buffer_bytes(c, 1) == 32768.0);
  CHECK(all_to_all_buffer_bytes(c, 7) == 7 * 32768.0);

  CHECK(sequences_per_gpu(8, 1) == 8);
  CHECK(sequences_per_gpu(8, 4) == 2);
  CHECK(sequences_per_gpu(8, 3) == 3);   // ceil: the busiest GPU
  CHECK(sequences_per_gpu(8, 16) == 1);
  CHECK(sequences_per_gpu(0, 4) == 0);
  CHECK_THROWS(sequences_per_gpu(8, 0));

  // batch 8 of 2048 tokens over EP 4: 2 sequences, 4096 tokens on the busiest GPU.
  const EpWorkloadMemory m = ep_workload_memory(c, 4, 8, 2048);
  CHECK(m.ep_size == 4);
  CHECK(m.sequences_per_gpu == 2);
  CHECK(m.tokens_per_gpu == 4096);
  CHECK(m.kv_cache_bytes == 4096.0 * 65536);   // 256 MiB
  CHECK(m.kv_cache_bytes == 256.0 * 1024 * 1024);
  CHECK(m.activation_bytes == 4096.0 * 36352);
  CHECK(m.all_to_all_bytes == 4096.0 * 32768);  // 128 MiB
  CHECK(m.buffers_bytes() == m.activation_bytes + m.all_to_all_bytes);
  CHECK(m.total_bytes() == 4096.0 * (65536 + 36352 + 32768));

  // A second shape with other numbers everywhere (GQA 8 kv heads of 64, top-3, 5 layers).
  ModelConfig d = c;
  d.num_hidden_layers = 5;
  d.num_key_value_heads = 8;
  d.head_dim = 64;
  d.hidden_size = 512;
  d.intermediate_size = 96;
  d.num_experts_per_tok = 3;
  // per token: KV 5*2*8*64*2 = 10,240; act (4*512 + 2*3*96)*2 = (2048+576)*2 = 5,248; a2a 2*3*512*2 = 6,144.
  const EpWorkloadMemory n = ep_workload_memory(d, 3, 10, 100);  // ceil(10/3) = 4 sequences, 400 tokens
  CHECK(n.sequences_per_gpu == 4);
  CHECK(n.tokens_per_gpu == 400);
  CHECK(n.kv_cache_bytes == 400.0 * 10240);
  CHECK(n.activation_bytes == 400.0 * 5248);
  CHECK(n.all_to_all_bytes == 400.0 * 6144);
}

TEST_CASE("cost model: bytes per parameter of the config's dtype; Phi-tiny-MoE's index size") {
  ModelConfig c = phi_tiny_moe_config();
  CHECK(bytes_per_param(c) == 2);  // bfloat16
  // The index's metadata.total_size of the real checkpoint: 3,755,220,288 bf16 parameters.
  CHECK(count_params(c).total * bytes_per_param(c) == 7'510'440'576);
  c.torch_dtype = "float16";
  CHECK(bytes_per_param(c) == 2);
  c.torch_dtype = "float32";
  CHECK(bytes_per_param(c) == 4);
  c.torch_dtype = "int4";
  CHECK_THROWS_AS(bytes_per_param(c), Error);
}
