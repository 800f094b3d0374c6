// OpenAI's anti-aliased Bottleneck (clip/model.py), eval mode:
//
//   out = relu(bn1(conv1 1x1(x)))                 [P, B, H, W]
//   out = relu(bn2(conv2 3x3 pad 1(out)))         [P, B, H, W]
//   out = avgpool(Stride)(out)   if Stride > 1    [P, B, H/S, W/S]
//   out = bn3(conv3 1x1(out))                     [4P, B, H/S, W/S]
//   identity = downsample(x) = bn(conv 1x1(avgpool(Stride)(x)))   when Stride > 1 or In != 4P, else x
//   y = relu(out + identity)
//
// The downsample branch is PyTorch's Sequential{"-1": AvgPool2d, "0": Conv2d, "1": BatchNorm2d},
// so its tensors are `downsample.0.weight` and `downsample.1.*`.
//
// Activations are channel-major, [C, B, H, W] (Planes::cnhw): see ops/conv2d.hpp for why.
//
// Training: forward_train keeps the convolution outputs before their BatchNorms (c1, c2, c3 and
// the downsample's cd) and the block output; backward recomputes the ReLU outputs it needs from
// them (one cheap pass each) instead of keeping them, and writes each BatchNorm's input gradient
// over the saved convolution output it no longer needs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/pool.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// Reusable buffers for the blocks of a ResNet (grown to the largest block, then reused).
struct BottleneckScratch {
  std::vector<float> t1, t2, pooled, shortcut_in, shortcut, col;

  static float* get(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) {
      v.clear();
      v.resize(n);
    }
    return v.data();
  }
};

// The same for training: two activation-sized scratch areas (`a`, `b`, each at least
// Bottleneck::scratch_floats_per_sample floats per image, owned by the caller), the
// convolutions' scratch (im2col or Winograd tiles) and per-thread BatchNorm statistics (both
// grown as needed, then reused).
struct TrainScratch {
  float* a = nullptr;
  float* b = nullptr;
  std::vector<float> col;
  std::vector<double> stats;

  // `floats` zeroed doubles for BatchNorm statistics (BatchNorm2d::statistics_size).
  double* zeroed_stats(int64_t floats) {
    if (static_cast<int64_t>(stats.size()) < floats) stats.resize(floats);
    std::fill_n(stats.data(), floats, 0.0);
    return stats.data();
  }
};

namespace detail {
// c = conv(x) with bn's batch statistics gathered in the convolution's epilogue, then finished
// into `saved` (and the running statistics, when update_running_stats).
template <class Conv, class BN>
void conv_statistics(typename BN::Params& bn, typename BN::Saved& saved, const float* x, Planes xl,
                     const typename Conv::Weight& weight, float* c, Planes cl, int64_t batch, int h, int w,
                     TrainScratch& s, bool update_running_stats) {
  const int threads = conv_threads();
  double* stats = s.zeroed_stats(BN::statistics_size(threads));
  Conv::forward_train(x, xl, weight.data(), c, cl, batch, h, w, s.col, typename BN::StatsEpilogue{stats});
  BN::finish_statistics(bn, stats, threads, saved, update_running_stats);
}
}  // namespace detail

template <int In, int P, int Stride>
struct Bottleneck {
  static_assert(In > 0 && P > 0, "a bottleneck needs positive channel counts");
  static_assert(Stride >= 1, "a bottleneck's stride must be positive");
  static constexpr int in_channels = In;
  static constexpr int planes = P;
  static constexpr int out_channels = 4 * P;  // expansion 4
  static constexpr int stride = Stride;
  static constexpr bool has_downsample = Stride > 1 || In != 4 * P;

  using Conv1 = Conv2d<In, P, 1>;
  using Conv2 = Conv2d<P, P, 3, 1, 1>;
  using Conv3 = Conv2d<P, 4 * P, 1>;
  using ConvDown = Conv2d<In, 4 * P, 1>;
  using BN = BatchNorm2d<P>;
  using BNOut = BatchNorm2d<4 * P>;
  using Pool = AvgPool2d<Stride>;

  struct Downsample {
    typename ConvDown::Weight conv;  // downsample.0
    typename BNOut::Params bn;       // downsample.1
  };
  struct NoDownsample {};

  struct Params {
    typename Conv1::Weight conv1;
    typename BN::Params bn1;
    typename Conv2::Weight conv2;
    typename BN::Params bn2;
    typename Conv3::Weight conv3;
    typename BNOut::Params bn3;
    [[no_unique_address]] std::conditional_t<has_downsample, Downsample, NoDownsample> downsample;

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "conv1.weight", conv1, Role::parameter);
      bn1.visit(f, prefix + "bn1.");
      f(prefix + "conv2.weight", conv2, Role::parameter);
      bn2.visit(f, prefix + "bn2.");
      f(prefix + "conv3.weight", conv3, Role::parameter);
      bn3.visit(f, prefix + "bn3.");
      if constexpr (has_downsample) {
        f(prefix + "downsample.0.weight", downsample.conv, Role::parameter);
        downsample.bn.visit(f, prefix + "downsample.1.");
      }
    }
  };

  static constexpr int out_size(int in) { return Pool::out_size(in); }

  // What forward_train keeps for backward. The activations point into storage the caller owns,
  // saved_floats_per_sample(h, w) floats per image (ModifiedResNet::TrainActs).
  struct Saved {
    float* c1 = nullptr;  // [P, B, H, W]         conv1(x)
    float* c2 = nullptr;  // [P, B, H, W]         conv2(a1)
    float* c3 = nullptr;  // [4P, B, H/S, W/S]    conv3(pool(a2))
    float* cd = nullptr;  // [4P, B, H/S, W/S]    downsample conv (with a downsample)
    float* y = nullptr;   // [4P, B, H/S, W/S]    the block's output
    typename BN::Saved bn1, bn2;
    typename BNOut::Saved bn3, bnd;

    // Points the convolution outputs at `storage` for `batch` images; returns the end.
    float* place_convolutions(float* storage, int64_t batch, int h, int w) {
      const int64_t mid = int64_t{P} * batch * h * w, out = int64_t{4 * P} * batch * out_size(h) * out_size(w);
      c1 = storage;
      c2 = c1 + mid;
      c3 = c2 + mid;
      cd = has_downsample ? c3 + out : nullptr;
      return c3 + (has_downsample ? 2 : 1) * out;
    }
    // Points the block output at `storage`; returns the end.
    float* place_output(float* storage, int64_t batch, int h, int w) {
      y = storage;
      return y + int64_t{4 * P} * batch * out_size(h) * out_size(w);
    }
    // Both, one after the other.
    float* place(float* storage, int64_t batch, int h, int w) {
      return place_output(place_convolutions(storage, batch, h, w), batch, h, w);
    }
  };
  static constexpr int64_t convolution_floats_per_sample(int h, int w) {
    return int64_t{2} * P * h * w + int64_t{has_downsample ? 2 : 1} * 4 * P * out_size(h) * out_size(w);
  }
  static constexpr int64_t output_floats_per_sample(int h, int w) { return int64_t{4} * P * out_size(h) * out_size(w); }
  static constexpr int64_t saved_floats_per_sample(int h, int w) {
    return convolution_floats_per_sample(h, w) + output_floats_per_sample(h, w);
  }
  // Each of TrainScratch's two areas: a mid-block activation, or the pooled input of the
  // downsample.
  static constexpr int64_t scratch_floats_per_sample(int h, int w) {
    return std::max(int64_t{P} * h * w, int64_t{In} * out_size(h) * out_size(w));
  }

  // Train mode: y (saved.y) = block(x) with BatchNorms on batch statistics (running statistics
  // updated unless update_running_stats is false), keeping what backward needs in `saved`.
  static void forward_train(Params& p, const float* x, Saved& sv, int64_t batch, int h, int w, TrainScratch& s,
                            bool update_running_stats = true) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
    const Planes in_l = Planes::cnhw(batch, h, w), out_l = Planes::cnhw(batch, ho, wo);
    const bool update = update_running_stats;

    detail::conv_statistics<Conv1, BN>(p.bn1, sv.bn1, x, in_l, p.conv1, sv.c1, in_l, batch, h, w, s, update);
    BN::apply_train(p.bn1, sv.bn1, sv.c1, in_l, s.a, in_l, batch, hw, Activation::relu);          // a1 [P, B, H, W]
    detail::conv_statistics<Conv2, BN>(p.bn2, sv.bn2, s.a, in_l, p.conv2, sv.c2, in_l, batch, h, w, s, update);
    const float* mid = mid_input(p, sv, batch, h, w, s);                                           // [P, B, H/S, W/S]
    detail::conv_statistics<Conv3, BNOut>(p.bn3, sv.bn3, mid, out_l, p.conv3, sv.c3, out_l, batch, ho, wo, s, update);

    if constexpr (has_downsample) {
      const float* down_in = x;
      if constexpr (Stride > 1) {
        Pool::forward(x, in_l, s.a, out_l, batch, In, h, w);                                       // [In, B, H/S, W/S]
        down_in = s.a;
      }
      detail::conv_statistics<ConvDown, BNOut>(p.downsample.bn, sv.bnd, down_in, out_l, p.downsample.conv, sv.cd,
                                               out_l, batch, ho, wo, s, update);
      BNOut::apply_train_sum(p.bn3, sv.bn3, sv.c3, p.downsample.bn, sv.bnd, sv.cd, sv.y, batch * out_hw);
    } else {
      BNOut::apply_train(p.bn3, sv.bn3, sv.c3, out_l, sv.y, out_l, batch, out_hw, Activation::relu, x, out_l);
    }                                                                                              // [4P, B, H/S, W/S]
  }

  // grads += d loss / d params and d_x [In, B, H, W] (assigned) from dy [4P, B, H/S, W/S], the
  // block input x and what forward_train saved. May overwrite dy, and overwrites the saved
  // convolution outputs (with their gradients). d_x must not alias x, dy or the scratch.
  static void backward(const Params& p, const float* x, Saved& sv, float* dy, float* d_x, Params& grads,
                       int64_t batch, int h, int w, TrainScratch& s) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
    const Planes in_l = Planes::cnhw(batch, h, w), out_l = Planes::cnhw(batch, ho, wo);
    const Activation relu = Activation::relu;

    // g = dy * (y > 0), the residual's gradient, replaces dy, or with an identity shortcut starts
    // d_x (conv1's backward adds onto it); d c3 replaces c3.
    float* g = has_downsample ? dy : d_x;
    BNOut::backward(p.bn3, sv.bn3, sv.c3, out_l, sv.y, out_l, dy, out_l, sv.c3, out_l, grads.bn3.weight.data(),
                    grads.bn3.bias.data(), batch, out_hw, relu, g, out_l);
    // conv3 of the (pooled) a2, recomputed. With a stride, d pool(a2) goes to a, d a2 to b.
    const float* mid = mid_input(p, sv, batch, h, w, s);
    Conv3::backward(mid, out_l, p.conv3.data(), sv.c3, out_l, grads.conv3.data(), s.a, out_l, batch, ho, wo, s.col);
    float* d_a2 = s.a;
    if constexpr (Stride > 1) {
      Pool::backward(s.a, out_l, s.b, in_l, batch, P, h, w);
      d_a2 = s.b;
    }
    BN::backward(p.bn2, sv.bn2, sv.c2, in_l, nullptr, in_l, d_a2, in_l, sv.c2, in_l, grads.bn2.weight.data(),
                 grads.bn2.bias.data(), batch, hw, relu);                                          // d c2
    float* a1 = d_a2 == s.a ? s.b : s.a;
    float* d_a1 = d_a2;
    BN::apply_train(p.bn1, sv.bn1, sv.c1, in_l, a1, in_l, batch, hw, relu);
    Conv2::backward(a1, in_l, p.conv2.data(), sv.c2, in_l, grads.conv2.data(), d_a1, in_l, batch, h, w, s.col);
    BN::backward(p.bn1, sv.bn1, sv.c1, in_l, nullptr, in_l, d_a1, in_l, sv.c1, in_l, grads.bn1.weight.data(),
                 grads.bn1.bias.data(), batch, hw, relu);                                          // d c1
    Conv1::backward(x, in_l, p.conv1.data(), sv.c1, in_l, grads.conv1.data(), d_x, in_l, batch, h, w, s.col,
                    /*accumulate=*/!has_downsample);

    // The shortcut's gradient is g (already in d_x for an identity).
    if constexpr (has_downsample) {
      BNOut::backward(p.downsample.bn, sv.bnd, sv.cd, out_l, nullptr, out_l, dy, out_l, sv.cd, out_l,
                      grads.downsample.bn.weight.data(), grads.downsample.bn.bias.data(), batch, out_hw,
                      Activation::none);                                                           // d cd
      if constexpr (Stride > 1) {
        Pool::forward(x, in_l, s.a, out_l, batch, In, h, w);
        ConvDown::backward(s.a, out_l, p.downsample.conv.data(), sv.cd, out_l, grads.downsample.conv.data(), s.b,
                           out_l, batch, ho, wo, s.col);
        Pool::backward(s.b, out_l, d_x, in_l, batch, In, h, w, /*accumulate=*/true);
      } else {
        ConvDown::backward(x, in_l, p.downsample.conv.data(), sv.cd, out_l, grads.downsample.conv.data(), d_x, in_l,
                           batch, h, w, s.col, /*accumulate=*/true);
      }
    }
  }

  // y [4P, B, H/S, W/S] = block(x [In, B, H, W]), both channel-major; y must not alias x.
  // Every BatchNorm (with its ReLU, and the residual add for bn3) runs as the epilogue of its
  // convolution, on each block of pixels while it is in cache.
  static void forward(const Params& p, const float* x, float* y, int64_t batch, int h, int w, BottleneckScratch& s) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
    const Planes in_l = Planes::cnhw(batch, h, w), out_l = Planes::cnhw(batch, ho, wo);

    // Shortcut first, so that bn3's epilogue can add it.
    const float* identity = x;
    if constexpr (has_downsample) {
      const float* down_in = x;
      if constexpr (Stride > 1) {
        float* pooled = BottleneckScratch::get(s.shortcut_in, int64_t{In} * batch * out_hw);
        Pool::forward(x, in_l, pooled, out_l, batch, In, h, w);                     // [In, B, H/S, W/S]
        down_in = pooled;
      }
      float* shortcut = BottleneckScratch::get(s.shortcut, int64_t{4 * P} * batch * out_hw);
      ConvDown::forward(down_in, out_l, p.downsample.conv, shortcut, out_l, batch, ho, wo, s.col,
                        BNOut::eval_epilogue(p.downsample.bn, Activation::none));  // [4P, B, H/S, W/S]
      identity = shortcut;
    }

    float* t1 = BottleneckScratch::get(s.t1, P * batch * hw);
    float* t2 = BottleneckScratch::get(s.t2, P * batch * hw);
    Conv1::forward(x, in_l, p.conv1, t1, in_l, batch, h, w, s.col,
                   BN::eval_epilogue(p.bn1, Activation::relu));                    // [P, B, H, W]
    Conv2::forward(t1, in_l, p.conv2, t2, in_l, batch, h, w, s.col,
                   BN::eval_epilogue(p.bn2, Activation::relu));                    // [P, B, H, W]
    const float* mid = t2;
    if constexpr (Stride > 1) {
      float* pooled = BottleneckScratch::get(s.pooled, P * batch * out_hw);
      Pool::forward(t2, in_l, pooled, out_l, batch, P, h, w);                       // [P, B, H/S, W/S]
      mid = pooled;
    }
    Conv3::forward(mid, out_l, p.conv3, y, out_l, batch, ho, wo, s.col,
                   BNOut::eval_epilogue(p.bn3, Activation::relu, identity));        // [4P, B, H/S, W/S]
  }

 private:
  // conv3's input in train mode, from the saved c2: pool(relu(bn2(c2))) in b (through a when
  // strided).
  static const float* mid_input(const Params& p, const Saved& sv, int64_t batch, int h, int w, TrainScratch& s) {
    const Planes in_l = Planes::cnhw(batch, h, w);
    const int64_t hw = int64_t{h} * w;
    if constexpr (Stride > 1) {
      BN::apply_train(p.bn2, sv.bn2, sv.c2, in_l, s.a, in_l, batch, hw, Activation::relu);  // a2 [P, B, H, W]
      Pool::forward(s.a, in_l, s.b, Planes::cnhw(batch, out_size(h), out_size(w)), batch, P, h, w);
    } else {
      BN::apply_train(p.bn2, sv.bn2, sv.c2, in_l, s.b, in_l, batch, hw, Activation::relu);
    }
    return s.b;
  }
};

}  // namespace clip
