// A float tensor with a run-time shape: what files hold, what tests compare and what traces
// record. Model code works on raw pointers with static feature sizes instead.
#pragma once

#include <cstdint>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace clip {

using Shape = std::vector<int64_t>;

inline int64_t shape_numel(const Shape& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
}

inline std::string shape_string(const Shape& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

struct Tensor {
  Shape shape;
  std::vector<float> values;

  Tensor() = default;
  explicit Tensor(Shape s) : shape(std::move(s)), values(shape_numel(shape), 0.0f) {}
  Tensor(Shape s, const float* data) : shape(std::move(s)), values(data, data + shape_numel(shape)) {}

  int64_t numel() const { return static_cast<int64_t>(values.size()); }
  float* data() { return values.data(); }
  const float* data() const { return values.data(); }
};

// Intermediate results a forward pass records when asked, by the reference's module names
// ("visual.conv1", "text.transformer.resblocks.0", ...).
using Trace = std::map<std::string, Tensor>;

// Records a tensor into an optional trace.
inline void record(Trace* trace, const std::string& name, Shape shape, const float* data) {
  if (trace) (*trace)[name] = Tensor(std::move(shape), data);
}

}  // namespace clip
