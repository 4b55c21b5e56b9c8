// Fuzz target: config.json (common/model/config.cpp, ModelConfig::load).
//
// Input: the text of config.json, written into a directory of its own.
// What must hold: ModelConfig::load throws eplab::Error or returns a config that validate() accepts, and
// that to_json() writes and from_json() reads back to the same config (to_json() of both equal).
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "model/config.hpp"
#include "util/check.hpp"

using namespace eplab;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string dir = fuzz::ScratchDir::get().subdir("config");
  fuzz::ScratchDir::get().write("config/config.json", fuzz::as_view(data, size));
  ModelConfig c;
  try {
    c = ModelConfig::load(dir);
  } catch (const Error& e) {
    fuzz::one_line(e);
    return 0;
  }
  c.validate();  // what load accepted, validate accepts (throws -> finding)
  const nlohmann::json j = c.to_json();
  const ModelConfig back = ModelConfig::from_json(j);
  if (back.to_json() != j) fuzz::broken("config: to_json -> from_json -> to_json changed the config");
  return 0;
}
