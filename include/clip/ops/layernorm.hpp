// LayerNorm over the last dimension (eps 1e-5, biased variance, float32 as PyTorch computes it).
// The forward pass can keep each row's mean and 1/std, which is what a backward pass needs.
#pragma once

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

}  // namespace clip
