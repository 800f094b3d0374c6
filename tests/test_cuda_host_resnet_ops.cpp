// The CUDA ResNet ops' algorithms run on the CPU (kernels/conv2d.cuh, kernels/batchnorm.cuh),
// built from the CLIP_HOST_DEVICE index math and formulas in include/clip/ops/conv_index.hpp,
// against clip's CPU Conv2d and BatchNorm2d. No GPU needed: this checks that the kernels'
// index math and per-element formulas are right, so the GPU test only has to find GPU bugs.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <random>
#include <vector>

#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/conv_index.hpp"
#include "numeric.hpp"

using namespace clip;

namespace {

using clip::test::random_vector;
using clip::test::rel_err;

// Row-major naive gemms with float accumulation, standing in for cuBLASLt.
// Y[m, n] (+)= A[m, k] B[k, n]
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* y, int64_t ldy, bool acc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float s = 0;
      for (int64_t l = 0; l < k; ++l) s += a[i * k + l] * b[l * n + j];
      y[i * ldy + j] = acc ? y[i * ldy + j] + s : s;
    }
}

// The GPU Conv2d's algorithm (kernels/conv2d.cuh) with chunks of `chunk` images.
template <int Cin, int Cout, int K, int Stride, int Pad>
struct GpuConvEmulation {
  static constexpr int64_t depth = int64_t{Cin} * K * K;
  static constexpr int out_size(int in) { return conv_index::out_size(in, K, Stride, Pad); }

  static std::vector<float> im2col(const float* x, conv_index::Layout xl, int h, int w, int64_t n0, int64_t cols) {
    const int ho = out_size(h), wo = out_size(w);
    std::vector<float> col(depth * cols);
    for (int64_t r = 0; r < depth; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t at = conv_index::im2col_source<K, Stride, Pad>(r, j, n0, h, w, ho, wo, xl);
        col[r * cols + j] = at < 0 ? 0.0f : x[at];
      }
    return col;
  }

  // y [Cout, B, Ho, Wo]
  static void forward(const float* x, conv_index::Layout xl, const float* weight, float* y, int64_t batch, int h,
                      int w, int64_t chunk) {
    const int64_t out_hw = int64_t{out_size(h)} * out_size(w), ldy = batch * out_hw;
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t cols = std::min(chunk, batch - n0) * out_hw;
      const std::vector<float> col = im2col(x, xl, h, w, n0, cols);
      gemm_nn(Cout, cols, depth, weight, col.data(), y + n0 * out_hw, ldy, false);
    }
  }

  // d_w += d_y col^T;  d_x = col2im(W^T d_y) as a gather.
  static void backward(const float* x, conv_index::Layout xl, const float* weight, const float* dy, float* d_w,
                       float* d_x, int64_t batch, int h, int w, int64_t chunk) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, ldy = batch * out_hw;
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t images = std::min(chunk, batch - n0), cols = images * out_hw;
      const std::vector<float> col = im2col(x, xl, h, w, n0, cols);
      for (int co = 0; co < Cout; ++co)
        for (int64_t r = 0; r < depth; ++r) {
          float s = 0;
          for (int64_t j = 0; j < cols; ++j) s += dy[co * ldy + n0 * out_hw + j] * col[r * cols + j];
          d_w[co * depth + r] += s;
        }
      std::vector<float> d_col(depth * cols);
      for (int64_t r = 0; r < depth; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          float s = 0;
          for (int co = 0; co < Cout; ++co) s += weight[co * depth + r] * dy[co * ldy + n0 * out_hw + j];
          d_col[r * cols + j] = s;
        }
      for (int ci = 0; ci < Cin; ++ci)
        for (int64_t n = 0; n < images; ++n)
          for (int iy = 0; iy < h; ++iy)
            for (int ix = 0; ix < w; ++ix)
              d_x[(n0 + n) * xl.batch_stride + ci * xl.channel_stride + iy * w + ix] =
                  conv_index::col2im_gather<K, Stride, Pad>(ci, iy, ix, n, ho, wo, cols,
                                                            [&](int64_t at) { return d_col[at]; });
    }
  }
};

double g_worst_conv = 0;

// One configuration: the emulation against clip::Conv2d forward and backward (the CPU's
// backward runs Winograd for 3x3 stride 1, im2col otherwise), x in channel-major or NCHW.
template <int Cin, int Cout, int K, int Stride, int Pad>
void check_conv(int64_t batch, int h, int w, bool nchw_input, int64_t chunk, uint32_t seed) {
  using Cpu = Conv2d<Cin, Cout, K, Stride, Pad>;
  using Emu = GpuConvEmulation<Cin, Cout, K, Stride, Pad>;
  const int ho = Cpu::out_size(h), wo = Cpu::out_size(w);
  const int64_t in_n = int64_t{Cin} * batch * h * w, out_n = int64_t{Cout} * batch * ho * wo;
  const std::vector<float> x = random_vector(in_n, seed), weight = random_vector(Cout * Emu::depth, seed + 1, 0.3f);
  const std::vector<float> dy = random_vector(out_n, seed + 2);
  const Planes xl = nchw_input ? Planes::nchw(Cin, h, w) : Planes::cnhw(batch, h, w);
  const conv_index::Layout il = nchw_input ? conv_index::nchw(Cin, h, w) : conv_index::cnhw(batch, h, w);
  const Planes yl = Planes::cnhw(batch, ho, wo);

  std::vector<float> y_cpu(out_n), y_emu(out_n), col;
  Cpu::forward(x.data(), xl, weight.data(), y_cpu.data(), yl, batch, h, w, col);
  Emu::forward(x.data(), il, weight.data(), y_emu.data(), batch, h, w, chunk);

  std::vector<float> dw_cpu = random_vector(Cout * Emu::depth, seed + 3), dw_emu = dw_cpu;  // checks +=
  std::vector<float> dx_cpu(in_n), dx_emu(in_n);
  Cpu::backward(x.data(), xl, weight.data(), dy.data(), yl, dw_cpu.data(), dx_cpu.data(), xl, batch, h, w, col);
  Emu::backward(x.data(), il, weight.data(), dy.data(), dw_emu.data(), dx_emu.data(), batch, h, w, chunk);

  const double ey = rel_err(y_emu, y_cpu), ew = rel_err(dw_emu, dw_cpu), ex = rel_err(dx_emu, dx_cpu);
  std::cout << "conv Cin " << Cin << " Cout " << Cout << " K " << K << " s " << Stride << " p " << Pad << " B "
            << batch << " " << h << "x" << w << (nchw_input ? " nchw" : " cnhw") << " chunk " << chunk
            << ": rel err y " << ey << " d_w " << ew << " d_x " << ex << "\n";
  BOOST_TEST(ey <= 1e-5);
  BOOST_TEST(ew <= 1e-5);
  BOOST_TEST(ex <= 1e-5);
  g_worst_conv = std::max({g_worst_conv, ey, ew, ex});
}

}  // namespace

BOOST_AUTO_TEST_CASE(cuda_conv_index_math_matches_cpu_conv2d) {
  check_conv<3, 8, 3, 2, 1>(2, 16, 16, /*nchw=*/true, 2, 1);   // the stem's first conv, on images
  check_conv<3, 8, 3, 2, 1>(3, 15, 13, /*nchw=*/true, 2, 2);   // odd sizes, chunks of 2 images
  check_conv<3, 8, 3, 2, 1>(1, 9, 9, /*nchw=*/false, 1, 3);
  check_conv<4, 6, 3, 1, 1>(3, 7, 9, false, 3, 4);             // the stem's / bottleneck's 3x3
  check_conv<4, 6, 3, 1, 1>(1, 5, 5, false, 1, 5);
  check_conv<5, 7, 1, 1, 0>(3, 6, 5, false, 3, 6);             // 1x1 (the GPU's direct gemm has the same index math)
  check_conv<5, 7, 1, 2, 0>(2, 7, 6, false, 1, 7);             // 1x1 stride 2
  check_conv<3, 5, 5, 2, 2>(2, 11, 10, false, 2, 8);
  check_conv<2, 3, 7, 2, 3>(3, 13, 12, true, 2, 9);            // 7x7 stride 2 pad 3
  check_conv<6, 4, 3, 2, 0>(2, 9, 8, false, 1, 10);
  check_conv<4, 4, 3, 3, 1>(2, 10, 11, false, 2, 11);          // stride > kernel - pad: gaps in col2im
  std::cout << "conv worst rel err " << g_worst_conv << "\n";
}

namespace {

// The GPU BatchNorm kernels' algorithm (kernels/batchnorm.cuh) on channel-major [C, count]:
// statistics as per-thread strided double partials (kThreads of them) added in thread order.
constexpr int kThreads = 512;

double strided_sum(int64_t count, const std::function<double(int64_t)>& f) {
  double total = 0;
  for (int t = 0; t < kThreads; ++t) {
    double s = 0;
    for (int64_t i = t; i < count; i += kThreads) s += f(i);
    total += s;
  }
  return total;
}

struct EmuSaved {
  std::vector<float> mean, rstd;
};

void emu_forward_train(int C, const std::vector<float>& x, std::vector<float>& y, const float* gamma,
                       const float* beta, float* rm, float* rv, int64_t count, bool relu, const float* residual,
                       EmuSaved& saved) {
  saved.mean.assign(C, 0);
  saved.rstd.assign(C, 0);
  for (int c = 0; c < C; ++c) {
    const float* xr = x.data() + c * count;
    const double m = strided_sum(count, [&](int64_t i) { return double(xr[i]); }) / double(count);
    const double sq = strided_sum(count, [&](int64_t i) {
      const double d = double(xr[i]) - m;
      return d * d;
    });
    const float mean = static_cast<float>(m), var = static_cast<float>(sq / double(count));
    const float inv = bn_math::invstd(var);
    saved.mean[c] = mean;
    saved.rstd[c] = inv;
    rm[c] = bn_math::running_update(rm[c], mean);
    rv[c] = bn_math::running_update(rv[c], static_cast<float>(sq / double(count - 1)));
    const bn_math::Affine f = bn_math::affine(gamma[c], beta[c], mean, inv);
    for (int64_t i = 0; i < count; ++i)
      y[c * count + i] = residual ? bn_math::apply_residual(xr[i], f, residual[c * count + i], relu)
                                  : bn_math::apply(xr[i], f, relu);
  }
}

void emu_backward(int C, float* d_x, float* d_gamma, float* d_beta, const float* dy, const float* x, const float* y,
                  const EmuSaved& s, const float* gamma, const float* beta, int64_t count, bn_math::Mask mask,
                  float* d_res) {
  for (int c = 0; c < C; ++c) {
    const int64_t row = c * count;
    const float mean = s.mean[c], inv = s.rstd[c];
    const bn_math::Affine f = bn_math::affine(gamma[c], beta[c], mean, inv);
    auto grad = [&](int64_t i) {
      return bn_math::masked_gradient(dy[row + i], x[row + i], mask == bn_math::Mask::output ? y[row + i] : 0.0f, f,
                                      mask);
    };
    const double sg = strided_sum(count, [&](int64_t i) { return double(grad(i)); });
    const double sgx = strided_sum(count, [&](int64_t i) { return double(grad(i)) * (x[row + i] - mean); });
    d_beta[c] += static_cast<float>(sg);
    d_gamma[c] += static_cast<float>(sgx * inv);
    const bn_math::InputGradient k = bn_math::input_gradient(f.alpha, inv, sg, sgx, count);
    for (int64_t i = 0; i < count; ++i) {
      const float g = grad(i);
      const float xv = x[row + i];
      if (d_res) d_res[row + i] = g;
      d_x[row + i] = bn_math::d_input(g, xv, mean, f.alpha, k);
    }
  }
}

template <int C>
void check_batchnorm(int64_t batch, int hw, uint32_t seed) {
  using BN = BatchNorm2d<C>;
  const int64_t count = batch * hw, n = C * count;
  const Planes l = Planes::cnhw(batch, hw, 1);
  typename BN::Params p;
  const std::vector<float> g = random_vector(C, seed, 0.5f, 1.0f), b = random_vector(C, seed + 1, 0.5f);
  const std::vector<float> rm0 = random_vector(C, seed + 2, 0.5f), rv0 = random_vector(C, seed + 3, 0.2f, 1.5f);
  std::copy(g.begin(), g.end(), p.weight.data());
  std::copy(b.begin(), b.end(), p.bias.data());
  std::copy(rm0.begin(), rm0.end(), p.running_mean.data());
  std::copy(rv0.begin(), rv0.end(), p.running_var.data());
  const std::vector<float> x = random_vector(n, seed + 4, 2.0f, 0.7f), r = random_vector(n, seed + 5);
  const std::vector<float> dy = random_vector(n, seed + 6);
  double worst = 0;
  auto report = [&](const char* what, double e) {
    std::cout << "batchnorm C " << C << " B " << batch << " hw " << hw << " " << what << ": rel err " << e << "\n";
    BOOST_TEST(e <= 1e-5, what);
    worst = std::max(worst, e);
  };

  for (int variant = 0; variant < 3; ++variant) {  // none, relu, relu + residual
    const Activation act = variant == 0 ? Activation::none : Activation::relu;
    const bool relu = act == Activation::relu;
    const float* res = variant == 2 ? r.data() : nullptr;
    // eval
    std::vector<float> y_cpu(n), y_emu(n);
    BN::forward_eval(p, x.data(), l, y_cpu.data(), l, batch, hw, act, res, l);
    for (int c = 0; c < C; ++c) {
      const bn_math::Affine f = bn_math::affine(g[c], b[c], rm0[c], bn_math::invstd(rv0[c]));
      for (int64_t i = 0; i < count; ++i)
        y_emu[c * count + i] = res ? bn_math::apply_residual(x[c * count + i], f, res[c * count + i], relu)
                                   : bn_math::apply(x[c * count + i], f, relu);
    }
    report("eval", rel_err(y_emu, y_cpu));

    // train forward (running statistics from the same start)
    typename BN::Saved saved;
    typename BN::Params q = p;
    BN::forward_train(q, x.data(), l, y_cpu.data(), l, batch, hw, act, res, l, &saved);
    std::vector<float> rm = rm0, rv = rv0;
    EmuSaved es;
    emu_forward_train(C, x, y_emu, g.data(), b.data(), rm.data(), rv.data(), count, relu, res, es);
    report("train y", rel_err(y_emu, y_cpu));
    report("saved mean", rel_err(es.mean, saved.mean));
    report("saved invstd", rel_err(es.rstd, saved.invstd));
    report("running mean", rel_err(rm, std::vector<float>(q.running_mean.data(), q.running_mean.data() + C)));
    report("running var", rel_err(rv, std::vector<float>(q.running_var.data(), q.running_var.data() + C)));

    // backward: mask from y (with residual), from x (no residual) or none
    const bool from_y = variant == 2 || (variant == 1 && seed % 2);
    const bn_math::Mask mask = !relu ? bn_math::Mask::none : from_y ? bn_math::Mask::output : bn_math::Mask::input;
    std::vector<float> dg_cpu = random_vector(C, seed + 7), db_cpu = random_vector(C, seed + 8);
    std::vector<float> dg_emu = dg_cpu, db_emu = db_cpu;
    std::vector<float> dx_cpu(n), dx_emu(n), dr_cpu(n), dr_emu(n);
    const float* yk = mask == bn_math::Mask::output ? y_cpu.data() : nullptr;
    BN::backward(q, saved, x.data(), l, yk, l, dy.data(), l, dx_cpu.data(), l, dg_cpu.data(), db_cpu.data(), batch, hw,
                 act, res ? dr_cpu.data() : nullptr, l);
    emu_backward(C, dx_emu.data(), dg_emu.data(), db_emu.data(), dy.data(), x.data(), yk, es, g.data(), b.data(),
                 count, mask, res ? dr_emu.data() : nullptr);
    report("d_x", rel_err(dx_emu, dx_cpu));
    report("d_gamma", rel_err(dg_emu, dg_cpu));
    report("d_beta", rel_err(db_emu, db_cpu));
    if (res) report("d_residual", rel_err(dr_emu, dr_cpu));
  }
  std::cout << "batchnorm C " << C << " worst rel err " << worst << "\n";
}

}  // namespace

BOOST_AUTO_TEST_CASE(cuda_batchnorm_formulas_match_cpu_batchnorm2d) {
  check_batchnorm<5>(1, 49, 21);
  check_batchnorm<3>(3, 25, 22);
  check_batchnorm<8>(2, 1100, 23);  // more values than the kernel's threads
}
