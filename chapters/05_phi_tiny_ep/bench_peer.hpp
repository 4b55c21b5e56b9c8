// The peer of chapter 05's --bench, measured in the same machine session: HF transformers' PhimoeForCausalLM
// at the same shapes (scripts/hf_model_bench.py --json FILE), read back so the table shows measured ratios.
#pragma once
#include <string>

namespace eplab {

struct ModelPeer {
  bool present = false;
  double prefill = 0, decode_b1 = 0, decode_b16 = 0;  // tokens/s, each the best of HF's implementations
  std::string prefill_impl, decode_b1_impl, decode_b16_impl, gpu;
};

// Throws eplab::Error (one line) when the file cannot be read or lacks the "best" entries. "" = no peer.
ModelPeer load_model_peer(const std::string& path);

}  // namespace eplab
