// Model weights with static shapes, and the one mechanism that names them.
//
// Every block's `Params` struct holds its tensors as `Param<Dims...>` members and lists them, in
// OpenAI's state_dict order and under OpenAI's names, in a `visit(f, prefix)` member. Loading,
// saving, counting, zeroing gradients and the optimizer are all written once, against `visit`.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace clip {

// Storage for one parameter: a fixed-size float array that is copied by value. A new one is left
// uninitialised (like torch.empty), so declaring a large model costs no time and touches no
// memory until its weights are loaded or initialised.
class FloatBuffer {
 public:
  explicit FloatBuffer(int64_t n) : size_(n), data_(std::make_unique_for_overwrite<float[]>(n)) {}
  FloatBuffer(const FloatBuffer& o) : FloatBuffer(o.size_) { std::copy(o.begin(), o.end(), begin()); }
  FloatBuffer& operator=(const FloatBuffer& o) {
    if (this != &o) std::copy(o.begin(), o.begin() + std::min(size_, o.size_), begin());
    return *this;
  }
  FloatBuffer(FloatBuffer&&) noexcept = default;
  FloatBuffer& operator=(FloatBuffer&&) noexcept = default;

  int64_t size() const { return size_; }
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  float* begin() { return data(); }
  float* end() { return data() + size_; }
  const float* begin() const { return data(); }
  const float* end() const { return data() + size_; }
  float& operator[](int64_t i) { return data_[i]; }
  float operator[](int64_t i) const { return data_[i]; }
  friend bool operator==(const FloatBuffer& a, const FloatBuffer& b) {
    return a.size_ == b.size_ && std::equal(a.begin(), a.end(), b.begin());
  }

 private:
  int64_t size_;
  std::unique_ptr<float[]> data_;
};

// parameter: trained; buffer: state that travels with the weights (BatchNorm statistics).
enum class Role { parameter, buffer };

// A float tensor whose shape is part of its type. Param<> is a scalar (shape []).
template <int... Dims>
struct Param {
  static_assert(((Dims > 0) && ...), "every dimension of a parameter must be positive");
  static constexpr int rank = sizeof...(Dims);
  static constexpr std::array<int64_t, rank> shape{Dims...};
  static constexpr int64_t numel = (int64_t{1} * ... * int64_t{Dims});

  FloatBuffer values{numel};

  float* data() { return values.data(); }
  const float* data() const { return values.data(); }
  float& operator[](int64_t i) { return values[i]; }
  float operator[](int64_t i) const { return values[i]; }
  void fill(float v) { std::fill(values.begin(), values.end(), v); }
};

// An int64 scalar buffer, such as BatchNorm's num_batches_tracked.
struct Counter {
  static constexpr int rank = 0;
  static constexpr std::array<int64_t, 0> shape{};
  static constexpr int64_t numel = 1;
  int64_t value = 0;
};

template <class T> inline constexpr bool is_counter_v = std::is_same_v<std::remove_cvref_t<T>, Counter>;

// Visits every tensor of `params` (anything with a visit(f, prefix) member), read-only.
// `visit` members are written once, non-const; reading through them does not modify.
template <class Params, class F>
void for_each_tensor(const Params& params, F&& f, const std::string& prefix = "") {
  const_cast<Params&>(params).visit(
      [&](const std::string& name, auto& tensor, Role role) { f(name, std::as_const(tensor), role); }, prefix);
}

// Visits every tensor of `params` for writing.
template <class Params, class F>
void for_each_tensor(Params& params, F&& f, const std::string& prefix = "") {
  params.visit(f, prefix);
}

// Sets every tensor to zero (gradients, or a model about to be initialised).
template <class Params>
void zero(Params& params) {
  for_each_tensor(params, [](const std::string&, auto& t, Role) {
    if constexpr (is_counter_v<decltype(t)>) t.value = 0;
    else t.fill(0.0f);
  });
}

// Number of trained parameters (buffers excluded), as PyTorch's model.parameters() counts them.
template <class Params>
int64_t parameter_count(const Params& params) {
  int64_t n = 0;
  for_each_tensor(params, [&](const std::string&, const auto& t, Role role) {
    if (role == Role::parameter) n += std::remove_cvref_t<decltype(t)>::numel;
  });
  return n;
}

}  // namespace clip
