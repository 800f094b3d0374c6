// Fully connected layers on Eigen: y = x W^T + b with PyTorch's weight layout W [Out, In], and
// y = x P for CLIP's two projection matrices P [In, Out] (visual.proj, text_projection).
//
// Activations are row-major [rows, features] with rows = batch * tokens, the only dynamic extent.
// Every product is Eigen GEMM written straight into its destination (noalias, no temporary).
// Large products are split by output columns over the OpenMP threads, each thread running one
// single-threaded Eigen GEMM on its slice of W (see gemm_accumulate). Bias and residual are not separate passes after the product:
// Eigen's `dst = a * b` clears dst before it accumulates anyway, so we start dst from the bias
// (or the residual plus the bias) instead and let the GEMM accumulate onto it with `+=`.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

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

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMap = Eigen::Map<RowMatrix>;
using ConstRowMap = Eigen::Map<const RowMatrix>;

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

// y[rows, Out] += x[rows, In] w[Out, In]^T.
//
// Split by output columns: thread i owns columns [o_i, o_{i+1}) (multiples of 16 floats, whole
// cache lines) and multiplies x by its rows of W with Eigen's single-threaded GEMM (inside a
// parallel region Eigen does not start threads of its own). Eigen's own parallel GEMM shares
// packed blocks between threads and spin-waits on them, which collapses when the cores are also
// busy with other work: on this 2-core machine, 400x768x2304 under a load of ~7 ran 19 GF/s mean
// with Eigen's threads and 24 GF/s split; idle, both run ~175-190 GF/s. Products too small or too
// narrow to split are left to Eigen as they are.
inline void gemm_accumulate(float* y, const float* x, const float* w, int64_t rows, int64_t in, int64_t out) {
  int parts = 1;
#ifdef _OPENMP
  if (rows * in * out >= (int64_t{1} << 21) && !omp_in_parallel())
    parts = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), out / 64));
#endif
  if (parts <= 1) {
    RowMap(y, rows, out).noalias() += ConstRowMap(x, rows, in) * ConstRowMap(w, out, in).transpose();
    return;
  }
  using StridedMap = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
#pragma omp parallel for schedule(static) num_threads(parts)
  for (int part = 0; part < parts; ++part) {
    const int64_t o0 = out * part / parts / 16 * 16;
    const int64_t o1 = part == parts - 1 ? out : out * (part + 1) / parts / 16 * 16;
    StridedMap ys(y + o0, rows, o1 - o0, Eigen::OuterStride<>(out));  // [rows, o1 - o0] of [rows, Out]
    ys.noalias() += ConstRowMap(x, rows, in) * ConstRowMap(w + o0 * in, o1 - o0, in).transpose();
  }
}

}  // namespace detail

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
  detail::RowMap y(out, rows, Out);
  detail::ConstRowMap x(in, rows, In);
  detail::ConstRowMap p(proj, In, Out);
  y.noalias() = x * p;
}

}  // namespace clip
