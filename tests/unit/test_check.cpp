// eplab::Error keeps every message on one line, whatever it quotes from a file.
#include <doctest/doctest.h>

#include <string>

#include "util/check.hpp"

using namespace eplab;

TEST_CASE("Error: control bytes in a message are escaped, so it stays one line") {
  const std::string raw = std::string("tensor 'bad\nname' tab\there cr\r nul") + '\0' + " esc\x1b del\x7f end";
  const Error e(raw);
  CHECK(std::string(e.what()) == "tensor 'bad\\nname' tab\\there cr\\r nul\\x00 esc\\x1b del\\x7f end");
  CHECK(std::string(e.what()).find('\n') == std::string::npos);
  // Plain text and UTF-8 pass through unchanged.
  CHECK(std::string(Error("caf\xc3\xa9: 5.51 M per expert").what()) == "caf\xc3\xa9: 5.51 M per expert");
  try {
    fail("shard '", std::string("a\nb"), "' is missing");
  } catch (const Error& f) {
    CHECK(std::string(f.what()) == "shard 'a\\nb' is missing");
  }
}
