// The decimal value a float hyperparameter stands for. A user who writes lr = 1e-3f or
// beta1 = 0.9f means 0.001 and 0.9, but the floats are 0.00100000005 and 0.899999976; PyTorch
// forms its step scalars (1 - 0.9**t, lr * wd, base * (step + 1) / warmup) in double from the
// decimals. The shortest decimal that reads back as the same float recovers them, so the
// schedule and the optimizer round their scalars exactly as a PyTorch run with the same settings.
#pragma once

#include <charconv>
#include <cstdlib>
#include <system_error>

namespace clip {

inline double decimal_value(float x) {
  char text[32];
  const auto [end, ec] = std::to_chars(text, text + sizeof text - 1, x);
  if (ec != std::errc()) return x;
  *end = '\0';
  return std::strtod(text, nullptr);
}

}  // namespace clip
