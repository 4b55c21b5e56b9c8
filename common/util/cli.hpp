// Command-line handling shared by every binary (CLI11 from Debian).
//
// Every chapter takes the same core flags: --model DIR, --device auto|gpu|cpu, --seed N, --json FILE.
// Parse errors become one line ("error: unknown flag --foo (see --help)") and exit code 2.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace eplab {

struct CommonOptions {
  std::string model;            // checkpoint directory (HF format); defaults to the generated mini model
  std::string device = "auto";  // auto | gpu | cpu
  std::uint64_t seed = 1;
  std::string json;             // write machine-readable results here when non-empty
};

// The directory `make model` writes the default synthetic model to.
std::string default_model_dir();

void add_common_options(CLI::App& app, CommonOptions& opt);

// Parses argv. Returns an exit code when the program should stop now (0 after --help), nothing when it
// should go on. Bad flags throw eplab::Error with a one-line message, and so does a --json FILE that
// cannot be written (its folder missing or read-only), before any work is done.
std::optional<int> parse_cli(CLI::App& app, int argc, char** argv);

}  // namespace eplab
