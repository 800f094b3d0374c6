// The modified ResNet's backward passes against central differences of a scalar loss
// L = sum(r * out) with fixed random r: each op and block on small random configurations (and
// training's Winograd convolution against the direct loop).
// Convolution and pooling are linear, so their differences are exact up to rounding; BatchNorm
// is differentiated through a double-precision reference; the attention pool and the bottleneck
// through their own float forward passes (looser tolerances, several step sizes for ReLU kinks).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "clip/blocks/attention_pool.hpp"
#include "clip/blocks/bottleneck.hpp"
#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/pool.hpp"
#include "clip/tensor/param.hpp"

using namespace clip;

namespace {

std::vector<float> random_values(int64_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

template <class T>
void fill_random(T& param, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  const std::vector<float> v = random_values(T::numel, seed, lo, hi);
  std::copy(v.begin(), v.end(), param.data());
}

double dot(const std::vector<float>& r, const float* y) {
  double s = 0;
  for (size_t i = 0; i < r.size(); ++i) s += double(r[i]) * y[i];
  return s;
}

// Central differences of loss() in `samples` entries of v[0, n) (all when n is small), against
// the analytic gradient: the largest difference and the largest |difference quotient|.
struct Check {
  double max_err = 0, max_ref = 0;
  int checked = 0;
};

// With several step sizes, an entry's error is the smallest over them: a perturbation that
// moves a value across a ReLU's kink spoils one quotient, rarely all (a wrong gradient fails at
// every step size).
Check central_differences(float* v, int64_t n, const float* grad, const std::function<double()>& loss,
                          std::vector<float> steps, int samples = 32) {
  Check c;
  const int64_t stride = std::max<int64_t>(1, n / samples);
  for (int64_t i = 0; i < n; i += stride) {
    double best = INFINITY;
    for (size_t k = 0; k < steps.size(); ++k) {
      const float saved = v[i];
      v[i] = saved + steps[k];
      const float hi = v[i];
      const double up = loss();
      v[i] = saved - steps[k];
      const float lo = v[i];
      const double down = loss();
      v[i] = saved;
      const double fd = (up - down) / (double(hi) - lo);
      best = std::min(best, std::abs(fd - grad[i]));
      if (k == 0) c.max_ref = std::max(c.max_ref, std::abs(fd));
    }
    c.max_err = std::max(c.max_err, best);
    ++c.checked;
  }
  return c;
}
Check central_differences(float* v, int64_t n, const float* grad, const std::function<double()>& loss, float eps,
                          int samples = 32) {
  return central_differences(v, n, grad, loss, std::vector<float>{eps}, samples);
}

// max|analytic - fd| <= rel * max|fd| + abs_floor, reported.
void expect_close(const std::string& what, const Check& c, double rel, double abs_floor = 0) {
  BOOST_TEST_MESSAGE(what << ": " << c.checked << " entries, max|d| = " << c.max_err << ", max|fd| = " << c.max_ref
                          << ", ratio " << c.max_err / std::max(c.max_ref, 1e-30));
  BOOST_TEST(c.max_err <= rel * c.max_ref + abs_floor,
             what << ": max|analytic - fd| = " << c.max_err << " against max|fd| = " << c.max_ref);
  BOOST_TEST(c.checked > 0);
}

// Converts NCHW to channel-major CNHW.
std::vector<float> to_cnhw(const std::vector<float>& x, int64_t batch, int64_t channels, int64_t hw) {
  std::vector<float> y(x.size());
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < hw; ++i) y[(c * batch + n) * hw + i] = x[(n * channels + c) * hw + i];
  return y;
}

// Conv2d::backward against differences of conv2d_reference, input and output channel-major (as
// in the ResNet) or NCHW input; with and without d_x; d_weight accumulating onto what it held.
template <int Cin, int Cout, int K, int Stride, int Pad>
void check_conv_backward(int64_t batch, int h, int w, bool nchw_input, bool with_dx, int samples = 32) {
  using C = Conv2d<Cin, Cout, K, Stride, Pad>;
  const int ho = C::out_size(h), wo = C::out_size(w);
  const int64_t in_hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
  const Planes xl = nchw_input ? Planes::nchw(Cin, h, w) : Planes::cnhw(batch, h, w);
  const Planes yl = Planes::cnhw(batch, ho, wo);
  std::vector<float> x = random_values(batch * Cin * in_hw, 100 + Cin * 7 + h);
  std::vector<float> weight = random_values(int64_t{Cout} * Cin * K * K, 200 + Cout + w);
  const std::vector<float> r = random_values(batch * Cout * out_hw, 300 + K * 11 + Stride);
  std::vector<float> y(r.size());
  auto loss = [&] {
    conv2d_reference<Cin, Cout, K, Stride, Pad>(x.data(), xl, weight.data(), y.data(), yl, batch, h, w);
    return dot(r, y.data());
  };

  std::ostringstream what;
  what << "conv " << Cin << "->" << Cout << " k" << K << " s" << Stride << " p" << Pad << " on " << batch << "x" << h
       << "x" << w << (nchw_input ? " NCHW" : " CNHW") << (with_dx ? "" : " (no d_x)");

  // Training's forward (Winograd for 3x3 stride 1 on channel-major planes) against the loop.
  if (!nchw_input) {
    std::vector<float> ref(y.size()), got(y.size(), 9.0f), col;
    conv2d_reference<Cin, Cout, K, Stride, Pad>(x.data(), xl, weight.data(), ref.data(), yl, batch, h, w);
    C::forward_train(x.data(), xl, weight.data(), got.data(), yl, batch, h, w, col);
    double err = 0, top = 0;
    for (size_t i = 0; i < ref.size(); ++i)
      err = std::max(err, std::abs(double(got[i]) - ref[i])), top = std::max(top, std::abs(double(ref[i])));
    BOOST_TEST(err <= 1e-5 * top, what.str() << " forward_train: max|d| " << err << " of max " << top);
  }

  // backward (Winograd where it applies) and backward_im2col.
  for (bool im2col : {false, true}) {
    if (im2col && !C::winograd) continue;  // backward is backward_im2col already
    const std::string path = what.str() + (C::winograd && !nchw_input && !im2col ? " winograd" : "");
    auto run = [&](float* dw, float* dx, bool accumulate, std::vector<float>& col) {
      if (im2col)
        C::backward_im2col(x.data(), xl, weight.data(), r.data(), yl, dw, dx, xl, batch, h, w, col, accumulate);
      else
        C::backward(x.data(), xl, weight.data(), r.data(), yl, dw, dx, xl, batch, h, w, col, accumulate);
    };
    // d_weight starts from other values (gradients accumulate); d_x from garbage (assigned).
    const std::vector<float> start = random_values(weight.size(), 400);
    std::vector<float> d_weight = start, d_x(x.size(), 123.0f), col;
    run(d_weight.data(), with_dx ? d_x.data() : nullptr, false, col);
    for (size_t i = 0; i < d_weight.size(); ++i) d_weight[i] -= start[i];

    // Linear: the differences are exact up to the reference's float rounding.
    expect_close(path + " d_weight",
                 central_differences(weight.data(), weight.size(), d_weight.data(), loss, 0.5f, samples), 1e-4, 1e-5);
    if (!with_dx) continue;
    expect_close(path + " d_x", central_differences(x.data(), x.size(), d_x.data(), loss, 0.5f, samples), 1e-4, 1e-5);

    // accumulate: d_x += the same gradient.
    std::vector<float> twice = d_x, dw(d_weight.size());
    run(dw.data(), twice.data(), true, col);
    double err = 0;
    for (size_t i = 0; i < d_x.size(); ++i) err = std::max(err, std::abs(double(twice[i]) - 2.0 * d_x[i]));
    BOOST_TEST(err < 1e-4, path << " accumulate: " << err);
  }
}

// Train-mode y = act(bn(x) [+ residual]) in double, NCHW.
std::vector<double> batchnorm_reference(const std::vector<double>& x, const std::vector<double>& weight,
                                        const std::vector<double>& bias, const std::vector<double>* residual,
                                        int channels, int64_t batch, int64_t hw, bool relu) {
  std::vector<double> y(x.size());
  const double count = double(batch * hw);
  for (int c = 0; c < channels; ++c) {
    double mean = 0, var = 0;
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) mean += x[(n * channels + c) * hw + i];
    mean /= count;
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) var += std::pow(x[(n * channels + c) * hw + i] - mean, 2);
    var /= count;
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t k = (n * channels + c) * hw + i;
        double v = (x[k] - mean) / std::sqrt(var + 1e-5) * weight[c] + bias[c];
        if (residual) v += (*residual)[k];
        y[k] = relu ? std::max(v, 0.0) : v;
      }
  }
  return y;
}

// BatchNorm2d::backward against double-precision differences of the reference.
// mask: 0 no ReLU, 1 ReLU with the mask from y, 2 ReLU with the mask recomputed from x.
void check_batchnorm_backward(int mask, bool residual, bool channel_major) {
  constexpr int C = 4;
  const int64_t batch = 3, hw = 6;
  using BN = BatchNorm2d<C>;
  BN::Params p;
  fill_random(p.weight, 11, 0.5f, 1.5f);
  fill_random(p.bias, 12, -0.5f, 0.5f);
  p.running_mean.fill(0.0f);
  p.running_var.fill(1.0f);
  const std::vector<float> x = random_values(batch * C * hw, 13, -2.0f, 3.0f);
  const std::vector<float> res = random_values(x.size(), 14);
  const std::vector<float> r = random_values(x.size(), 15);
  const bool relu = mask > 0;

  // The op, in the layout under test.
  const Planes l = channel_major ? Planes::cnhw(batch, 2, 3) : Planes::nchw(C, 2, 3);
  auto layout = [&](const std::vector<float>& v) { return channel_major ? to_cnhw(v, batch, C, hw) : v; };
  const std::vector<float> xl = layout(x), resl = layout(res), rl = layout(r);
  std::vector<float> y(x.size());
  BN::Saved saved;
  BN::forward_train(p, xl.data(), l, y.data(), l, batch, hw, relu ? Activation::relu : Activation::none,
                    residual ? resl.data() : nullptr, l, &saved, /*update_running_stats=*/false);
  BOOST_TEST(p.num_batches_tracked.value == 0);
  BOOST_TEST(p.running_mean[0] == 0.0f);
  std::vector<float> d_x(x.size()), d_res(x.size()), dy = rl;
  std::vector<float> d_weight(C, 0.5f), d_bias(C, -0.25f);  // accumulate onto these
  BN::backward(p, saved, xl.data(), l, mask == 1 ? y.data() : nullptr, l, dy.data(), l, d_x.data(), l,
               d_weight.data(), d_bias.data(), batch, hw, relu ? Activation::relu : Activation::none,
               residual ? d_res.data() : nullptr, l);
  for (int c = 0; c < C; ++c) d_weight[c] -= 0.5f, d_bias[c] += 0.25f;
  // Back to NCHW for the reference.
  auto nchw = [&](const std::vector<float>& v) {
    if (!channel_major) return v;
    std::vector<float> o(v.size());
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < hw; ++i) o[(n * C + c) * hw + i] = v[(c * batch + n) * hw + i];
    return o;
  };
  const std::vector<float> gx = nchw(d_x), gres = nchw(d_res);

  std::vector<double> xd(x.begin(), x.end()), wd(p.weight.values.begin(), p.weight.values.end()),
      bd(p.bias.values.begin(), p.bias.values.end()),
      rd(res.begin(), res.end());
  auto loss = [&] {
    const std::vector<double> out = batchnorm_reference(xd, wd, bd, residual ? &rd : nullptr, C, batch, hw, relu);
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += r[i] * out[i];
    return s;
  };
  auto differences = [&](std::vector<double>& v, const float* grad) {
    Check c;
    const double eps = 1e-6;
    for (size_t i = 0; i < v.size(); ++i) {
      const double saved_v = v[i];
      v[i] = saved_v + eps;
      const double up = loss();
      v[i] = saved_v - eps;
      const double down = loss();
      v[i] = saved_v;
      const double fd = (up - down) / (2 * eps);
      c.max_err = std::max(c.max_err, std::abs(fd - grad[i]));
      c.max_ref = std::max(c.max_ref, std::abs(fd));
      ++c.checked;
    }
    return c;
  };
  std::ostringstream what;
  what << "BatchNorm " << (mask == 0 ? "" : mask == 1 ? "ReLU (mask from y) " : "ReLU (mask from x) ")
       << (residual ? "+ residual " : "") << (channel_major ? "CNHW" : "NCHW");
  expect_close(what.str() + " d_x", differences(xd, gx.data()), 1e-4, 1e-6);
  expect_close(what.str() + " d_weight", differences(wd, d_weight.data()), 1e-4, 1e-6);
  expect_close(what.str() + " d_bias", differences(bd, d_bias.data()), 1e-4, 1e-6);
  if (residual) expect_close(what.str() + " d_residual", differences(rd, gres.data()), 1e-4, 1e-6);
}

template <int K>
void check_avgpool_backward(bool accumulate) {
  const int64_t batch = 2, channels = 3;
  const int h = 7, w = 8;  // floor mode drops the last row (and column, for K = 3)
  const int ho = h / K, wo = w / K;
  const Planes xl = Planes::cnhw(batch, h, w), yl = Planes::cnhw(batch, ho, wo);
  std::vector<float> x = random_values(batch * channels * h * w, 40 + K);
  const std::vector<float> r = random_values(batch * channels * ho * wo, 50 + K);
  std::vector<float> y(r.size());
  auto loss = [&] {
    AvgPool2d<K>::forward(x.data(), xl, y.data(), yl, batch, channels, h, w);
    return dot(r, y.data());
  };
  const std::vector<float> start = random_values(x.size(), 60);
  std::vector<float> d_x = accumulate ? start : std::vector<float>(x.size(), 7.0f);
  AvgPool2d<K>::backward(r.data(), yl, d_x.data(), xl, batch, channels, h, w, accumulate);
  if (accumulate)
    for (size_t i = 0; i < d_x.size(); ++i) d_x[i] -= start[i];
  std::ostringstream what;
  what << "AvgPool2d(" << K << ")" << (accumulate ? " accumulating" : "") << " d_x";
  expect_close(what.str(), central_differences(x.data(), x.size(), d_x.data(), loss, 0.5f, 1 << 20), 1e-5, 1e-6);
}

// Every tensor of a Params struct, by name, for difference checks against the same tensor of
// the gradients.
template <class Params>
std::vector<std::pair<std::string, std::pair<float*, int64_t>>> tensors_of(Params& p) {
  std::vector<std::pair<std::string, std::pair<float*, int64_t>>> out;
  for_each_tensor(p, [&](const std::string& name, auto& t, Role role) {
    if constexpr (!is_counter_v<decltype(t)>)
      if (role == Role::parameter) out.push_back({name, {t.data(), std::remove_cvref_t<decltype(t)>::numel}});
  });
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(resnet_backward)

BOOST_AUTO_TEST_CASE(conv2d_backward_matches_differences_of_the_direct_loop) {
  check_conv_backward<3, 5, 3, 2, 1>(2, 9, 11, /*nchw_input=*/true, /*with_dx=*/false);  // the stem's first conv
  check_conv_backward<3, 5, 3, 2, 1>(2, 9, 11, true, true);
  check_conv_backward<4, 6, 3, 1, 1>(3, 7, 5, false, true);    // bottleneck conv2: Winograd, odd sizes
  check_conv_backward<4, 6, 3, 1, 1>(2, 6, 8, true, true);     // the same from NCHW: im2col
  check_conv_backward<5, 5, 3, 1, 1>(2, 1, 1, false, true);    // Winograd on one pixel
  check_conv_backward<5, 3, 3, 1, 1>(2, 2, 9, false, true);    // one row of tiles
  check_conv_backward<3, 5, 3, 1, 1>(2, 5, 6, false, true);    // widening
  check_conv_backward<4, 6, 1, 1, 0>(3, 6, 5, false, true);    // direct 1x1: two GEMMs
  check_conv_backward<4, 6, 1, 1, 0>(3, 6, 5, true, true);     // direct 1x1, per-image segments
  check_conv_backward<2, 3, 5, 3, 2>(2, 10, 13, false, true);  // kernel 5, stride 3, padding 2
  check_conv_backward<3, 2, 1, 2, 0>(2, 7, 6, false, true);    // strided 1x1 through im2col
  check_conv_backward<2, 3, 3, 2, 1>(2, 1, 1, false, true);    // one pixel: only the centre tap
  // 64 channels over 3 x 24 x 24: the pixels take more than one block per thread (im2col).
  check_conv_backward<64, 3, 3, 1, 1>(3, 24, 24, false, true, 12);
}

BOOST_AUTO_TEST_CASE(batchnorm_train_backward_matches_double_differences) {
  for (bool channel_major : {false, true}) {
    check_batchnorm_backward(0, false, channel_major);
    check_batchnorm_backward(0, true, channel_major);
    check_batchnorm_backward(1, false, channel_major);
    check_batchnorm_backward(1, true, channel_major);
    check_batchnorm_backward(2, false, channel_major);
  }
}

BOOST_AUTO_TEST_CASE(avgpool_backward_spreads_each_window_evenly) {
  check_avgpool_backward<2>(false);
  check_avgpool_backward<3>(false);
  check_avgpool_backward<2>(true);
  check_avgpool_backward<1>(false);
}

BOOST_AUTO_TEST_CASE(attention_pool_backward_matches_differences) {
  constexpr int grid = 2, C = 64, heads = 2, E = 8;
  using Pool = AttentionPool2d<grid, C, heads, E>;
  const int64_t batch = 3;
  auto p = std::make_unique<Pool::Params>();
  unsigned seed = 70;
  for_each_tensor(*p, [&](const std::string&, auto& t, Role) {
    if constexpr (!is_counter_v<decltype(t)>) fill_random(t, seed++, -0.3f, 0.3f);
  });
  const Planes xl = Planes::cnhw(batch, grid, grid);
  std::vector<float> x = random_values(int64_t{C} * batch * grid * grid, 80);
  const std::vector<float> r = random_values(batch * E, 81);
  std::vector<float> y(batch * E), saved(Pool::train_floats_per_sample * batch), scratch;
  auto loss = [&] {
    Pool::forward(*p, x.data(), xl, y.data(), batch, scratch);
    return dot(r, y.data());
  };

  auto grads = std::make_unique<Pool::Params>();
  zero(*grads);
  Pool::forward_train(*p, x.data(), xl, y.data(), batch, saved.data());
  const double base = dot(r, y.data());
  BOOST_TEST(std::abs(loss() - base) <= 1e-6 * std::abs(base));  // train forward = forward
  std::vector<float> d_x(x.size(), 5.0f);
  Pool::backward(*p, saved.data(), r.data(), d_x.data(), xl, *grads, batch);

  expect_close("attention pool d_x", central_differences(x.data(), x.size(), d_x.data(), loss, 1e-2f, 48), 2e-3, 1e-5);
  auto params = tensors_of(*p);
  auto gradients = tensors_of(*grads);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, tensor] = params[i];
    if (name == "k_proj.bias") {
      // Softmax ignores a shift shared by every key: the gradient is zero.
      double top = 0;
      for (int64_t j = 0; j < tensor.second; ++j) top = std::max(top, double(std::abs(gradients[i].second.first[j])));
      BOOST_TEST(top < 1e-6, "k_proj.bias gradient " << top);
      continue;
    }
    expect_close("attention pool " + name,
                 central_differences(tensor.first, tensor.second, gradients[i].second.first, loss, 1e-2f, 24), 2e-3,
                 1e-5);
  }
}

// One bottleneck in train mode, through its own float forward.
template <int In, int P, int Stride>
void check_bottleneck(int64_t batch, int h, int w) {
  using Block = Bottleneck<In, P, Stride>;
  const int ho = Block::out_size(h), wo = Block::out_size(w);
  auto p = std::make_unique<typename Block::Params>();
  unsigned seed = 90;
  for_each_tensor(*p, [&](const std::string& name, auto& t, Role) {
    if constexpr (is_counter_v<decltype(t)>) {
      t.value = 0;
    } else if (name.find("running_var") != std::string::npos) {
      t.fill(1.0f);
    } else if (name.find("running_mean") != std::string::npos) {
      t.fill(0.0f);
    } else if (name.find("bias") != std::string::npos) {
      fill_random(t, seed++, -0.2f, 0.2f);
    } else if (name.find("bn") != std::string::npos || name.find("downsample.1") != std::string::npos) {
      fill_random(t, seed++, 0.5f, 1.5f);  // BatchNorm weights
    } else {
      fill_random(t, seed++, -0.5f, 0.5f);
    }
  });
  std::vector<float> x = random_values(int64_t{In} * batch * h * w, 91);
  const int64_t out_n = int64_t{4 * P} * batch * ho * wo;
  const std::vector<float> r = random_values(out_n, 92);
  std::vector<float> storage(Block::saved_floats_per_sample(h, w) * batch);
  std::vector<float> area_a(Block::scratch_floats_per_sample(h, w) * batch), area_b(area_a.size());
  TrainScratch s;
  s.a = area_a.data();
  s.b = area_b.data();
  typename Block::Saved sv;
  BOOST_TEST(sv.place(storage.data(), batch, h, w) == storage.data() + storage.size());
  auto loss = [&] {
    Block::forward_train(*p, x.data(), sv, batch, h, w, s, /*update_running_stats=*/false);
    return dot(r, sv.y);
  };

  Block::forward_train(*p, x.data(), sv, batch, h, w, s);
  BOOST_TEST(p->bn1.num_batches_tracked.value == 1);
  std::vector<float> dy = r, d_x(x.size(), 3.0f);
  auto grads = std::make_unique<typename Block::Params>();
  zero(*grads);
  Block::backward(*p, x.data(), sv, dy.data(), d_x.data(), *grads, batch, h, w, s);

  std::ostringstream what;
  what << "bottleneck " << In << "->" << 4 * P << " stride " << Stride << " on " << batch << "x" << h << "x" << w;
  const std::vector<float> steps{3e-3f, 1e-3f, 3e-4f};
  expect_close(what.str() + " d_x", central_differences(x.data(), x.size(), d_x.data(), loss, steps, 48), 2e-3, 1e-4);
  auto params = tensors_of(*p);
  auto gradients = tensors_of(*grads);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, tensor] = params[i];
    expect_close(what.str() + " " + name,
                 central_differences(tensor.first, tensor.second, gradients[i].second.first, loss, steps, 24), 2e-3,
                 1e-4);
  }
  BOOST_TEST(p->bn1.num_batches_tracked.value == 1);  // the differences did not update statistics
}

BOOST_AUTO_TEST_CASE(bottleneck_backward_matches_differences) {
  check_bottleneck<8, 4, 2>(3, 6, 6);   // downsample with stride 2 (pooled shortcut)
  check_bottleneck<8, 4, 1>(2, 5, 5);   // downsample without stride (layer1's first block)
  check_bottleneck<16, 4, 1>(2, 5, 5);  // identity shortcut
}

BOOST_AUTO_TEST_SUITE_END()
