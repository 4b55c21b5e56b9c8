#include "bench_peer.hpp"

#include <nlohmann/json.hpp>

#include "util/check.hpp"
#include "util/report.hpp"

namespace eplab {

ModelPeer load_model_peer(const std::string& path) {
  ModelPeer p;
  if (path.empty()) return p;
  const nlohmann::json j = read_json(path, "--peer-json");
  require(j.contains("best") && j["best"].is_object(), "--peer-json ", path,
          ": no 'best' object (write it with scripts/hf_model_bench.py --json)");
  auto take = [&](const char* key, double& value, std::string& impl) {
    const nlohmann::json& b = j["best"];
    require(b.contains(key) && b[key].is_object() && b[key].contains("value") && b[key]["value"].is_number(),
            "--peer-json ", path, ": best.", key, ".value is missing");
    value = b[key]["value"].get<double>();
    require(value > 0, "--peer-json ", path, ": best.", key, ".value must be > 0, got ", value);
    impl = b[key].value("impl", std::string("?"));
  };
  take("prefill_tok_s", p.prefill, p.prefill_impl);
  take("decode_b1_tok_s", p.decode_b1, p.decode_b1_impl);
  take("decode_b16_tok_s", p.decode_b16, p.decode_b16_impl);
  p.gpu = j.value("gpu", std::string("?"));
  p.present = true;
  return p;
}

}  // namespace eplab
