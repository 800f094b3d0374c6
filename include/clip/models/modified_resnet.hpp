// OpenAI's ModifiedResNet image encoder (clip/model.py), eval mode (frozen BatchNorm):
//
//   stem   3x3/s2 conv 3->w/2, BN, ReLU, 3x3 conv w/2->w/2, BN, ReLU, 3x3 conv w/2->w, BN, ReLU,
//          AvgPool2d(2)                                            [B, w, R/4, R/4]
//   layer1..layer4: bottleneck stages of planes w, 2w, 4w, 8w, strides 1, 2, 2, 2
//                                                                  [B, 32w, R/32, R/32]
//   attnpool: attention pooling to the embedding                  [B, E]
//
// Inside, activations are channel-major ([C, B, H, W]) so that every 1x1 convolution over the
// batch is one GEMM; the input images and the trace are NCHW, as in PyTorch.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/blocks/attention_pool.hpp"
#include "clip/blocks/bottleneck.hpp"
#include "clip/config/dims.hpp"
#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/pool.hpp"
#include "clip/tensor/param.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

namespace detail {
// Records a channel-major [C, B, H, W] activation as an NCHW trace tensor.
inline void record_channel_major(Trace* trace, const std::string& name, const float* data, int64_t channels,
                                 int64_t batch, int64_t h, int64_t w) {
  if (!trace) return;
  Tensor t({batch, channels, h, w});
  const int64_t hw = h * w;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t n = 0; n < batch; ++n)
      std::copy_n(data + (c * batch + n) * hw, hw, t.data() + (n * channels + c) * hw);
  (*trace)[name] = std::move(t);
}
}  // namespace detail

template <ResNetConfig Cfg>
struct ModifiedResNet {
  using D = vision_dims<Cfg>;
  // Activation memory per image (the ping-pong buffers; convolution scratch not counted).
  static constexpr int64_t inference_floats_per_sample = D::inference_floats_per_sample;
  static constexpr int resolution = D::resolution;  // R
  static constexpr int width = D::width;            // w
  static constexpr int half = width / 2;
  static constexpr int embed = D::embed;            // E

  // Spatial size at each point: the stem halves twice, stages 2..4 halve once each.
  static constexpr int stem_conv_size = resolution / 2;
  static constexpr int stage_size(int stage) { return (resolution / 4) >> (stage == 0 ? 0 : stage - 1); }  // input
  static constexpr int stage_out_size(int stage) { return (resolution / 4) >> stage; }

  using StemConv1 = Conv2d<3, half, 3, 2, 1>;
  using StemConv2 = Conv2d<half, half, 3, 1, 1>;
  using StemConv3 = Conv2d<half, width, 3, 1, 1>;
  using StemBN1 = BatchNorm2d<half>;
  using StemBN3 = BatchNorm2d<width>;
  using StemPool = AvgPool2d<2>;
  static_assert(StemConv1::out_size(resolution) == stem_conv_size, "the stem's strided convolution must halve the image");

  // The first block of a stage changes channels (and strides); the others keep 4 * planes.
  template <int S>
  using FirstBlock = Bottleneck<D::stage_in(S), D::planes(S), S == 0 ? 1 : 2>;
  template <int S>
  using RestBlock = Bottleneck<4 * D::planes(S), D::planes(S), 1>;
  using Pool = AttentionPool2d<D::grid, D::pool_width, D::heads, D::embed>;
  static_assert(((resolution / 4) >> 3) == D::grid, "the last stage must end on the attention pool's grid");

  template <int S>
  struct Stage {
    typename FirstBlock<S>::Params first;
    std::array<typename RestBlock<S>::Params, D::layers[S] - 1> rest;

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      first.visit(f, prefix + "0.");
      for (size_t i = 0; i < rest.size(); ++i) rest[i].visit(f, prefix + std::to_string(i + 1) + ".");
    }
  };

  struct Params {
    typename StemConv1::Weight conv1;
    typename StemBN1::Params bn1;
    typename StemConv2::Weight conv2;
    typename StemBN1::Params bn2;
    typename StemConv3::Weight conv3;
    typename StemBN3::Params bn3;
    Stage<0> layer1;
    Stage<1> layer2;
    Stage<2> layer3;
    Stage<3> layer4;
    typename Pool::Params attnpool;

    // OpenAI's names under `prefix` (the CLIP model passes "visual.").
    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "conv1.weight", conv1, Role::parameter);
      bn1.visit(f, prefix + "bn1.");
      f(prefix + "conv2.weight", conv2, Role::parameter);
      bn2.visit(f, prefix + "bn2.");
      f(prefix + "conv3.weight", conv3, Role::parameter);
      bn3.visit(f, prefix + "bn3.");
      layer1.visit(f, prefix + "layer1.");
      layer2.visit(f, prefix + "layer2.");
      layer3.visit(f, prefix + "layer3.");
      layer4.visit(f, prefix + "layer4.");
      attnpool.visit(f, prefix + "attnpool.");
    }
  };

  // Buffers reused across calls: two activations that the stages ping-pong between, the blocks'
  // scratch and the pool's.
  struct Workspace {
    std::vector<float> a, b, pool;
    BottleneckScratch blocks;
  };

  // features [B, E] = encode_image(images [B, 3, R, R], NCHW). Records "visual.stem",
  // "visual.layer1".."visual.layer4" (NCHW) and "visual.attnpool" into `trace` when given.
  // Uses a per-thread workspace that keeps its memory between calls.
  static void forward(const Params& p, const float* images, float* features, int64_t batch, Trace* trace = nullptr) {
    thread_local Workspace ws;
    forward(p, images, features, batch, ws, trace);
  }

  static void forward(const Params& p, const float* images, float* features, int64_t batch, Workspace& ws,
                      Trace* trace = nullptr) {
    CLIP_CHECK(batch > 0, "ModifiedResNet::forward needs a positive batch, got ", batch);
    constexpr int s1 = stem_conv_size, s2 = resolution / 4;
    constexpr int64_t largest = std::max<int64_t>(int64_t{width} * s1 * s1, largest_stage_activation());
    float* a = BottleneckScratch::get(ws.a, largest * batch);
    float* b = BottleneckScratch::get(ws.b, largest * batch);
    std::vector<float>& col = ws.blocks.col;

    const Planes conv_l = Planes::cnhw(batch, s1, s1);
    StemConv1::forward(images, Planes::nchw(3, resolution, resolution), p.conv1, a, conv_l, batch, resolution,
                       resolution, col, StemBN1::eval_epilogue(p.bn1, Activation::relu));  // [w/2, B, R/2, R/2]
    StemConv2::forward(a, conv_l, p.conv2, b, conv_l, batch, s1, s1, col,
                       StemBN1::eval_epilogue(p.bn2, Activation::relu));                   // [w/2, B, R/2, R/2]
    StemConv3::forward(b, conv_l, p.conv3, a, conv_l, batch, s1, s1, col,
                       StemBN3::eval_epilogue(p.bn3, Activation::relu));                   // [w, B, R/2, R/2]
    StemPool::forward(a, conv_l, b, Planes::cnhw(batch, s2, s2), batch, width, s1, s1);       // [w, B, R/4, R/4]
    detail::record_channel_major(trace, "visual.stem", b, width, batch, s2, s2);

    float* cur = b;
    float* other = a;
    run_stage<0>(p.layer1, cur, other, batch, ws, trace, "visual.layer1");
    run_stage<1>(p.layer2, cur, other, batch, ws, trace, "visual.layer2");
    run_stage<2>(p.layer3, cur, other, batch, ws, trace, "visual.layer3");
    run_stage<3>(p.layer4, cur, other, batch, ws, trace, "visual.layer4");

    Pool::forward(p.attnpool, cur, Planes::cnhw(batch, D::grid, D::grid), features, batch, ws.pool);  // [B, E]
    record(trace, "visual.attnpool", {batch, embed}, features);
  }

 private:
  static constexpr int64_t largest_stage_activation() {
    int64_t n = 0;
    for (int s = 0; s < 4; ++s)
      n = std::max(n, int64_t{4} * D::planes(s) * stage_out_size(s) * stage_out_size(s));
    return n;
  }

  // Runs stage S from *cur, leaving its output in *cur (the two buffers swap per block).
  template <int S>
  static void run_stage(const Stage<S>& stage, float*& cur, float*& other, int64_t batch, Workspace& ws, Trace* trace,
                        const char* name) {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    FirstBlock<S>::forward(stage.first, cur, other, batch, in, in, ws.blocks);
    std::swap(cur, other);
    for (const auto& block : stage.rest) {
      RestBlock<S>::forward(block, cur, other, batch, out, out, ws.blocks);
      std::swap(cur, other);
    }
    detail::record_channel_major(trace, name, cur, 4 * D::planes(S), batch, out, out);
  }
};

}  // namespace clip
