// QuickGELU, the activation of every CLIP MLP: x * sigmoid(1.702 x) (not erf GELU).
#pragma once

#include <algorithm>
#include <cstdint>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace clip {

namespace detail {

// Values go through Eigen's vectorised exp in aligned fixed-size blocks of 64, copied in and out.
// On a mapped array Eigen computes the unaligned head and tail with the scalar exp, which can
// differ in the last bit: the result would depend on where a buffer happens to be allocated.
// Through blocks, every value takes the same path, so equal inputs give equal outputs anywhere.
inline constexpr int act_block = 64;
using ActBlock = Eigen::Array<float, act_block, 1>;

// The first n (<= 64) values of src, zero-padded. A whole block is 4 vector loads (a memcpy call
// per block cost ~7% of a training step).
inline ActBlock load_block(const float* src, int n) {
  if (n == act_block) return Eigen::Map<const ActBlock>(src);
  ActBlock b = ActBlock::Zero();
  for (int j = 0; j < n; ++j) b[j] = src[j];
  return b;
}

// dst[j] = b[j] for j < n (<= 64).
inline void store_block(float* dst, const ActBlock& b, int n) {
  if (n == act_block) {
    Eigen::Map<ActBlock> out(dst);
    out = b;
  } else {
    for (int j = 0; j < n; ++j) dst[j] = b[j];
  }
}

// sigmoid(1.702 x); exp overflows to inf for very negative x, giving 0.
inline ActBlock quick_gelu_sigmoid(const ActBlock& x) { return ((-(x * 1.702f)).exp() + 1.0f).inverse(); }

}  // namespace detail

// out = in * sigmoid(1.702 in), elementwise over n values. `out` may equal `in`.
// Eigen's vectorised exp keeps this a cheap pass next to the GEMMs around it.
inline void quick_gelu_forward(float* out, const float* in, int64_t n) {
  using detail::act_block;
  constexpr int64_t chunk = int64_t{1} << 14;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t i = c * chunk; i < end; i += act_block) {
      const int w = static_cast<int>(std::min<int64_t>(act_block, end - i));
      const detail::ActBlock x = detail::load_block(in + i, w);
      const detail::ActBlock y = x * detail::quick_gelu_sigmoid(x);
      detail::store_block(out + i, y, w);
    }
  }
}

// Backward of quick_gelu_forward over `rows` rows of Cols values, with s = sigmoid(1.702 x):
//   d_in = d_out * (s + 1.702 x s (1 - s))   (assigned; d_in may equal d_out or in)
//   d_bias += column sums of d_in, when d_bias is not null: the bias gradient of the linear layer
//   that produced `in` (c_fc), in the same pass over memory instead of a second one.
// Each thread takes a range of 64-column blocks and walks the rows in order (its part of a row
// is contiguous), so every bias sum runs over the rows in order whatever the thread count.
template <int Cols>
void quick_gelu_backward(float* d_in,         // [rows, Cols]
                         float* d_bias,       // [Cols] or null
                         const float* d_out,  // [rows, Cols]
                         const float* in,     // [rows, Cols] the forward's input
                         int64_t rows) {
  static_assert(Cols > 0, "QuickGELU needs a positive width");
  using detail::act_block;
  using detail::ActBlock;
  constexpr int strips = (Cols + act_block - 1) / act_block;
#pragma omp parallel if (rows * Cols >= (int64_t{1} << 15) && strips > 1)
  {
#ifdef _OPENMP
    const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
#else
    const int threads = 1, thread = 0;
#endif
    const int s0 = strips * thread / threads, s1 = strips * (thread + 1) / threads;
    ActBlock acc[strips];
    for (int s = s0; s < s1; ++s) acc[s].setZero();
    for (int64_t r = 0; r < rows; ++r)
      for (int s = s0; s < s1; ++s) {
        const int j0 = s * act_block, w = std::min(Cols - j0, act_block);
        const int64_t at = r * Cols + j0;
        const ActBlock x = detail::load_block(in + at, w);
        const ActBlock dy = detail::load_block(d_out + at, w);  // zero padding: dx = 0 there
        const ActBlock sig = detail::quick_gelu_sigmoid(x);
        const ActBlock dx = dy * (sig + 1.702f * x * sig * (1.0f - sig));
        detail::store_block(d_in + at, dx, w);
        if (d_bias) acc[s] += dx;
      }
    if (d_bias)
      for (int s = s0; s < s1; ++s)
        for (int j = 0; j < std::min(Cols - s * act_block, act_block); ++j) d_bias[s * act_block + j] += acc[s][j];
  }
}

}  // namespace clip
