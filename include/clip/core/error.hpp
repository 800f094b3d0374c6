// Errors: every failure is a clip::Error whose message says, as a sentence for the user, what is
// wrong; where() names the source line that raised it, for --verbose and debugging.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace clip {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
  Error(const std::string& message, std::string where) : std::runtime_error(message), where_(std::move(where)) {}

  // "file:line" of the CLIP_FAIL that raised it; empty when unknown.
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void fail(const char* file, int line, const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(message.str(), std::string(file) + ":" + std::to_string(line));
}
}  // namespace detail

}  // namespace clip

// Throws clip::Error with the streamed parts of the message and the source location.
#define CLIP_FAIL(...) ::clip::detail::fail(__FILE__, __LINE__, __VA_ARGS__)

// Checks a condition that bad input can break; the message is a sentence for the user.
#define CLIP_CHECK(cond, ...)                   \
  do {                                          \
    if (!(cond)) CLIP_FAIL(__VA_ARGS__);        \
  } while (0)
