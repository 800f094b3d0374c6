// LayerNorm over the last dimension (eps 1e-5, biased variance, float32 as PyTorch computes it).
// The forward pass can keep each row's mean and 1/std, which is what the backward pass needs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "clip/tensor/param.hpp"

namespace clip {

inline constexpr float layernorm_eps = 1e-5f;

// One nn.LayerNorm(C): weight (gain) and bias, under "<prefix>weight" and "<prefix>bias".
template <int C>
struct LayerNormParams {
  Param<C> weight;  // [C]
  Param<C> bias;    // [C]

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight, Role::parameter);
    f(prefix + "bias", bias, Role::parameter);
  }
};

// out[r] = (in[r] - mean) / sqrt(var + eps) * weight + bias for each of `rows` rows of C values.
// `mean` and `rstd` ([rows] each) receive the statistics when not null. `out` may equal `in`.
template <int C>
void layernorm_forward(float* out,           // [rows, C]
                       float* mean,          // [rows] or null
                       float* rstd,          // [rows] or null
                       const float* in,      // [rows, C]
                       const float* weight,  // [C]
                       const float* bias,    // [C]
                       int64_t rows) {
  static_assert(C > 0, "LayerNorm needs a positive width");
#pragma omp parallel for schedule(static) if (rows * C >= (int64_t{1} << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * C;
    float* y = out + r * C;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < C; ++j) sum += x[j];
    const float m = sum / C;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int j = 0; j < C; ++j) sq += (x[j] - m) * (x[j] - m);
    const float s = 1.0f / std::sqrt(sq / C + layernorm_eps);
#pragma omp simd
    for (int j = 0; j < C; ++j) y[j] = (x[j] - m) * s * weight[j] + bias[j];
    if (mean) mean[r] = m;
    if (rstd) rstd[r] = s;
  }
}

// Backward of layernorm_forward from the statistics it kept. With xhat = (in - mean) * rstd and
// g = d_out * weight, per row:
//   d_in = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ d_residual, when not null: the skip
//                                                            connection around the LayerNorm)
//   d_weight += sum over rows of d_out * xhat,  d_bias += sum over rows of d_out.
// d_in is assigned and may be the same buffer as d_out or d_residual (an in-place update).
template <int C>
void layernorm_backward(float* d_in,              // [rows, C]
                        float* d_weight,          // [C]
                        float* d_bias,            // [C]
                        const float* d_out,       // [rows, C]
                        const float* in,          // [rows, C] the forward's input
                        const float* mean,        // [rows]
                        const float* rstd,        // [rows]
                        const float* weight,      // [C]
                        int64_t rows,
                        const float* d_residual = nullptr) {  // [rows, C] or null
  static_assert(C > 0, "LayerNorm needs a positive width");
  constexpr int64_t parallel_min = int64_t{1} << 15;
  // Parameter gradients first (d_in may overwrite d_out). Threads take column strips, so each
  // sum runs over the rows in order and does not depend on the thread count.
  constexpr int strip = 64;
  constexpr int strips = (C + strip - 1) / strip;
#pragma omp parallel for schedule(static) if (rows * C >= parallel_min && strips > 1)
  for (int s = 0; s < strips; ++s) {
    const int j0 = s * strip, j1 = std::min(C, j0 + strip);
    float acc_w[strip] = {}, acc_b[strip] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* dy = d_out + r * C;
      const float* x = in + r * C;
      const float m = mean[r], sd = rstd[r];
#pragma omp simd
      for (int j = j0; j < j1; ++j) {
        acc_w[j - j0] += dy[j] * ((x[j] - m) * sd);
        acc_b[j - j0] += dy[j];
      }
    }
    for (int j = j0; j < j1; ++j) d_weight[j] += acc_w[j - j0], d_bias[j] += acc_b[j - j0];
  }

#pragma omp parallel for schedule(static) if (rows * C >= parallel_min)
  for (int64_t r = 0; r < rows; ++r) {
    const float* dy = d_out + r * C;
    const float* x = in + r * C;
    const float m = mean[r], sd = rstd[r];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int j = 0; j < C; ++j) {
      const float g = dy[j] * weight[j];
      sum_g += g;
      sum_gx += g * ((x[j] - m) * sd);
    }
    const float mean_g = sum_g / C, mean_gx = sum_gx / C;
    float* dx = d_in + r * C;
    if (d_residual) {
      const float* res = d_residual + r * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) dx[j] = res[j] + sd * (dy[j] * weight[j] - mean_g - (x[j] - m) * sd * mean_gx);
    } else {
#pragma omp simd
      for (int j = 0; j < C; ++j) dx[j] = sd * (dy[j] * weight[j] - mean_g - (x[j] - m) * sd * mean_gx);
    }
  }
}

}  // namespace clip
