// Gradient clipping by the global L2 norm (Pascanu et al. 2013), as PyTorch's clip_grad_norm_:
// the norm of all trained tensors' gradients together; when it exceeds `max_norm`, every gradient
// is scaled by max_norm / (norm + 1e-6).
//
// The norm is summed in double over fixed chunks in a fixed order, so it does not depend on the
// thread count. The scaling is a factor the optimizer applies as it reads each gradient
// (AdamW::step's grad_scale), which saves a pass over the gradients; scale_gradients does it
// in place for other uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/core/batch_slice.hpp"
#include "clip/core/error.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// sqrt(sum of g^2) over every trained tensor of `grads` (buffers excluded), its work shared by
// `world` processes that hold the same gradients (after their sum): process `rank` sums the
// squares of its share of the chunks, `sum_partials` adds the processes' partial sums (an
// all-reduce of doubles: each is one process's value plus zeros, so exact), and every process
// adds them in the one order: the bits of gradient_norm(grads).
template <class Params>
double gradient_norm(const Params& grads, int rank, int world,
                     const std::function<void(double*, int64_t)>& sum_partials) {
  struct Chunk {
    const float* data;
    int64_t n;
  };
  constexpr int64_t chunk = int64_t{1} << 14;
  std::vector<Chunk> chunks;
  for_each_tensor(grads, [&](const std::string&, const auto& t, Role role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if constexpr (!is_counter_v<T>) {
      if (role != Role::parameter) return;
      for (int64_t b = 0; b < T::numel; b += chunk) chunks.push_back({t.data() + b, std::min(chunk, T::numel - b)});
    }
  });
  std::vector<double> partial(chunks.size(), 0.0);
  const Slice mine = batch_slice(static_cast<int64_t>(chunks.size()), world, rank);
  const int64_t end = mine.first + mine.rows;
#pragma omp parallel for schedule(static) if (mine.rows * chunk >= (int64_t{1} << 16))
  for (int64_t c = mine.first; c < end; ++c) {
    const float* x = chunks[c].data;
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < chunks[c].n; ++i) sum += double(x[i]) * x[i];
    partial[c] = sum;
  }
  if (world > 1) sum_partials(partial.data(), static_cast<int64_t>(partial.size()));
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

// sqrt(sum of g^2) over every trained tensor of `grads` (buffers excluded).
template <class Params>
double gradient_norm(const Params& grads) {
  return gradient_norm(grads, 0, 1, {});
}

// The factor clip_grad_norm_ multiplies gradients of norm `norm` by: min(1, max / (norm + 1e-6)).
// max_norm <= 0 means no clipping (factor 1).
inline float clip_factor(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0f;
  return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

// grads *= factor, every trained tensor.
template <class Params>
void scale_gradients(Params& grads, float factor) {
  for_each_tensor(grads, [&](const std::string&, auto& t, Role role) {
    using T = std::remove_cvref_t<decltype(t)>;
    if constexpr (!is_counter_v<T>) {
      if (role != Role::parameter) return;
      float* x = t.data();
#pragma omp parallel for simd schedule(static) if (T::numel >= (int64_t{1} << 16))
      for (int64_t i = 0; i < T::numel; ++i) x[i] *= factor;
    }
  });
}

// PyTorch's clip_grad_norm_ in place: returns the norm before clipping.
template <class Params>
double clip_gradient_norm(Params& grads, double max_norm) {
  const double norm = gradient_norm(grads);
  CLIP_CHECK(std::isfinite(norm), "the gradient norm is ", norm, ": the gradients hold NaN or Inf");
  const float factor = clip_factor(norm, max_norm);
  if (factor < 1.0f) scale_gradients(grads, factor);
  return norm;
}

}  // namespace clip
