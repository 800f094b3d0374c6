// Fully connected layers: y = x W^T + b with PyTorch's weight layout W [Out, In], and y = x P for
// CLIP's two projection matrices P [In, Out] (visual.proj, text_projection).
//
// Activations are row-major [rows, features] with rows = batch * tokens, the only dynamic extent.
// Backward passes follow one rule: parameter gradients accumulate (+=), so micro-batches and
// shared weights add up; activation gradients are assigned (or added into, where a function's
// comment says so).
// Bias and residual are not separate passes after the product: the output starts as the bias
// (or the residual plus the bias) and the GEMM accumulates onto it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clip/ops/gemm.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// One nn.Linear(In, Out): weight [Out, In], bias [Out], under "<prefix>weight" and "<prefix>bias".
template <int In, int Out>
struct LinearParams {
  Param<Out, In> weight;  // [Out, In]
  Param<Out> bias;        // [Out]

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight, Role::parameter);
    f(prefix + "bias", bias, Role::parameter);
  }
};

namespace detail {

// Row loops below this many elements are not worth waking a second thread for.
inline constexpr int64_t parallel_min_elements = int64_t{1} << 15;

// out[r, :] = bias (+ residual[r, :]) for every row; residual may be out itself, or null.
inline void init_rows(float* out, const float* residual, const float* bias, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= parallel_min_elements)
  for (int64_t r = 0; r < rows; ++r) {
    float* y = out + r * cols;
    if (residual) {
      const float* x = residual + r * cols;
      if (bias) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) y[j] = x[j] + bias[j];
      } else if (x != y) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) y[j] = x[j];
      }
    } else if (bias) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) y[j] = bias[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) y[j] = 0.0f;
    }
  }
}

// y[rows, Out] += x[rows, In] w[Out, In]^T, on the project's AVX-512 GEMM (ops/gemm.hpp), which
// splits large products over the OpenMP threads itself.
inline void gemm_accumulate(float* y, const float* x, const float* w, int64_t rows, int64_t in, int64_t out) {
  gemm_nt(rows, out, in, x, in, w, in, y, out, /*accumulate=*/true);
}

}  // namespace detail

// sums[j] += sum over rows of x[r, j]: the bias gradient. Threads take column strips, so each
// sum runs over the rows in order and the result does not depend on the thread count.
inline void column_sums_accumulate(float* sums, const float* x, int64_t rows, int64_t cols) {
  constexpr int64_t strip = 64;
  const int64_t strips = (cols + strip - 1) / strip;
#pragma omp parallel for schedule(static) if (rows * cols >= detail::parallel_min_elements && strips > 1)
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t j0 = s * strip, j1 = std::min(cols, j0 + strip);
    float acc[strip] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * cols;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += row[j];
    }
    for (int64_t j = j0; j < j1; ++j) sums[j] += acc[j - j0];
  }
}

// out = in W^T + bias. `bias` may be null. `out` must not overlap `in`.
template <int In, int Out>
void linear_forward(float* out,           // [rows, Out]
                    const float* in,      // [rows, In]
                    const float* weight,  // [Out, In]
                    const float* bias,    // [Out] or null
                    int64_t rows) {
  static_assert(In > 0 && Out > 0, "a linear layer needs positive input and output sizes");
  detail::init_rows(out, nullptr, bias, rows, Out);
  detail::gemm_accumulate(out, in, weight, rows, In, Out);
}

// out = residual + in W^T + bias: the output projection of a residual branch, with the skip
// connection folded in. `out` may be the same buffer as `residual` (an in-place update); neither
// may overlap `in`. `bias` may be null.
template <int In, int Out>
void linear_residual_forward(float* out,            // [rows, Out]
                             const float* in,       // [rows, In]
                             const float* weight,   // [Out, In]
                             const float* bias,     // [Out] or null
                             const float* residual, // [rows, Out]
                             int64_t rows) {
  static_assert(In > 0 && Out > 0, "a linear layer needs positive input and output sizes");
  detail::init_rows(out, residual, bias, rows, Out);
  detail::gemm_accumulate(out, in, weight, rows, In, Out);
}

// out = in P, with P stored [In, Out] and used as is (visual.proj, text_projection).
template <int In, int Out>
void projection_forward(float* out,         // [rows, Out]
                        const float* in,    // [rows, In]
                        const float* proj,  // [In, Out]
                        int64_t rows) {
  static_assert(In > 0 && Out > 0, "a projection needs positive input and output sizes");
  gemm_nn(rows, Out, In, in, In, proj, Out, out, Out, /*accumulate=*/false);
}

// Backward of linear_forward / linear_residual_forward (the residual's gradient is d_out itself):
//   d_in = d_out W (assigned; skipped when d_in is null), d_weight += d_out^T in,
//   d_bias += column sums of d_out (skipped when d_bias is null).
// The weight gradient is taken first, so d_in may be the same buffer as `in` (a backward pass
// can put the input's gradient where the input was); d_in must not overlap d_out.
template <int In, int Out>
void linear_backward(float* d_in,            // [rows, In] or null
                     float* d_weight,        // [Out, In]
                     float* d_bias,          // [Out] or null
                     const float* d_out,     // [rows, Out]
                     const float* in,        // [rows, In]
                     const float* weight,    // [Out, In]
                     int64_t rows) {
  static_assert(In > 0 && Out > 0, "a linear layer needs positive input and output sizes");
  if (rows <= 0) return;
  gemm_tn(Out, In, rows, d_out, Out, in, In, d_weight, In, /*accumulate=*/true);
  if (d_bias) column_sums_accumulate(d_bias, d_out, rows, Out);
  if (d_in) gemm_nn(rows, In, Out, d_out, Out, weight, In, d_in, In, /*accumulate=*/false);
}

// Backward of projection_forward (out = in P): d_in = d_out P^T (assigned, when not null),
// d_proj += in^T d_out. As in linear_backward, d_in may be the same buffer as `in`.
template <int In, int Out>
void projection_backward(float* d_in,         // [rows, In] or null
                         float* d_proj,       // [In, Out]
                         const float* d_out,  // [rows, Out]
                         const float* in,     // [rows, In]
                         const float* proj,   // [In, Out]
                         int64_t rows) {
  static_assert(In > 0 && Out > 0, "a projection needs positive input and output sizes");
  if (rows <= 0) return;
  gemm_tn(In, Out, rows, in, In, d_out, Out, d_proj, Out, /*accumulate=*/true);
  if (d_in) gemm_nt(rows, In, Out, d_out, Out, proj, Out, d_in, In, /*accumulate=*/false);
}

}  // namespace clip
