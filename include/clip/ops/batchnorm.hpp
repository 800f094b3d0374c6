// BatchNorm2d (eps 1e-5, momentum 0.1), fused with the optional residual add and ReLU that
// follow it in a ResNet.
//
// Both modes end in the same per-channel affine pass, as PyTorch's CPU kernel does:
//   alpha = weight / sqrt(var + eps),  beta = bias - mean * alpha,  y = act(x * alpha + beta [+ r])
// eval mode takes (mean, var) from the running statistics; train mode from the batch (biased
// variance), then updates running = (1 - momentum) * running + momentum * batch statistic with
// the unbiased variance, and num_batches_tracked += 1.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/ops/conv2d.hpp"  // Planes
#include "clip/tensor/param.hpp"

namespace clip {

enum class Activation { none, relu };

template <int C>
struct BatchNorm2d {
  static_assert(C > 0, "a BatchNorm needs a positive channel count");
  static constexpr int channels = C;
  static constexpr float eps = 1e-5f;
  static constexpr float momentum = 0.1f;

  struct Params {
    Param<C> weight;        // gamma
    Param<C> bias;          // beta
    Param<C> running_mean;  // buffer
    Param<C> running_var;   // buffer
    Counter num_batches_tracked;

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "weight", weight, Role::parameter);
      f(prefix + "bias", bias, Role::parameter);
      f(prefix + "running_mean", running_mean, Role::buffer);
      f(prefix + "running_var", running_var, Role::buffer);
      f(prefix + "num_batches_tracked", num_batches_tracked, Role::buffer);
    }
  };

  // Batch statistics of a train-mode pass: what backward needs.
  struct Saved {
    std::vector<float> mean = std::vector<float>(C);
    std::vector<float> invstd = std::vector<float>(C);
  };

  // The per-channel affine y = x * alpha + beta of normalisation with (mean, var).
  static void affine(const Params& p, const float* mean, const float* var, float* alpha, float* beta) {
    for (int c = 0; c < C; ++c) {
      const float invstd = 1.0f / std::sqrt(var[c] + eps);
      alpha[c] = invstd * p.weight[c];
      beta[c] = p.bias[c] - mean[c] * alpha[c];
    }
  }

  // Eval mode: y = act(bn(x) [+ residual]) with the running statistics. x and y may be the same
  // buffer (in place); `residual` (layout rl) may be null.
  static void forward_eval(const Params& p, const float* x, Planes xl, float* y, Planes yl, int64_t batch, int64_t hw,
                           Activation act, const float* residual = nullptr, Planes rl = {0, 0}) {
    float alpha[C], beta[C];
    affine(p, p.running_mean.data(), p.running_var.data(), alpha, beta);
    apply(alpha, beta, x, xl, y, yl, batch, hw, act, residual, rl);
  }

  // Train mode: normalises with the batch statistics, updates p's running statistics and
  // counter, and keeps mean and invstd in `saved` (when given) for backward.
  static void forward_train(Params& p, const float* x, Planes xl, float* y, Planes yl, int64_t batch, int64_t hw,
                            Activation act, const float* residual = nullptr, Planes rl = {0, 0}, Saved* saved = nullptr) {
    const int64_t count = batch * hw;
    CLIP_CHECK(count > 1, "train-mode BatchNorm needs more than one value per channel, got ", count);
    float mean[C], var[C];
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; ++c) {
      double sum = 0;
      for (int64_t n = 0; n < batch; ++n) {
        const float* px = xl.plane(x, n, c);
        for (int64_t i = 0; i < hw; ++i) sum += px[i];
      }
      const double m = sum / double(count);
      double sq = 0;
      for (int64_t n = 0; n < batch; ++n) {
        const float* px = xl.plane(x, n, c);
        for (int64_t i = 0; i < hw; ++i) sq += (px[i] - m) * (px[i] - m);
      }
      mean[c] = static_cast<float>(m);
      var[c] = static_cast<float>(sq / double(count));
      p.running_mean[c] = (1 - momentum) * p.running_mean[c] + momentum * mean[c];
      p.running_var[c] = (1 - momentum) * p.running_var[c] +
                         momentum * static_cast<float>(sq / double(count - 1));
    }
    p.num_batches_tracked.value += 1;
    if (saved)
      for (int c = 0; c < C; ++c) {
        saved->mean[c] = mean[c];
        saved->invstd[c] = 1.0f / std::sqrt(var[c] + eps);
      }
    float alpha[C], beta[C];
    affine(p, mean, var, alpha, beta);
    apply(alpha, beta, x, xl, y, yl, batch, hw, act, residual, rl);
  }

  // A convolution epilogue (see Conv2d::forward) that applies eval-mode BatchNorm, the optional
  // residual (in the output's layout) and the activation to each tile while it is in cache.
  struct Epilogue {
    std::array<float, C> alpha, beta;
    Activation act = Activation::none;
    const float* residual = nullptr;

    void operator()(float* y, int64_t channel_stride, int64_t offset, int64_t cols, int c0, int c1) const {
      for (int c = c0; c < c1; ++c) {
        const int64_t at = offset + c * channel_stride;
        row(y + at, y + at, residual ? residual + at : nullptr, cols, alpha[c], beta[c], act);
      }
    }
  };

  static Epilogue eval_epilogue(const Params& p, Activation act, const float* residual = nullptr) {
    Epilogue e;
    affine(p, p.running_mean.data(), p.running_var.data(), e.alpha.data(), e.beta.data());
    e.act = act;
    e.residual = residual;
    return e;
  }

  // y = act(x * alpha[c] + beta[c] [+ residual]) over every plane.
  static void apply(const float* alpha, const float* beta, const float* x, Planes xl, float* y, Planes yl,
                    int64_t batch, int64_t hw, Activation act, const float* residual, Planes rl) {
    // Channel-major batches are one plane of batch * hw pixels per channel.
    const bool merged = xl.batch_contiguous(hw) && yl.batch_contiguous(hw) && (!residual || rl.batch_contiguous(hw));
    const int64_t images = merged ? 1 : batch, len = merged ? batch * hw : hw;
#pragma omp parallel for collapse(2) schedule(static) if (images * C * len >= (int64_t{1} << 15))
    for (int64_t n = 0; n < images; ++n)
      for (int c = 0; c < C; ++c)
        row(xl.plane(x, n, c), yl.plane(y, n, c), residual ? rl.plane(residual, n, c) : nullptr, len, alpha[c], beta[c],
            act);
  }

  // One channel's run of `len` values: y = act(x * a + b [+ r]); x may be y.
  static void row(const float* x, float* y, const float* r, int64_t len, float a, float b, Activation act) {
    if (r) {
      if (act == Activation::relu)
        for (int64_t i = 0; i < len; ++i) y[i] = std::max(x[i] * a + b + r[i], 0.0f);
      else
        for (int64_t i = 0; i < len; ++i) y[i] = x[i] * a + b + r[i];
    } else {
      if (act == Activation::relu)
        for (int64_t i = 0; i < len; ++i) y[i] = std::max(x[i] * a + b, 0.0f);
      else
        for (int64_t i = 0; i < len; ++i) y[i] = x[i] * a + b;
    }
  }
};

}  // namespace clip
