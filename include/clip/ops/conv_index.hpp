// Index math and per-element formulas shared by the CPU tests and the CUDA ResNet kernels
// (kernels/conv2d.cuh, kernels/batchnorm.cuh): written once as CLIP_HOST_DEVICE functions, so
// that tests/test_cuda_host_resnet_ops.cpp can run the kernels' exact algorithm on the CPU
// against clip's CPU Conv2d and BatchNorm2d. g++-compilable; no CUDA headers.
//
// Convolution as the GPU runs it, for a chunk of images of a batch (see Conv2d in conv2d.cuh):
//   col[r, j]  r = (ci * K + ky) * K + kx in [0, Cin K K),  j = n * Ho * Wo + oy * Wo + ox
//              (n counted from the chunk's first image): the input under that tap, 0 in padding
//   y[Cout, j] = W[Cout, Cin K K] · col                      (W is PyTorch's [Cout, Cin, K, K])
//   d_col      = W^T · d_y,  then d_x = col2im(d_col), computed per input element as a gather
//                over the taps that read it (no atomics, a fixed order: ky, then kx).
#pragma once

#include <cmath>
#include <cstdint>

#include "clip/core/host_device.hpp"

namespace clip::conv_index {

// Where element (n, c, y, x) of a batch of planes of h x w lives:
// data[n * batch_stride + c * channel_stride + y * w + x] (the same as clip::Planes, which is not
// device code).
struct Layout {
  int64_t batch_stride;
  int64_t channel_stride;
};
// Channel-major [C, B, H, W], the ResNet's layout inside.
CLIP_HOST_DEVICE constexpr Layout cnhw(int64_t batch, int64_t h, int64_t w) { return {h * w, batch * h * w}; }
// PyTorch's [B, C, H, W] (the images the stem reads).
CLIP_HOST_DEVICE constexpr Layout nchw(int64_t channels, int64_t h, int64_t w) { return {channels * h * w, h * w}; }

CLIP_HOST_DEVICE constexpr int out_size(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

// Offset in x of col[r, j] (see the top of the file), or -1 when that tap lies in the padding.
// j counts output pixels from image n0 of the batch: (n0 + j / (ho wo)) is the image.
template <int K, int Stride, int Pad>
CLIP_HOST_DEVICE inline int64_t im2col_source(int64_t r, int64_t j, int64_t n0, int h, int w, int ho, int wo,
                                              Layout xl) {
  const int64_t out_hw = int64_t{ho} * wo;
  const int64_t n = n0 + j / out_hw, rem = j % out_hw;
  const int oy = static_cast<int>(rem / wo), ox = static_cast<int>(rem % wo);
  const int ci = static_cast<int>(r / (K * K)), ky = static_cast<int>(r / K % K), kx = static_cast<int>(r % K);
  const int iy = oy * Stride + ky - Pad, ix = ox * Stride + kx - Pad;
  if (iy < 0 || iy >= h || ix < 0 || ix >= w) return -1;
  return n * xl.batch_stride + ci * xl.channel_stride + int64_t{iy} * w + ix;
}

// d_x at (image n_local of the chunk, channel ci, row iy, column ix) = the sum of d_col[r, j]
// over every tap (ky, kx) whose output pixel (oy, ox) read it: oy Stride + ky - Pad = iy (and
// the same for x), in the order ky, kx. d_col is [Cin K K, cols] and load(index) returns its
// element `index` as a float.
template <int K, int Stride, int Pad, class Load>
CLIP_HOST_DEVICE inline float col2im_gather(int ci, int iy, int ix, int64_t n_local, int ho, int wo, int64_t cols,
                                            Load&& load) {
  float s = 0.0f;
  const int64_t pixel0 = n_local * ho * wo;
  for (int ky = 0; ky < K; ++ky) {
    const int ty = iy + Pad - ky;
    if (ty < 0 || ty % Stride != 0 || ty / Stride >= ho) continue;
    const int oy = ty / Stride;
    for (int kx = 0; kx < K; ++kx) {
      const int tx = ix + Pad - kx;
      if (tx < 0 || tx % Stride != 0 || tx / Stride >= wo) continue;
      const int ox = tx / Stride;
      const int64_t r = (int64_t{ci} * K + ky) * K + kx;
      s += load(r * cols + pixel0 + int64_t{oy} * wo + ox);
    }
  }
  return s;
}

}  // namespace clip::conv_index

// BatchNorm2d's per-element formulas (include/clip/ops/batchnorm.hpp's semantics):
//   invstd = 1 / sqrt(var + eps);  alpha = invstd gamma;  beta' = beta - mean alpha
//   y = act(x alpha + beta' [+ r])
//   running = (1 - momentum) running + momentum batch statistic (unbiased variance)
//   backward, with g = dy masked by the ReLU and xc = x - mean:
//     d_beta += Σ g,  d_gamma += invstd Σ g xc
//     d_x = alpha g + k xc + k0,  k = -alpha invstd² Σ g xc / count,  k0 = -alpha Σ g / count
namespace clip::bn_math {

inline constexpr float kEps = 1e-5f;
inline constexpr float kMomentum = 0.1f;

CLIP_HOST_DEVICE inline float invstd(float var) { return 1.0f / sqrtf(var + kEps); }

struct Affine {
  float alpha, beta;
};
CLIP_HOST_DEVICE inline Affine affine(float gamma, float beta, float mean, float inv) {
  const float a = inv * gamma;
  return {a, beta - mean * a};
}

// y = x alpha + beta [+ r], then the ReLU when `relu`.
CLIP_HOST_DEVICE inline float apply(float x, Affine f, bool relu) {
  const float v = x * f.alpha + f.beta;
  return relu ? fmaxf(v, 0.0f) : v;
}
CLIP_HOST_DEVICE inline float apply_residual(float x, Affine f, float r, bool relu) {
  const float v = x * f.alpha + f.beta + r;
  return relu ? fmaxf(v, 0.0f) : v;
}

CLIP_HOST_DEVICE inline float running_update(float running, float batch_statistic) {
  return (1 - kMomentum) * running + kMomentum * batch_statistic;
}

// Where backward's ReLU mask comes from: none, the forward's output (y > 0), or recomputed from
// the input (x alpha + beta > 0, valid when the forward had no residual).
enum class Mask : int { none = 0, output = 1, input = 2 };

CLIP_HOST_DEVICE inline float masked_gradient(float dy, float x, float y, Affine f, Mask m) {
  if (m == Mask::none) return dy;
  if (m == Mask::output) return y > 0.0f ? dy : 0.0f;
  return x * f.alpha + f.beta > 0.0f ? dy : 0.0f;
}

// The input gradient's coefficients from the per-channel sums (in double, as the CPU).
struct InputGradient {
  float k, k0;
};
CLIP_HOST_DEVICE inline InputGradient input_gradient(float alpha, float inv, double sum_g, double sum_gxc,
                                                     int64_t count) {
  return {static_cast<float>(-double(alpha) * inv * inv * sum_gxc / double(count)),
          static_cast<float>(-double(alpha) * sum_g / double(count))};
}
CLIP_HOST_DEVICE inline float d_input(float g, float x, float mean, float alpha, InputGradient c) {
  return alpha * g + c.k * (x - mean) + c.k0;
}

}  // namespace clip::bn_math
