// Arithmetic on sizes read from files: a width times a height, a shape's element count, an
// offset plus a length. Any of them can be chosen by whoever wrote the file, so none may wrap
// around (signed overflow is undefined behaviour; unsigned wrap-around turns a huge size into a
// small one that passes every later check). These return nothing instead of a wrong result.
#pragma once

#include <concepts>
#include <optional>
#include <span>

namespace clip {

template <std::integral T>
constexpr std::optional<T> checked_mul(T a, T b) {
  T out;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

template <std::integral T>
constexpr std::optional<T> checked_add(T a, T b) {
  T out;
  if (__builtin_add_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// The product of every factor (1 for none), or nothing when it overflows T or a factor is
// negative (a shape's element count).
template <std::integral T>
constexpr std::optional<T> checked_product(std::span<const T> factors) {
  T out = 1;
  for (T f : factors) {
    if (f < 0) return std::nullopt;
    const std::optional<T> next = checked_mul(out, f);
    if (!next) return std::nullopt;
    out = *next;
  }
  return out;
}

}  // namespace clip
