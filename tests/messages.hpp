// The message of the clip::Error a call throws ("" when it throws none), for tests that check
// what a user is told.
#pragma once

#include <functional>
#include <string>

#include "clip/core/error.hpp"

namespace clip::test {

inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const clip::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace clip::test
