#include "util/cli.hpp"

#include <iostream>

#include "util/check.hpp"
#include "util/report.hpp"

#ifndef EPLAB_DEFAULT_MODEL_DIR
#define EPLAB_DEFAULT_MODEL_DIR "data/mini"
#endif

namespace eplab {

std::string default_model_dir() {
  if (const char* env = std::getenv("EPLAB_MODEL")) return env;
  return EPLAB_DEFAULT_MODEL_DIR;
}

void add_common_options(CLI::App& app, CommonOptions& opt) {
  opt.model = default_model_dir();
  app.add_option("--model", opt.model, "checkpoint directory (HF format: config.json + safetensors)")
      ->capture_default_str();
  app.add_option("--device", opt.device, "where to run: auto (GPU if present), gpu, cpu")
      ->check(CLI::IsMember({"auto", "gpu", "cpu"}))
      ->capture_default_str();
  app.add_option("--seed", opt.seed, "random seed for inputs")->capture_default_str();
  app.add_option("--json", opt.json, "also write results as JSON to this file");
}

std::optional<int> parse_cli(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    std::cout << app.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
    fail(msg, " (see --help)");
  }
  // --json FILE (add_common_options): a file that cannot be written fails now, not after the run.
  if (const CLI::Option* json = app.get_option_no_throw("--json"); json && json->count() > 0)
    require_writable_file("--json", json->results().back());
  return std::nullopt;
}

}  // namespace eplab
