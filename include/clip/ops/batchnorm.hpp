// BatchNorm2d (eps 1e-5, momentum 0.1), fused with the optional residual add and ReLU that
// follow it in a ResNet.
//
// Both modes end in the same per-channel affine pass, as PyTorch's CPU kernel does:
//   alpha = weight / sqrt(var + eps),  beta = bias - mean * alpha,  y = act(x * alpha + beta [+ r])
// eval mode takes (mean, var) from the running statistics; train mode from the batch (biased
// variance), then updates running = (1 - momentum) * running + momentum * batch statistic with
// the unbiased variance, and num_batches_tracked += 1.
//
// Training: a convolution gathers the batch statistics in its epilogue (StatsEpilogue: each
// tile's mean and squared deviations while it is in cache), `finish_statistics` turns them into
// the normalisation, and `backward` is the gradient of act(bn(x) [+ residual]) in two passes
// (per-channel sums, then d_x), with the ReLU's mask taken from the output or recomputed from x.
// Under a BatchNormSync scope (batchnorm_sync.hpp) both use every process's batch: the
// statistics are merged across processes, and backward's per-channel sums and count are summed
// (the parameter gradients d_weight, d_bias stay this process's share, summed later with the
// other gradients).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clip/core/error.hpp"
#include "clip/ops/batchnorm_sync.hpp"
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
  // counter (unless update_running_stats is false), and keeps mean and invstd in `saved` (when
  // given) for backward.
  static void forward_train(Params& p, const float* x, Planes xl, float* y, Planes yl, int64_t batch, int64_t hw,
                            Activation act, const float* residual = nullptr, Planes rl = {0, 0}, Saved* saved = nullptr,
                            bool update_running_stats = true) {
    const int64_t count = batch * hw;
    CLIP_CHECK(count > 1, "train-mode BatchNorm needs more than one value per channel, got ", count);
    CLIP_CHECK(!BatchNormSync::current(), "BatchNorm2d::forward_train does not synchronise its statistics; "
               "synchronised training goes through finish_statistics");
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
      if (update_running_stats) {
        p.running_mean[c] = (1 - momentum) * p.running_mean[c] + momentum * mean[c];
        p.running_var[c] = (1 - momentum) * p.running_var[c] +
                           momentum * static_cast<float>(sq / double(count - 1));
      }
    }
    if (update_running_stats) p.num_batches_tracked.value += 1;
    if (saved)
      for (int c = 0; c < C; ++c) {
        saved->mean[c] = mean[c];
        saved->invstd[c] = 1.0f / std::sqrt(var[c] + eps);
      }
    float alpha[C], beta[C];
    affine(p, mean, var, alpha, beta);
    apply(alpha, beta, x, xl, y, yl, batch, hw, act, residual, rl);
  }

  // Per-thread partial statistics that StatsEpilogue fills, [threads][count, mean, M2][C] in
  // double (M2: sum of squared deviations from the mean).
  static int64_t statistics_size(int threads) { return int64_t{threads} * 3 * C; }

  // A convolution epilogue that folds each finished tile into the calling thread's partial
  // statistics of `stats` (zeroed by the caller, one slot per thread of the convolution), so
  // train mode needs no extra pass over the output. A tile's mean and M2 come from two float
  // passes over it while it is in cache; tiles merge in double by Chan et al.'s pairwise
  // formula, which keeps the variance exact where E[x^2] - E[x]^2 would cancel.
  struct StatsEpilogue {
    double* stats;

    void operator()(float* y, int64_t channel_stride, int64_t offset, int64_t cols, int c0, int c1) const {
#ifdef _OPENMP
      double* slot = stats + int64_t{omp_get_thread_num()} * 3 * C;
#else
      double* slot = stats;
#endif
      for (int c = c0; c < c1; ++c) {
        const float* v = y + offset + c * channel_stride;
        const double tile_mean = sum(v, cols) / double(cols);
        const float tm = static_cast<float>(tile_mean);
        double m2 = 0;
        for (int64_t i0 = 0; i0 < cols; i0 += kChunk) {
          const int64_t i1 = std::min(cols, i0 + kChunk);
          float q = 0.0f;
#pragma omp simd reduction(+ : q)
          for (int64_t i = i0; i < i1; ++i) q += (v[i] - tm) * (v[i] - tm);
          m2 += q;
        }
        merge(slot[c], slot[C + c], slot[2 * C + c], double(cols), tile_mean, m2);
      }
    }
  };

  // (n, mean, m2) += a part of nb values with mean mb and squared deviations m2b.
  static void merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
    const double total = n + nb, delta = mb - mean;
    mean += delta * nb / total;
    m2 += m2b + delta * delta * n * nb / total;
    n = total;
  }

  // From the per-thread partial statistics: the batch mean and invstd into `saved`, and (unless
  // update_running_stats is false) the running statistics and counter.
  static void finish_statistics(Params& p, const double* stats, int threads, Saved& saved,
                                bool update_running_stats = true) {
    // This process's (count, mean, M2) per channel; under a BatchNormSync, every process's,
    // merged in rank order.
    const BatchNormSync* sync = BatchNormSync::current();
    const int world = sync ? sync->world() : 1, rank = sync ? sync->rank() : 0;
    std::vector<double> table(static_cast<size_t>(world) * 3 * C, 0.0);  // [W][count, mean, M2][C]
    double* own = table.data() + int64_t{rank} * 3 * C;
    for (int c = 0; c < C; ++c) {
      for (int t = 0; t < threads; ++t) {
        const double* slot = stats + int64_t{t} * 3 * C;
        if (slot[c] > 0) merge(own[c], own[C + c], own[2 * C + c], slot[c], slot[C + c], slot[2 * C + c]);
      }
    }
    if (sync) sync->sum(table.data(), static_cast<int64_t>(table.size()));
    for (int c = 0; c < C; ++c) {
      double n = 0, mean = 0, m2 = 0;
      for (int r = 0; r < world; ++r) {
        const double* part = table.data() + int64_t{r} * 3 * C;
        if (part[c] <= 0) continue;
        if (n == 0) n = part[c], mean = part[C + c], m2 = part[2 * C + c];  // as is: one process's unchanged
        else merge(n, mean, m2, part[c], part[C + c], part[2 * C + c]);
      }
      CLIP_CHECK(n > 1, "train-mode BatchNorm needs more than one value per channel, got ", n);
      const float var = static_cast<float>(m2 / n);
      saved.mean[c] = static_cast<float>(mean);
      saved.invstd[c] = 1.0f / std::sqrt(var + eps);
      if (update_running_stats) {
        p.running_mean[c] = (1 - momentum) * p.running_mean[c] + momentum * saved.mean[c];
        p.running_var[c] = (1 - momentum) * p.running_var[c] + momentum * static_cast<float>(m2 / (n - 1));
      }
    }
    if (update_running_stats) p.num_batches_tracked.value += 1;
  }

  // y = act(bn(x) [+ residual]) with the batch statistics of a train-mode pass (the forward's
  // second half, and the recomputation of a ReLU output during backward: bit-identical).
  static void apply_train(const Params& p, const Saved& saved, const float* x, Planes xl, float* y, Planes yl,
                          int64_t batch, int64_t hw, Activation act, const float* residual = nullptr, Planes rl = {0, 0}) {
    float alpha[C], beta[C];
    train_affine(p, saved, alpha, beta);
    apply(alpha, beta, x, xl, y, yl, batch, hw, act, residual, rl);
  }

  // y = relu(bn(x) + bn_r(r)) over `len` values per channel of channel-major x, r and y (a
  // bottleneck's output with its downsampled shortcut, in one pass).
  static void apply_train_sum(const Params& p, const Saved& saved, const float* x, const Params& pr,
                              const Saved& saved_r, const float* r, float* y, int64_t len) {
    float alpha[C], beta[C], alpha_r[C], beta_r[C];
    train_affine(p, saved, alpha, beta);
    train_affine(pr, saved_r, alpha_r, beta_r);
    for (int c = 0; c < C; ++c) beta[c] += beta_r[c];
#pragma omp parallel for schedule(static) if (C * len >= (int64_t{1} << 15))
    for (int c = 0; c < C; ++c) {
      const float a = alpha[c], b = beta[c], ar = alpha_r[c];
      const float* xs = x + c * len;
      const float* rs = r + c * len;
      float* ys = y + c * len;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) ys[i] = std::max(xs[i] * a + rs[i] * ar + b, 0.0f);
    }
  }

  static void train_affine(const Params& p, const Saved& saved, float* alpha, float* beta) {
    for (int c = 0; c < C; ++c) {
      alpha[c] = saved.invstd[c] * p.weight[c];
      beta[c] = p.bias[c] - saved.mean[c] * alpha[c];
    }
  }

  // Backward of train-mode y = act(bn(x) [+ residual]) from dy, with xhat = (x - mean) invstd:
  //   g = dy * (y > 0) for ReLU (y: the forward's output; null recomputes the mask from x,
  //       which needs the forward to have had no residual), else g = dy
  //   d_bias += sum g,  d_weight += sum g xhat
  //   d_x = weight invstd (g - mean(g) - xhat mean(g xhat))                        (assigned)
  //   d_residual = g   (assigned, when not null: the residual's gradient)
  // d_x and d_residual may be the same buffer as x or dy (elementwise, in place).
  static void backward(const Params& p, const Saved& saved, const float* x, Planes xl, const float* y, Planes yl,
                       const float* dy, Planes dyl, float* d_x, Planes dxl, float* d_weight, float* d_bias,
                       int64_t batch, int64_t hw, Activation act, float* d_residual = nullptr, Planes rl = {0, 0}) {
    const int64_t count = batch * hw;
    const Mask mask = act == Activation::none ? Mask::none : y ? Mask::output : Mask::input;
    const bool merged = xl.batch_contiguous(hw) && dyl.batch_contiguous(hw) && dxl.batch_contiguous(hw) &&
                        (mask != Mask::output || yl.batch_contiguous(hw)) && (!d_residual || rl.batch_contiguous(hw));
    const int64_t images = merged ? 1 : batch, len = merged ? count : hw;
    float alpha[C], beta[C];
    train_affine(p, saved, alpha, beta);
    auto row = [&](int c, int64_t n) {
      return Row{xl.plane(x, n, c), mask == Mask::output ? yl.plane(y, n, c) : nullptr, dyl.plane(dy, n, c),
                 dxl.plane(d_x, n, c), d_residual ? rl.plane(d_residual, n, c) : nullptr};
    };
    // Per channel: sum g and sum g (x - mean), [sum_g C][sum_gx C][count].
    std::vector<double> sums_table(2 * C + 1, 0.0);
    double* sum_g = sums_table.data();
    double* sum_gx = sums_table.data() + C;
#pragma omp parallel for schedule(dynamic, 1) if (count * C >= (int64_t{1} << 15))
    for (int c = 0; c < C; ++c) {
      const float m = saved.mean[c];
      for (int64_t n = 0; n < images; ++n) {
        const Row r = row(c, n);
        switch (mask) {
          case Mask::none: sums<Mask::none>(r, len, m, alpha[c], beta[c], sum_g[c], sum_gx[c]); break;
          case Mask::output: sums<Mask::output>(r, len, m, alpha[c], beta[c], sum_g[c], sum_gx[c]); break;
          case Mask::input: sums<Mask::input>(r, len, m, alpha[c], beta[c], sum_g[c], sum_gx[c]); break;
        }
      }
      d_bias[c] += static_cast<float>(sum_g[c]);
      d_weight[c] += static_cast<float>(sum_gx[c] * saved.invstd[c]);
    }
    sums_table[2 * C] = double(count);
    if (const BatchNormSync* sync = BatchNormSync::current())
      sync->sum(sums_table.data(), static_cast<int64_t>(sums_table.size()));
    const double total = sums_table[2 * C];
#pragma omp parallel for schedule(dynamic, 1) if (count * C >= (int64_t{1} << 15))
    for (int c = 0; c < C; ++c) {
      const float m = saved.mean[c], invstd = saved.invstd[c];
      // d_x = alpha g + k (x - mean) + k0
      const float k = static_cast<float>(-double(alpha[c]) * invstd * invstd * sum_gx[c] / total);
      const float k0 = static_cast<float>(-double(alpha[c]) * sum_g[c] / total);
      for (int64_t n = 0; n < images; ++n) {
        const Row r = row(c, n);
        switch (mask) {
          case Mask::none: input_gradient<Mask::none>(r, len, m, alpha[c], beta[c], k, k0); break;
          case Mask::output: input_gradient<Mask::output>(r, len, m, alpha[c], beta[c], k, k0); break;
          case Mask::input: input_gradient<Mask::input>(r, len, m, alpha[c], beta[c], k, k0); break;
        }
      }
    }
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

 private:
  // Backward's and the statistics' helpers.
  // Where backward's ReLU mask comes from: no ReLU, the output y > 0, or x * alpha + beta > 0.
  enum class Mask { none, output, input };
  // One channel's run of values in backward's tensors.
  struct Row {
    const float* x;
    const float* y;
    const float* dy;
    float* dx;
    float* dres;
  };
  // Float partial sums over chunks this long, added up in double.
  static constexpr int64_t kChunk = 512;

  static double sum(const float* v, int64_t len) {
    double total = 0;
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t i1 = std::min(len, i0 + kChunk);
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < i1; ++i) s += v[i];
      total += s;
    }
    return total;
  }

  template <Mask M>
  static float masked(const Row& r, int64_t i, float a, float b) {
    if constexpr (M == Mask::none) return r.dy[i];
    else if constexpr (M == Mask::output) return r.y[i] > 0.0f ? r.dy[i] : 0.0f;
    else return r.x[i] * a + b > 0.0f ? r.dy[i] : 0.0f;
  }

  // sum_g += sum g, sum_gx += sum g (x - m) over one row.
  template <Mask M>
  static void sums(const Row& r, int64_t len, float m, float a, float b, double& sum_g, double& sum_gx) {
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t i1 = std::min(len, i0 + kChunk);
      float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = i0; i < i1; ++i) {
        const float g = masked<M>(r, i, a, b);
        sg += g;
        sgx += g * (r.x[i] - m);
      }
      sum_g += sg;
      sum_gx += sgx;
    }
  }

  template <Mask M>
  static void input_gradient(const Row& r, int64_t len, float m, float a, float b, float k, float k0) {
    if (r.dres) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float g = masked<M>(r, i, a, b);
        r.dx[i] = a * g + k * (r.x[i] - m) + k0;
        r.dres[i] = g;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) r.dx[i] = a * masked<M>(r, i, a, b) + k * (r.x[i] - m) + k0;
    }
  }

 public:
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
