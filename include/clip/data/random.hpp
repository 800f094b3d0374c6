// Random numbers for the data pipeline. Every draw is a pure function of the run's seed and of
// what it is for (shard order, shuffle buffer, one sample's augmentation...), so the data a run
// sees never depends on thread timing and a resumed run draws exactly what the first one did.
//
// The generator is xoshiro256** seeded through SplitMix64, and bounded integers use rejection
// sampling, all written out here: the std:: distributions differ between standard libraries,
// which would make a run's data depend on the compiler it was built with.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"

namespace clip::data {

// SplitMix64's output function: a bijection of 64-bit words with good avalanche.
inline constexpr uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The seed of one use of randomness: the run's seed followed by a path such as
// {purpose, epoch, stream index}. Different paths give unrelated streams.
inline constexpr uint64_t derive_seed(uint64_t seed, std::initializer_list<uint64_t> path) {
  uint64_t h = mix64(seed);
  for (uint64_t part : path) h = mix64(h ^ mix64(part));
  return h;
}

// What a derived seed is for: the first element of derive_seed's path.
enum class RandomUse : uint64_t { shard_order = 1, shuffle_buffer = 2, table_rows = 3, augment = 4 };

inline constexpr uint64_t derive_seed(uint64_t seed, RandomUse use, std::initializer_list<uint64_t> path) {
  uint64_t h = derive_seed(seed, {static_cast<uint64_t>(use)});
  for (uint64_t part : path) h = mix64(h ^ mix64(part));
  return h;
}

// xoshiro256** (Blackman and Vigna, 2018).
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (uint64_t& word : s_) word = mix64(seed += 0x9E3779B97F4A7C15ull);
  }

  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  // Uniform in [0, n), without modulo bias.
  uint64_t below(uint64_t n) {
    CLIP_CHECK(n > 0, "cannot draw a number below 0");
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: the low values drawn too often
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

  // Uniform in [0, 1), with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  static constexpr uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// Fisher-Yates: every order equally likely.
template <class T>
void shuffle(std::vector<T>& items, Rng& rng) {
  for (size_t i = items.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.below(i));
    std::swap(items[i - 1], items[j]);
  }
}

}  // namespace clip::data
