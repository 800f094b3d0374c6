// Scalar math of the transformer ops that the CUDA kernels (kernels/activation.cuh,
// kernels/layernorm.cuh, kernels/embedding.cuh) compute per element, written once and
// compilable by g++, so that host tests check it against the CPU ops (include/clip/ops/
// activation.hpp, layernorm.hpp and VisionTransformer::im2col).
#pragma once

#include <math.h>

#include <cstdint>

#include "clip/core/host_device.hpp"

namespace clip {

// sigmoid(1.702 x). For very negative x, exp overflows to inf and the result is 0 (as the CPU op).
CLIP_HOST_DEVICE inline float quick_gelu_sigmoid(float x) { return 1.0f / (1.0f + expf(-1.702f * x)); }

// QuickGELU(x) = x sigmoid(1.702 x), the activation of every CLIP MLP.
CLIP_HOST_DEVICE inline float quick_gelu(float x) { return x * quick_gelu_sigmoid(x); }

// d QuickGELU / dx = s + 1.702 x s (1 - s) with s = sigmoid(1.702 x), written as the CPU
// quick_gelu_backward writes it.
CLIP_HOST_DEVICE inline float quick_gelu_derivative(float x) {
  const float s = quick_gelu_sigmoid(x);
  return s + 1.702f * x * s * (1.0f - s);
}

// LayerNorm row statistics from the two sums the kernels reduce, as layernorm_forward computes
// them: mean = sum / C, then 1 / sqrt(sum((x - mean)^2) / C + eps) (biased variance, eps 1e-5).
// Division and sqrt are correctly rounded on both sides (nvcc without --use_fast_math), so the
// same sums give the same bits.
CLIP_HOST_DEVICE inline float layernorm_mean(float sum, int n) { return sum / n; }
CLIP_HOST_DEVICE inline float layernorm_rstd(float sum_sq_dev, int n) { return 1.0f / sqrtf(sum_sq_dev / n + 1e-5f); }

// LayerNorm backward of one element, with xhat = (x - mean) rstd and g = dy weight:
//   dx = rstd (g - mean(g) - xhat mean(g xhat))   (+ the residual gradient, added by the caller)
CLIP_HOST_DEVICE inline float layernorm_backward_element(float dy, float x, float weight, float mean, float rstd,
                                                         float mean_g, float mean_gx) {
  return rstd * (dy * weight - mean_g - (x - mean) * rstd * mean_gx);
}

// Where element (row, k) of the ViT's patch matrix comes from: row = (b, gy, gx) over a
// grid x grid patch grid, k = (c, ky, kx) in conv1.weight's order; the result indexes
// images [B, 3, R, R]. VisionTransformer::im2col on the CPU is the reference.
template <int R, int Patch>
CLIP_HOST_DEVICE inline int64_t patch_pixel_index(int64_t row, int k) {
  static_assert(R % Patch == 0, "the image side must be a multiple of the patch side");
  constexpr int grid = R / Patch, n = grid * grid;
  const int64_t b = row / n;
  const int in_image = static_cast<int>(row % n);
  const int gy = in_image / grid, gx = in_image % grid;
  const int c = k / (Patch * Patch), ky = (k / Patch) % Patch, kx = k % Patch;
  return ((b * 3 + c) * R + gy * Patch + ky) * int64_t{R} + gx * Patch + kx;
}

}  // namespace clip
