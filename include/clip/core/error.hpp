// Errors: every failure is a clip::Error whose message names where it was raised and why.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace clip {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void fail(const char* file, int line, const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  message << " [" << file << ":" << line << "]";
  throw Error(message.str());
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
