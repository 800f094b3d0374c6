// Numeric helpers the CPU, host-replay and CUDA tests share, so that every test draws its inputs
// and measures its errors the same way (a tolerance in one file means what it means in another).
// Plain std + Boost.Test: it compiles under g++ and nvcc alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include <boost/test/unit_test.hpp>

namespace clip::test {

// True in the AddressSanitizer + UBSan build (.ci/sanitize). Its instrumented loops vectorise
// differently, so fp32 sums run in other orders there; the few tolerances that sit within a
// factor of two of the optimised build's rounding say how much they widen under it.
#if defined(__SANITIZE_ADDRESS__)  // g++ (clang: __has_feature(address_sanitizer))
inline constexpr bool kSanitizedBuild = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kSanitizedBuild = true;
#else
inline constexpr bool kSanitizedBuild = false;
#endif
#else
inline constexpr bool kSanitizedBuild = false;
#endif

// n samples of Normal(mean, scale) from std::mt19937(seed): fixed, reproducible test inputs.
inline std::vector<float> random_vector(int64_t n, uint32_t seed, float scale = 1.0f, float mean = 0.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(gen);
  return v;
}

// max |got - ref| / max |ref| over n elements: one scale-free error per tensor. No guard for an
// all-zero ref (the result is then inf or NaN and fails any bound), as the golden tests expect.
inline double max_relative(const float* got, const float* ref, int64_t n) {
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double(got[i]) - ref[i]));
    scale = std::max(scale, std::abs(double(ref[i])));
  }
  return diff / scale;
}

// max |got - ref| / max |ref|, or max |got - ref| when ref is all zero (an output that should
// vanish is then held to an absolute bound); the sizes must match.
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  BOOST_REQUIRE_EQUAL(got.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, std::abs(double(got[i]) - ref[i]));
    den = std::max(den, std::abs(double(ref[i])));
  }
  return den > 0 ? num / den : num;
}

// ||got - ref||_2 / ||ref||_2 over n elements: the whole tensor's error, for bf16 paths whose
// worst single element is noisy.
inline double relative_l2(const float* got, const float* ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(got[i]) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// max |v| over n elements: the absolute bound for tensors whose reference is (analytically) zero.
inline double max_abs(const float* v, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(double(v[i])));
  return m;
}

// A random CLIP batch for model variant Cfg, from std::mt19937_64(seed): Normal(0, 1) pixels
// [batch, 3, R, R]; captions of start of text, 1..T-2 words, end of text (the largest id, where the
// text tower pools), then zeros.
template <class Cfg>
void random_batch(std::vector<float>& images, std::vector<int32_t>& tokens, int64_t batch, uint64_t seed) {
  constexpr int R = Cfg::image_resolution, T = Cfg::context_length, V = Cfg::vocab_size;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  images.resize(batch * 3 * R * R);
  for (float& x : images) x = normal(rng);
  tokens.assign(batch * T, 0);
  std::uniform_int_distribution<int> word(1, V - 3), length(1, T - 2);
  for (int64_t b = 0; b < batch; ++b) {
    int32_t* row = tokens.data() + b * T;
    const int n = length(rng);
    row[0] = V - 2;
    for (int i = 1; i <= n; ++i) row[i] = word(rng);
    row[n + 1] = V - 1;
  }
}

}  // namespace clip::test
