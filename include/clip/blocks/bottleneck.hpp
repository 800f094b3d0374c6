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
#pragma once

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
};

}  // namespace clip
