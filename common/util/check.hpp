// Errors that end a program with one clear line instead of a crash.
//
// Everything in EP Lab reports bad input by throwing eplab::Error with a message that names the thing
// that is wrong (file, tensor, flag) and what to do. main() wraps its body in eplab::run_main, which
// prints "error: <message>" on one line to stderr and returns exit code 2.
#pragma once
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace eplab {

// The message on one line whatever it quotes: control bytes (a newline inside a tensor name read from a file)
// become \n, \r, \t or \xNN.
std::string single_line(const std::string& message);

struct Error : std::runtime_error {
  explicit Error(const std::string& message) : std::runtime_error(single_line(message)) {}
};

// Builds a message from any streamable pieces: fail("tensor ", name, " has shape ", n).
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

template <typename... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) fail(parts...);
}

// Runs body(); turns any exception into one line on stderr and a non-zero exit code.
int run_main(const std::function<int()>& body);

// What every main says when the host runs out of memory (std::bad_alloc), instead of the exception's name.
inline constexpr const char* kOutOfHostMemory = "out of host memory (try fewer tokens or a smaller model)";

}  // namespace eplab
