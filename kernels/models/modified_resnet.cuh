// OpenAI's ModifiedResNet image tower on the GPU; include/clip/models/modified_resnet.hpp and
// include/clip/blocks/bottleneck.hpp are the spec, step for step:
//
//   stem   3x3/s2 conv 3->w/2, BN, ReLU, 3x3 conv w/2->w/2, BN, ReLU, 3x3 conv w/2->w, BN, ReLU,
//          AvgPool2d(2)                                            [w, B, R/4, R/4]
//   layer1..layer4: bottlenecks of planes w, 2w, 4w, 8w, strides 1, 2, 2, 2
//                                                                  [32w, B, R/32, R/32]
//   attnpool: attention pooling to the embedding                  [B, E]
//
// Activations are channel-major [C, B, H, W] (1x1 convolutions are one gemm over the batch); the
// images arrive NCHW float [B, 3, R, R] on the device and the stem's first convolution reads them
// directly (Conv2d::forward_images). Composed from kernels/conv2d.cuh, batchnorm.cuh, pool.cuh
// (helper h4), linear.cuh (h1) and attention.cuh (h3) through kernels/models/attention_pool.cuh;
// weights through DeviceWeights<S> (S compute copies, fp32 BatchNorm running statistics in the
// master buffer, fp32 gradients +=). num_batches_tracked is a host Counter: forward adds 1 on the
// host for each BatchNorm that updates its running statistics.
//
// Memory: Acts takes everything from one Arena, planned once per batch capacity
// (include/clip/cuda/resnet_plan.hpp has the layout; bytes() runs it on Arena::planner()).
// Train mode keeps every convolution output before its BatchNorm and every block output (as the
// CPU TrainActs without recompute); backward recomputes the ReLU outputs a convolution read from
// them and writes each BatchNorm's input gradient over the saved convolution output it no longer
// needs (h4's BatchNorm backward allows d_x == x). `recompute` is accepted for the interface and
// ignored (everything is kept).
//
// Differences from the CPU that change bf16 results only: the downsample's BatchNorm output is
// rounded to S before bn3 adds it (the CPU fuses both); BatchNorm statistics come from the
// S-rounded convolution outputs.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/blocks/bottleneck.hpp"
#include "clip/config/dims.hpp"
#include "clip/cuda/resnet_plan.hpp"
#include "clip/models/modified_resnet.hpp"
#include "clip/ops/batchnorm.hpp"  // clip::Activation
#include "kernels/batchnorm.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/conv2d.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/models/attention_pool.cuh"
#include "kernels/models/device_weights.cuh"
#include "kernels/pool.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

template <ResNetConfig Cfg, class S>
struct CudaModifiedResNet {
  using Host = clip::ModifiedResNet<Cfg>;
  using Params = typename Host::Params;
  using D = vision_dims<Cfg>;
  using Shape = ResNetShape<Cfg>;
  using Plan = ResNetActs<Cfg, S>;
  using Weights = DeviceWeights<S>;
  static constexpr int R = D::resolution, width = D::width, half = width / 2, E = D::embed;
  static constexpr int s1 = Shape::s1, s2 = Shape::s2;

  using StemConv1 = Conv2d<3, half, 3, 2, 1, S>;
  using StemConv2 = Conv2d<half, half, 3, 1, 1, S>;
  using StemConv3 = Conv2d<half, width, 3, 1, 1, S>;
  using Pool = CudaAttentionPool<D::grid, D::pool_width, D::heads, D::embed, S>;
  static_assert(StemConv1::out_size(R) == s1, "the stem's strided convolution must halve the image");
  static_assert(std::is_same_v<typename Pool::Acts, typename Plan::PoolActs>, "the plan must hold the pool's tensors");

  // One bottleneck of the CPU's type HostBlock (Bottleneck<In, P, Stride>), on the GPU.
  template <class HostBlock>
  struct Block {
    static constexpr int In = HostBlock::in_channels, P = HostBlock::planes, Stride = HostBlock::stride;
    static constexpr bool down = HostBlock::has_downsample;
    using HostParams = typename HostBlock::Params;
    using Conv1 = Conv2d<In, P, 1, 1, 0, S>;
    using Conv2 = Conv2d<P, P, 3, 1, 1, S>;
    using Conv3 = Conv2d<P, 4 * P, 1, 1, 0, S>;
    using ConvDown = Conv2d<In, 4 * P, 1, 1, 0, S>;
    static int64_t scratch_elements(int64_t batch, int h, int w) {
      const int ho = h / Stride, wo = w / Stride;
      return std::max({Conv1::scratch_elements(batch, h, w), Conv2::scratch_elements(batch, h, w),
                       Conv3::scratch_elements(batch, ho, wo), ConvDown::scratch_elements(batch, ho, wo)});
    }
  };
  template <int St>
  using FirstBlock = Block<typename Host::template FirstBlock<St>>;
  template <int St>
  using RestBlock = Block<typename Host::template RestBlock<St>>;

  // The largest scratch any convolution asks for at `batch` images.
  static int64_t conv_scratch_elements(int64_t batch) {
    int64_t n = std::max({StemConv1::image_scratch_elements(batch, R, R), StemConv2::scratch_elements(batch, s1, s1),
                          StemConv3::scratch_elements(batch, s1, s1)});
    auto stage = [&]<int St>(std::integral_constant<int, St>) {
      const int in = Shape::in_size(St, 0), out = Shape::out_size(St);
      n = std::max(n, FirstBlock<St>::scratch_elements(batch, in, in));
      if (Shape::blocks(St) > 1) n = std::max(n, RestBlock<St>::scratch_elements(batch, out, out));
    };
    stage(std::integral_constant<int, 0>{});
    stage(std::integral_constant<int, 1>{});
    stage(std::integral_constant<int, 2>{});
    stage(std::integral_constant<int, 3>{});
    return n;
  }

  // Everything a forward (and, when `training`, backward) on up to `capacity` images touches.
  struct Acts : Plan {
    template <class A>
    Acts(A& arena, int64_t capacity, bool training, bool /*recompute: everything is kept*/ = false)
        : Plan(arena, capacity, training, conv_scratch_elements(capacity)) {}
  };

  // Bytes Acts takes from an arena (planned with Arena::planner()).
  static int64_t bytes(int64_t capacity, bool training, bool recompute = false) {
    Arena plan = Arena::planner();
    Acts acts(plan, capacity, training, recompute);
    return static_cast<int64_t>(plan.used());
  }

  // features [B, E] = encode_image(images [B, 3, R, R], float NCHW, device). training: BatchNorm
  // on batch statistics, keeping what backward needs (acts must be planned for training); the
  // running statistics (device) and num_batches_tracked (host p) are updated when
  // update_running_stats. Otherwise eval mode (running statistics), with either kind of acts.
  static void forward(Context& ctx, const Weights& dw, Params& p, Acts& a, const float* images, S* features,
                      int64_t batch, bool training, bool update_running_stats) {
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the CUDA ResNet got a batch of ", batch,
               " for activations of capacity ", a.capacity);
    CLIP_CHECK(!training || a.training, "a train-mode forward needs activations planned for training");
    a.last_batch = batch;
    a.last_training = training;
    if (batch == 0) return;
    const Mode m{training, training && update_running_stats};
    if (training) {
      CLIP_CUDA_CHECK(cudaMemcpyAsync(a.images, images, sizeof(float) * batch * 3 * R * R, cudaMemcpyDeviceToDevice,
                                      ctx.stream()));
      images = a.images;
    }
    stem_forward(ctx, dw, p, a, images, batch, m);                                           // [w, B, R/4, R/4]
    const S* x = a.stem;
    x = stage_forward<0>(ctx, dw, p.layer1, a, x, batch, m);                                 // [4w, B, R/4, R/4]
    x = stage_forward<1>(ctx, dw, p.layer2, a, x, batch, m);                                 // [8w, B, R/8, R/8]
    x = stage_forward<2>(ctx, dw, p.layer3, a, x, batch, m);                                 // [16w, B, R/16, R/16]
    x = stage_forward<3>(ctx, dw, p.layer4, a, x, batch, m);                                 // [32w, B, R/32, R/32]
    Pool::forward(ctx, dw, p.attnpool, a.pool, x, features, batch);                          // [B, E]
  }

  // Gradients += (dw.g) from d_features [B, E] and what the last train-mode forward kept (which
  // this overwrites). BatchNorm running statistics and counters are left alone.
  static void backward(Context& ctx, const Weights& dw, const Params& p, Acts& a, const S* d_features, int64_t batch) {
    CLIP_CHECK(a.training && a.last_training, "the CUDA ResNet's backward needs a train-mode forward first");
    CLIP_CHECK(batch == a.last_batch, "the CUDA ResNet's backward got a batch of ", batch,
               " but the last forward ran on ", a.last_batch);
    if (batch == 0) return;
    S* dy = a.grad_a;
    S* dx = a.grad_b;
    Pool::backward(ctx, dw, p.attnpool, a.pool, d_features, dy, batch);                     // [32w, B, R/32, R/32]
    stage_backward<3>(ctx, dw, p.layer4, a, a.stages[2].back().y, dy, dx, batch);
    stage_backward<2>(ctx, dw, p.layer3, a, a.stages[1].back().y, dy, dx, batch);
    stage_backward<1>(ctx, dw, p.layer2, a, a.stages[0].back().y, dy, dx, batch);
    stage_backward<0>(ctx, dw, p.layer1, a, a.stem, dy, dx, batch);
    stem_backward(ctx, dw, p, a, dy, batch);
  }

 private:
  struct Mode {
    bool training;  // batch statistics (else running ones)
    bool update;    // update the running statistics
  };
  static constexpr Activation relu = Activation::relu;

  // y = act(bn(x) [+ residual]): batch statistics into st (and the running ones, the host
  // counter) in train mode, running statistics in eval mode.
  template <int C>
  static void bn_forward(Context& ctx, const Weights& dw, typename clip::BatchNorm2d<C>::Params& bn,
                         BatchNormStats st, S* y, const S* x, int64_t batch, int64_t hw, Activation act,
                         const S* residual, Mode m) {
    if (m.training) {
      BatchNorm2d<C, S>::forward_train(ctx, y, st.mean, st.rstd, x, dw.w(bn.weight), dw.w(bn.bias),
                                       dw.master(bn.running_mean), dw.master(bn.running_var), batch, hw, act, residual,
                                       m.update);
      if (m.update) bn.num_batches_tracked.value += 1;
    } else {
      BatchNorm2d<C, S>::forward_eval(ctx, y, x, dw.w(bn.weight), dw.w(bn.bias), dw.master(bn.running_mean),
                                      dw.master(bn.running_var), batch, hw, act, residual);
    }
  }
  // backward's recomputation of a train-mode ReLU output relu(bn(x)) (no residual): the same
  // batch statistics again (into the spare slots, so the saved ones stay as forward made them);
  // running statistics untouched.
  template <int C>
  static void bn_recompute(Context& ctx, const Weights& dw, const typename clip::BatchNorm2d<C>::Params& bn, Acts& a,
                           S* y, const S* x, int64_t batch, int64_t hw) {
    BatchNorm2d<C, S>::forward_train(ctx, y, a.spare.mean, a.spare.rstd, x, dw.w(bn.weight), dw.w(bn.bias),
                                     dw.master(bn.running_mean), dw.master(bn.running_var), batch, hw, relu, nullptr,
                                     /*update_running_stats=*/false);
  }
  // d_x = BN'(g), g = d_y masked by the ReLU (from y, or from x when y is null); d_gamma, d_beta +=;
  // d_residual = g when not null.
  template <int C>
  static void bn_backward(Context& ctx, const Weights& dw, const typename clip::BatchNorm2d<C>::Params& bn,
                          BatchNormStats st, S* d_x, const S* d_y, const S* x, const S* y, int64_t batch, int64_t hw,
                          Activation act, S* d_residual = nullptr) {
    BatchNorm2d<C, S>::backward(ctx, d_x, dw.g(bn.weight), dw.g(bn.bias), d_y, x, y, st.mean, st.rstd,
                                dw.w(bn.weight), dw.w(bn.bias), batch, hw, act, d_residual);
  }

  // The stem, from images (float NCHW) to a.stem [w, B, R/4, R/4]; ReLU outputs pass through a.a.
  static void stem_forward(Context& ctx, const Weights& dw, Params& p, Acts& a, const float* images, int64_t batch,
                           Mode m) {
    constexpr int64_t hw1 = Shape::hw1;
    StemConv1::forward_images(ctx, a.c1, images, dw.w(p.conv1), batch, R, R, a.conv_scratch);   // [w/2, B, R/2, R/2]
    bn_forward<half>(ctx, dw, p.bn1, a.bn1, a.a, a.c1, batch, hw1, relu, nullptr, m);
    StemConv2::forward(ctx, a.c2, a.a, dw.w(p.conv2), batch, s1, s1, a.conv_scratch);            // [w/2, B, R/2, R/2]
    bn_forward<half>(ctx, dw, p.bn2, a.bn2, a.a, a.c2, batch, hw1, relu, nullptr, m);
    StemConv3::forward(ctx, a.c3, a.a, dw.w(p.conv3), batch, s1, s1, a.conv_scratch);            // [w, B, R/2, R/2]
    bn_forward<width>(ctx, dw, p.bn3, a.bn3, a.a, a.c3, batch, hw1, relu, nullptr, m);
    avg_pool_forward<2, S>(ctx, a.stem, a.a, width, batch, s1, s1);                             // [w, B, R/4, R/4]
  }

  // d stem [w, B, R/4, R/4] in dy back to the stem's weights, recomputing each ReLU output its
  // convolution read (CPU ModifiedResNet::backward's stem part).
  static void stem_backward(Context& ctx, const Weights& dw, const Params& p, Acts& a, const S* dy, int64_t batch) {
    constexpr int64_t hw1 = Shape::hw1;
    avg_pool_backward<2, S>(ctx, a.a, dy, width, batch, s1, s1);                                // d a3
    bn_backward<width>(ctx, dw, p.bn3, a.bn3, a.c3, a.a, a.c3, nullptr, batch, hw1, relu);        // d c3
    bn_recompute<half>(ctx, dw, p.bn2, a, a.a, a.c2, batch, hw1);                                // a2
    StemConv3::backward(ctx, a.b, dw.g(p.conv3), a.c3, a.a, dw.w(p.conv3), batch, s1, s1, a.conv_scratch);  // d a2
    bn_backward<half>(ctx, dw, p.bn2, a.bn2, a.c2, a.b, a.c2, nullptr, batch, hw1, relu);         // d c2
    bn_recompute<half>(ctx, dw, p.bn1, a, a.a, a.c1, batch, hw1);                                // a1
    StemConv2::backward(ctx, a.b, dw.g(p.conv2), a.c2, a.a, dw.w(p.conv2), batch, s1, s1, a.conv_scratch);  // d a1
    bn_backward<half>(ctx, dw, p.bn1, a.bn1, a.c1, a.b, a.c1, nullptr, batch, hw1, relu);         // d c1
    StemConv1::backward_images(ctx, dw.g(p.conv1), a.c1, a.images, batch, R, R, a.conv_scratch);
  }

  // conv3's input, pool(relu(bn2(c2))), in a.b (through a.a when strided). In backward
  // (`recompute`) the ReLU output is recomputed from the saved statistics' batch.
  template <class B>
  static const S* mid_input(Context& ctx, const Weights& dw, typename B::HostParams& p, Acts& a,
                            typename Plan::Block& k, int64_t batch, int h, int w, Mode m, bool recompute) {
    const int64_t hw = int64_t{h} * w;
    S* a2 = B::Stride > 1 ? a.a : a.b;
    if (recompute) bn_recompute<B::P>(ctx, dw, p.bn2, a, a2, k.c2, batch, hw);
    else bn_forward<B::P>(ctx, dw, p.bn2, k.bn2, a2, k.c2, batch, hw, relu, nullptr, m);      // a2 [P, B, H, W]
    if constexpr (B::Stride > 1) avg_pool_forward<B::Stride, S>(ctx, a.b, a.a, B::P, batch, h, w);  // [P, B, H/s, W/s]
    return a.b;
  }

  // k.y [4P, B, H/s, W/s] = block(x [In, B, H, W]) (CPU Bottleneck::forward_train / forward).
  template <class B>
  static void block_forward(Context& ctx, const Weights& dw, typename B::HostParams& p, Acts& a,
                            typename Plan::Block& k, const S* x, int64_t batch, int h, int w, Mode m) {
    const int ho = h / B::Stride, wo = w / B::Stride;
    const int64_t hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
    B::Conv1::forward(ctx, k.c1, x, dw.w(p.conv1), batch, h, w, a.conv_scratch);               // [P, B, H, W]
    bn_forward<B::P>(ctx, dw, p.bn1, k.bn1, a.a, k.c1, batch, hw, relu, nullptr, m);          // a1
    B::Conv2::forward(ctx, k.c2, a.a, dw.w(p.conv2), batch, h, w, a.conv_scratch);             // [P, B, H, W]
    const S* mid = mid_input<B>(ctx, dw, p, a, k, batch, h, w, m, /*recompute=*/false);        // [P, B, H/s, W/s]
    B::Conv3::forward(ctx, k.c3, mid, dw.w(p.conv3), batch, ho, wo, a.conv_scratch);           // [4P, B, H/s, W/s]
    if constexpr (B::down) {
      const S* down_in = x;
      if constexpr (B::Stride > 1) {
        avg_pool_forward<B::Stride, S>(ctx, a.a, x, B::In, batch, h, w);                      // [In, B, H/s, W/s]
        down_in = a.a;
      }
      B::ConvDown::forward(ctx, k.cd, down_in, dw.w(p.downsample.conv), batch, ho, wo, a.conv_scratch);
      S* shortcut = a.grad_a;  // free during forward
      bn_forward<4 * B::P>(ctx, dw, p.downsample.bn, k.bnd, shortcut, k.cd, batch, out_hw, Activation::none, nullptr, m);
      bn_forward<4 * B::P>(ctx, dw, p.bn3, k.bn3, k.y, k.c3, batch, out_hw, relu, shortcut, m);
    } else {
      bn_forward<4 * B::P>(ctx, dw, p.bn3, k.bn3, k.y, k.c3, batch, out_hw, relu, x, m);
    }
  }

  // d_x [In, B, H, W] (assigned) and gradients += from dy [4P, B, H/s, W/s] (overwritten), the
  // block input x and what forward kept (the convolution outputs are overwritten by their
  // gradients). CPU Bottleneck::backward.
  template <class B>
  static void block_backward(Context& ctx, const Weights& dw, const typename B::HostParams& p, Acts& a,
                             typename Plan::Block& k, const S* x, S* dy, S* d_x, int64_t batch, int h, int w) {
    const int ho = h / B::Stride, wo = w / B::Stride;
    const int64_t hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
    auto& mp = const_cast<typename B::HostParams&>(p);  // mid_input's recompute leaves p alone
    // g = dy * (y > 0), the residual's gradient: over dy, or (identity shortcut) starting d_x.
    S* g = B::down ? dy : d_x;
    bn_backward<4 * B::P>(ctx, dw, p.bn3, k.bn3, k.c3, dy, k.c3, k.y, batch, out_hw, relu, g);  // d c3
    const S* mid = mid_input<B>(ctx, dw, mp, a, k, batch, h, w, Mode{true, false}, /*recompute=*/true);
    B::Conv3::backward(ctx, a.a, dw.g(p.conv3), k.c3, mid, dw.w(p.conv3), batch, ho, wo, a.conv_scratch);
    S* d_a2 = a.a;
    if constexpr (B::Stride > 1) {
      avg_pool_backward<B::Stride, S>(ctx, a.b, a.a, B::P, batch, h, w);
      d_a2 = a.b;
    }
    bn_backward<B::P>(ctx, dw, p.bn2, k.bn2, k.c2, d_a2, k.c2, nullptr, batch, hw, relu);       // d c2
    S* a1 = d_a2 == a.a ? a.b : a.a;
    S* d_a1 = d_a2;
    bn_recompute<B::P>(ctx, dw, p.bn1, a, a1, k.c1, batch, hw);
    B::Conv2::backward(ctx, d_a1, dw.g(p.conv2), k.c2, a1, dw.w(p.conv2), batch, h, w, a.conv_scratch);
    bn_backward<B::P>(ctx, dw, p.bn1, k.bn1, k.c1, d_a1, k.c1, nullptr, batch, hw, relu);       // d c1
    B::Conv1::backward(ctx, d_x, dw.g(p.conv1), k.c1, x, dw.w(p.conv1), batch, h, w, a.conv_scratch,
                       /*accumulate=*/!B::down);
    if constexpr (B::down) {
      bn_backward<4 * B::P>(ctx, dw, p.downsample.bn, k.bnd, k.cd, g, k.cd, nullptr, batch, out_hw,
                            Activation::none);                                                  // d cd
      if constexpr (B::Stride > 1) {
        avg_pool_forward<B::Stride, S>(ctx, a.a, x, B::In, batch, h, w);
        B::ConvDown::backward(ctx, a.b, dw.g(p.downsample.conv), k.cd, a.a, dw.w(p.downsample.conv), batch, ho, wo,
                              a.conv_scratch);
        avg_pool_backward<B::Stride, S>(ctx, d_x, a.b, B::In, batch, h, w, /*accumulate=*/true);
      } else {
        B::ConvDown::backward(ctx, d_x, dw.g(p.downsample.conv), k.cd, x, dw.w(p.downsample.conv), batch, h, w,
                              a.conv_scratch, /*accumulate=*/true);
      }
    }
  }

  // Stage St from x; returns its output (the last block's).
  template <int St>
  static const S* stage_forward(Context& ctx, const Weights& dw, typename Host::template Stage<St>& stage, Acts& a,
                                const S* x, int64_t batch, Mode m) {
    constexpr int in = Shape::in_size(St, 0), out = Shape::out_size(St);
    auto& blocks = a.stages[St];
    block_forward<FirstBlock<St>>(ctx, dw, stage.first, a, blocks[0], x, batch, in, in, m);
    for (size_t i = 0; i < stage.rest.size(); ++i)
      block_forward<RestBlock<St>>(ctx, dw, stage.rest[i], a, blocks[i + 1], blocks[i].y, batch, out, out, m);
    return blocks.back().y;
  }

  // Backward through stage St from dy (its output's gradient), leaving its input's gradient in
  // dy (the two buffers swap per block). `input` is the stage's input.
  template <int St>
  static void stage_backward(Context& ctx, const Weights& dw, const typename Host::template Stage<St>& stage, Acts& a,
                             const S* input, S*& dy, S*& dx, int64_t batch) {
    constexpr int in = Shape::in_size(St, 0), out = Shape::out_size(St);
    auto& blocks = a.stages[St];
    for (size_t i = stage.rest.size(); i-- > 0;) {
      block_backward<RestBlock<St>>(ctx, dw, stage.rest[i], a, blocks[i + 1], blocks[i].y, dy, dx, batch, out, out);
      std::swap(dy, dx);
    }
    block_backward<FirstBlock<St>>(ctx, dw, stage.first, a, blocks[0], input, dy, dx, batch, in, in);
    std::swap(dy, dx);
  }
};

}  // namespace clip::cuda
