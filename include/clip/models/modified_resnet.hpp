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
//
// Training (forward_train, backward): BatchNorm normalises with batch statistics and updates its
// running ones. TrainActs holds, for up to `capacity` images, the inputs, every convolution's
// output before its BatchNorm (unless recomputing), every block output and the attention pool's
// tensors; ReLU outputs are recomputed from them during backward. Its two scratch areas and two
// gradient buffers are reused by every block, so nothing is allocated during a step (the
// convolutions' scratch grows once, on the first). Training's 3x3 convolutions run Winograd
// F(2x2, 3x3) (ops/conv2d.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

  // Everything backward reads, for up to `capacity` images, allocated once and reused by every
  // step. With `recompute` (activation checkpointing) only the images, the block outputs and
  // the attention pool's tensors are kept: backward re-runs the stem and each block's train
  // forward (running statistics untouched) into one shared area just before its backward, for
  // about half the memory and one more forward pass of the convolutions.
  class TrainActs {
   public:
    explicit TrainActs(int64_t capacity, bool recompute = false) : capacity(capacity), recompute_(recompute) {
      CLIP_CHECK(capacity > 0, "ModifiedResNet::TrainActs needs a positive capacity, got ", capacity);
      const int64_t n = capacity * floats_per_sample(recompute);
      storage_ = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(n));
      // Touch every page now, so that the first step is not the one paying for it.
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; i += 1024) std::fill_n(storage_.get() + i, std::min<int64_t>(1024, n - i), 0.0f);
#ifdef _OPENMP
      scratch_.stats.resize(BatchNorm2d<D::pool_width>::statistics_size(omp_get_max_threads()));
#endif
    }

    // Floats per image: the kept activations, two scratch areas and two gradient buffers. Not
    // counted: the convolutions' scratch, which does not grow with the batch (RN50: ~70 MB,
    // mostly the Winograd transforms of layer4's 512 x 512 kernels).
    static constexpr int64_t floats_per_sample(bool recompute = false) {
      const int64_t convolutions = recompute ? shared_convolution_floats() : all_convolution_floats();
      return 3 * int64_t{resolution} * resolution + output_floats_per_sample() + convolutions +
             Pool::train_floats_per_sample + 2 * scratch_floats_per_sample() + 2 * gradient_floats_per_sample();
    }

    int64_t capacity;

   private:
    friend struct ModifiedResNet;
    template <int S>
    struct StageSaved {
      typename FirstBlock<S>::Saved first;
      std::array<typename RestBlock<S>::Saved, D::layers[S] - 1> rest;
      const float* last_output() const { return rest.empty() ? first.y : rest.back().y; }
    };

    bool recompute_;
    std::unique_ptr<float[]> storage_;
    int64_t batch_ = 0;  // of the last forward_train
    float* images_ = nullptr;  // [B, 3, R, R]
    float* c1_ = nullptr;      // [w/2, B, R/2, R/2]  stem convolutions before BatchNorm
    float* c2_ = nullptr;      // [w/2, B, R/2, R/2]
    float* c3_ = nullptr;      // [w, B, R/2, R/2]
    float* stem_ = nullptr;    // [w, B, R/4, R/4]    stem output
    typename StemBN1::Saved bn1_, bn2_;
    typename StemBN3::Saved bn3_;
    StageSaved<0> layer1_;
    StageSaved<1> layer2_;
    StageSaved<2> layer3_;
    StageSaved<3> layer4_;
    float* pool_ = nullptr;    // AttentionPool2d::train_floats_per_sample per image
    float* grad_a_ = nullptr;  // gradient ping-pong, gradient_floats_per_sample per image each
    float* grad_b_ = nullptr;
    TrainScratch scratch_;

    // Points everything at the storage for `batch` images.
    void place(int64_t batch) {
      CLIP_CHECK(batch > 0 && batch <= capacity, "ModifiedResNet::forward_train got a batch of ", batch,
                 " for activations of capacity ", capacity);
      batch_ = batch;
      constexpr int s2 = resolution / 4;
      float* at = storage_.get();
      auto take = [&](int64_t per_sample) {
        float* p = at;
        at += per_sample * batch;
        return p;
      };
      images_ = take(3 * int64_t{resolution} * resolution);
      stem_ = take(int64_t{width} * s2 * s2);
      at = place_outputs<0>(layer1_, at, batch);
      at = place_outputs<1>(layer2_, at, batch);
      at = place_outputs<2>(layer3_, at, batch);
      at = place_outputs<3>(layer4_, at, batch);
      // The convolution outputs: each after the previous, or (recompute) all in one shared area.
      float* const shared = at;
      float* end = place_stem_convolutions(shared, batch);
      float* top = end;
      auto start = [&] { return recompute_ ? shared : end; };
      top = std::max(top, end = place_convolutions<0>(layer1_, start(), batch));
      top = std::max(top, end = place_convolutions<1>(layer2_, start(), batch));
      top = std::max(top, end = place_convolutions<2>(layer3_, start(), batch));
      top = std::max(top, end = place_convolutions<3>(layer4_, start(), batch));
      at = top;
      pool_ = take(Pool::train_floats_per_sample);
      scratch_.a = take(scratch_floats_per_sample());
      scratch_.b = take(scratch_floats_per_sample());
      grad_a_ = take(gradient_floats_per_sample());
      grad_b_ = take(gradient_floats_per_sample());
    }

    float* place_stem_convolutions(float* at, int64_t batch) {
      constexpr int64_t s1 = stem_conv_size;
      c1_ = at;
      c2_ = c1_ + half * s1 * s1 * batch;
      c3_ = c2_ + half * s1 * s1 * batch;
      return c3_ + width * s1 * s1 * batch;
    }
    template <int S>
    static float* place_outputs(StageSaved<S>& st, float* at, int64_t batch) {
      constexpr int in = stage_size(S), out = stage_out_size(S);
      at = st.first.place_output(at, batch, in, in);
      for (auto& block : st.rest) at = block.place_output(at, batch, out, out);
      return at;
    }
    // Each block's convolution outputs after the previous one's, or (recompute) all at `at`.
    template <int S>
    float* place_convolutions(StageSaved<S>& st, float* at, int64_t batch) const {
      constexpr int in = stage_size(S), out = stage_out_size(S);
      float* end = st.first.place_convolutions(at, batch, in, in);
      for (auto& block : st.rest) {
        float* e = block.place_convolutions(recompute_ ? at : end, batch, out, out);
        end = recompute_ ? std::max(end, e) : e;
      }
      return end;
    }
  };

  // Train-mode forward: features [B, E] = encode_image(images [B, 3, R, R], NCHW), BatchNorm on
  // batch statistics, keeping in `a` what backward needs. Running statistics and
  // num_batches_tracked are updated unless update_running_stats is false. Records the same trace
  // tensors as forward when `trace` is given.
  static void forward_train(Params& p, TrainActs& a, const float* images, float* features, int64_t batch,
                            bool update_running_stats = true, Trace* trace = nullptr) {
    a.place(batch);
    constexpr int s2 = resolution / 4;
    TrainScratch& s = a.scratch_;
    const bool update = update_running_stats;

    std::copy_n(images, batch * 3 * resolution * resolution, a.images_);
    stem_train(p, a, batch, update);                                                                 // [w, B, R/4, R/4]
    detail::record_channel_major(trace, "visual.stem", a.stem_, width, batch, s2, s2);
    const float* x = a.stem_;
    x = train_stage<0>(p.layer1, a.layer1_, x, batch, s, update, trace, "visual.layer1");
    x = train_stage<1>(p.layer2, a.layer2_, x, batch, s, update, trace, "visual.layer2");
    x = train_stage<2>(p.layer3, a.layer3_, x, batch, s, update, trace, "visual.layer3");
    x = train_stage<3>(p.layer4, a.layer4_, x, batch, s, update, trace, "visual.layer4");
    Pool::forward_train(p.attnpool, x, Planes::cnhw(batch, D::grid, D::grid), features, batch, a.pool_);  // [B, E]
    record(trace, "visual.attnpool", {batch, embed}, features);
  }

  // grads += d loss / d params from d_features [B, E] and what forward_train saved in `a` (which
  // this overwrites). BatchNorm buffers in grads are left alone.
  static void backward(const Params& p, TrainActs& a, const float* d_features, Params& grads, int64_t batch) {
    CLIP_CHECK(batch == a.batch_, "ModifiedResNet::backward got a batch of ", batch,
               " but the last forward_train ran on ", a.batch_);
    constexpr int s1 = stem_conv_size, s2 = resolution / 4;
    TrainScratch& s = a.scratch_;
    const Planes conv_l = Planes::cnhw(batch, s1, s1), stem_l = Planes::cnhw(batch, s2, s2);
    const int64_t hw1 = int64_t{s1} * s1;
    const Activation relu = Activation::relu;

    float* dy = a.grad_a_;
    float* dx = a.grad_b_;
    Pool::backward(p.attnpool, a.pool_, d_features, dy, Planes::cnhw(batch, D::grid, D::grid), grads.attnpool,
                   batch);                                                                     // [32w, B, R/32, R/32]
    backward_stage<3>(p.layer4, a.layer4_, a.layer3_.last_output(), grads.layer4, dy, dx, batch, a);
    backward_stage<2>(p.layer3, a.layer3_, a.layer2_.last_output(), grads.layer3, dy, dx, batch, a);
    backward_stage<1>(p.layer2, a.layer2_, a.layer1_.last_output(), grads.layer2, dy, dx, batch, a);
    backward_stage<0>(p.layer1, a.layer1_, a.stem_, grads.layer1, dy, dx, batch, a);

    // The stem, from d stem [w, B, R/4, R/4], recomputing each ReLU output its convolution read.
    // Recomputing the stem's forward would rewrite its output with the same values; it goes to
    // dx, free now.
    if (a.recompute_) {
      float* kept = a.stem_;
      a.stem_ = dx;
      stem_train(const_cast<Params&>(p), a, batch, /*update_running_stats=*/false);
      a.stem_ = kept;
    }
    StemPool::backward(dy, stem_l, s.a, conv_l, batch, width, s1, s1);                              // d a3
    StemBN3::backward(p.bn3, a.bn3_, a.c3_, conv_l, nullptr, conv_l, s.a, conv_l, a.c3_, conv_l,
                      grads.bn3.weight.data(), grads.bn3.bias.data(), batch, hw1, relu);            // d c3
    StemBN1::apply_train(p.bn2, a.bn2_, a.c2_, conv_l, s.a, conv_l, batch, hw1, relu);              // a2
    StemConv3::backward(s.a, conv_l, p.conv3.data(), a.c3_, conv_l, grads.conv3.data(), s.b, conv_l, batch, s1, s1,
                        s.col);                                                                     // d a2
    StemBN1::backward(p.bn2, a.bn2_, a.c2_, conv_l, nullptr, conv_l, s.b, conv_l, a.c2_, conv_l,
                      grads.bn2.weight.data(), grads.bn2.bias.data(), batch, hw1, relu);            // d c2
    StemBN1::apply_train(p.bn1, a.bn1_, a.c1_, conv_l, s.a, conv_l, batch, hw1, relu);              // a1
    StemConv2::backward(s.a, conv_l, p.conv2.data(), a.c2_, conv_l, grads.conv2.data(), s.b, conv_l, batch, s1, s1,
                        s.col);                                                                     // d a1
    StemBN1::backward(p.bn1, a.bn1_, a.c1_, conv_l, nullptr, conv_l, s.b, conv_l, a.c1_, conv_l,
                      grads.bn1.weight.data(), grads.bn1.bias.data(), batch, hw1, relu);            // d c1
    StemConv1::backward(a.images_, Planes::nchw(3, resolution, resolution), p.conv1.data(), a.c1_, conv_l,
                        grads.conv1.data(), nullptr, conv_l, batch, resolution, resolution, s.col);
  }

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
  // TrainActs' sizes per image.
  template <int S>
  static constexpr int64_t stage_output_floats() {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    return FirstBlock<S>::output_floats_per_sample(in, in) +
           (D::layers[S] - 1) * RestBlock<S>::output_floats_per_sample(out, out);
  }
  template <int S>
  static constexpr int64_t stage_convolution_floats() {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    return FirstBlock<S>::convolution_floats_per_sample(in, in) +
           (D::layers[S] - 1) * RestBlock<S>::convolution_floats_per_sample(out, out);
  }
  // The largest single block's (or the stem's) convolution outputs: recompute's shared area.
  template <int S>
  static constexpr int64_t block_convolution_floats() {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    return std::max(FirstBlock<S>::convolution_floats_per_sample(in, in),
                    RestBlock<S>::convolution_floats_per_sample(out, out));
  }
  static constexpr int64_t stem_convolution_floats() {
    return (2 * int64_t{half} + width) * stem_conv_size * stem_conv_size;
  }
  // The stem's output and every block's.
  static constexpr int64_t output_floats_per_sample() {
    constexpr int64_t s2 = resolution / 4;
    return width * s2 * s2 + stage_output_floats<0>() + stage_output_floats<1>() + stage_output_floats<2>() +
           stage_output_floats<3>();
  }
  static constexpr int64_t all_convolution_floats() {
    return stem_convolution_floats() + stage_convolution_floats<0>() + stage_convolution_floats<1>() +
           stage_convolution_floats<2>() + stage_convolution_floats<3>();
  }
  static constexpr int64_t shared_convolution_floats() {
    return std::max({stem_convolution_floats(), block_convolution_floats<0>(), block_convolution_floats<1>(),
                     block_convolution_floats<2>(), block_convolution_floats<3>()});
  }
  template <int S>
  static constexpr int64_t stage_scratch_floats() {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    return std::max(FirstBlock<S>::scratch_floats_per_sample(in, in), RestBlock<S>::scratch_floats_per_sample(out, out));
  }
  // The stem's backward holds d a3 [w, R/2, R/2] in one area.
  static constexpr int64_t scratch_floats_per_sample() {
    constexpr int64_t s1 = stem_conv_size;
    return std::max({int64_t{width} * s1 * s1, stage_scratch_floats<0>(), stage_scratch_floats<1>(),
                     stage_scratch_floats<2>(), stage_scratch_floats<3>()});
  }
  // The largest block input or output.
  static constexpr int64_t gradient_floats_per_sample() {
    constexpr int64_t s2 = resolution / 4;
    return std::max(int64_t{width} * s2 * s2, largest_stage_activation());
  }

  // The stem in train mode, from a.images_ to a.stem_.
  static void stem_train(Params& p, TrainActs& a, int64_t batch, bool update) {
    constexpr int s1 = stem_conv_size, s2 = resolution / 4;
    TrainScratch& s = a.scratch_;
    const Planes conv_l = Planes::cnhw(batch, s1, s1);
    const int64_t hw1 = int64_t{s1} * s1;
    detail::conv_statistics<StemConv1, StemBN1>(p.bn1, a.bn1_, a.images_, Planes::nchw(3, resolution, resolution),
                                                p.conv1, a.c1_, conv_l, batch, resolution, resolution, s, update);
    StemBN1::apply_train(p.bn1, a.bn1_, a.c1_, conv_l, s.a, conv_l, batch, hw1, Activation::relu);  // [w/2, B, R/2, R/2]
    detail::conv_statistics<StemConv2, StemBN1>(p.bn2, a.bn2_, s.a, conv_l, p.conv2, a.c2_, conv_l, batch, s1, s1, s,
                                                update);
    StemBN1::apply_train(p.bn2, a.bn2_, a.c2_, conv_l, s.a, conv_l, batch, hw1, Activation::relu);  // [w/2, B, R/2, R/2]
    detail::conv_statistics<StemConv3, StemBN3>(p.bn3, a.bn3_, s.a, conv_l, p.conv3, a.c3_, conv_l, batch, s1, s1, s,
                                                update);
    StemBN3::apply_train(p.bn3, a.bn3_, a.c3_, conv_l, s.a, conv_l, batch, hw1, Activation::relu);  // [w, B, R/2, R/2]
    StemPool::forward(s.a, conv_l, a.stem_, Planes::cnhw(batch, s2, s2), batch, width, s1, s1);      // [w, B, R/4, R/4]
  }

  // Runs stage S in train mode from x; returns its output (the last block's saved output).
  template <int S>
  static const float* train_stage(Stage<S>& stage, typename TrainActs::template StageSaved<S>& saved, const float* x,
                                  int64_t batch, TrainScratch& s, bool update, Trace* trace, const char* name) {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    FirstBlock<S>::forward_train(stage.first, x, saved.first, batch, in, in, s, update);
    x = saved.first.y;
    for (size_t i = 0; i < stage.rest.size(); ++i) {
      RestBlock<S>::forward_train(stage.rest[i], x, saved.rest[i], batch, out, out, s, update);
      x = saved.rest[i].y;
    }
    detail::record_channel_major(trace, name, x, 4 * D::planes(S), batch, out, out);
    return x;
  }

  // Backward through stage S from dy (its output's gradient), leaving its input's gradient in
  // dy (the two buffers swap per block). `input` is the stage's input.
  template <int S>
  static void backward_stage(const Stage<S>& stage, typename TrainActs::template StageSaved<S>& saved,
                             const float* input, Stage<S>& grads, float*& dy, float*& dx, int64_t batch,
                             TrainActs& a) {
    constexpr int in = stage_size(S), out = stage_out_size(S);
    for (size_t i = stage.rest.size(); i-- > 0;) {
      const float* x = i == 0 ? saved.first.y : saved.rest[i - 1].y;
      recompute<RestBlock<S>>(stage.rest[i], x, saved.rest[i], dx, batch, out, a);
      RestBlock<S>::backward(stage.rest[i], x, saved.rest[i], dy, dx, grads.rest[i], batch, out, out, a.scratch_);
      std::swap(dy, dx);
    }
    recompute<FirstBlock<S>>(stage.first, input, saved.first, dx, batch, in, a);
    FirstBlock<S>::backward(stage.first, input, saved.first, dy, dx, grads.first, batch, in, in, a.scratch_);
    std::swap(dy, dx);
  }

  // With TrainActs' recompute: the block's train forward again, from its kept input, refilling
  // its convolution outputs. Its output (the same values) goes to `spare`, the gradient buffer
  // the block's backward has not written yet, so the kept one stays as the next block read it.
  // Running statistics are left alone, so nothing in p changes.
  template <class Block>
  static void recompute(const typename Block::Params& p, const float* x, typename Block::Saved& saved, float* spare,
                        int64_t batch, int size, TrainActs& a) {
    if (!a.recompute_) return;
    float* kept = saved.y;
    saved.y = spare;
    Block::forward_train(const_cast<typename Block::Params&>(p), x, saved, batch, size, size, a.scratch_,
                         /*update_running_stats=*/false);
    saved.y = kept;
  }

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
