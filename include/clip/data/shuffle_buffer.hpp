// A shuffle buffer, WebDataset's way of shuffling a stream too large to permute: items are held
// until `capacity` have arrived, then each new arrival releases one held item drawn uniformly;
// at the end of the stream the rest leave in random order. An item moves at most about
// `capacity` places earlier and arbitrarily far later. The order depends only on the arrival
// order and the seed. A capacity of 0 or 1 passes items straight through.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "clip/data/random.hpp"

namespace clip::data {

template <class T>
class ShuffleBuffer {
 public:
  ShuffleBuffer(int64_t capacity, uint64_t seed) : capacity_(capacity < 1 ? 1 : static_cast<size_t>(capacity)), rng_(seed) {
    items_.reserve(capacity_);
  }

  // Takes an item; gives one back once the buffer is full.
  std::optional<T> push(T item) {
    if (capacity_ == 1) return item;
    items_.push_back(std::move(item));
    if (items_.size() < capacity_) return std::nullopt;
    return take();
  }

  // After the last push: the held items one at a time, then nothing.
  std::optional<T> drain() {
    if (items_.empty()) return std::nullopt;
    return take();
  }

  size_t size() const { return items_.size(); }

 private:
  T take() {
    const size_t j = static_cast<size_t>(rng_.below(items_.size()));
    std::swap(items_[j], items_.back());
    T out = std::move(items_.back());
    items_.pop_back();
    return out;
  }

  size_t capacity_;
  Rng rng_;
  std::vector<T> items_;
};

}  // namespace clip::data
