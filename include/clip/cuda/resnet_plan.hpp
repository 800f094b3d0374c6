// Where the CUDA ModifiedResNet's activations lie (kernels/models/modified_resnet.cuh), planned on
// the host so that g++ can test it (tests/test_cuda_host_resnet_plan.cpp). No CUDA headers.
//
// Everything is taken, once per batch capacity, from an arena: any object with
// `template <class T> T* take(int64_t n)` (kernels/device_buffer.cuh's Arena, its planner, or a
// host test's recorder). Buffers hold `capacity` images; a step on fewer images uses the front
// of each. Layout is channel-major [C, B, H, W] as the CPU ModifiedResNet.
//
// Both modes run the same forward code (conv -> BatchNorm [-> ReLU] -> ...); only where the
// tensors lie differs:
//   training: the images, every convolution's output before its BatchNorm (c1, c2, c3, cd), every
//     block output (y) and the attention pool's tensors are kept for backward, as the CPU's
//     TrainActs (without recompute); plus two scratch areas (a, b), two gradient buffers (the
//     forward's shortcut goes to grad_a, free then) and the BatchNorm batch statistics.
//   eval: the convolution outputs of every block share one area (c1, c2, c3 die at their
//     BatchNorm), the downsample's one more (it lives until bn3 adds it), and the block outputs
//     ping-pong between two areas (y0, y1) while the shortcut uses grad_a.
// S is the storage type (float or bf16; only its size matters here). Statistics are float.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"

namespace clip::cuda {

// A train-mode BatchNorm's batch statistics, [C] floats each (null in eval mode).
struct BatchNormStats {
  float* mean = nullptr;
  float* rstd = nullptr;
};

// The attention pool's tensors for up to `capacity` images (T = Grid^2 + 1 tokens).
template <int Grid, int C, int Heads, int E, class S>
struct AttentionPoolActs {
  static constexpr int tokens = Grid * Grid + 1;  // T
  // forward
  S* tok = nullptr;     // [B, T, C]  mean token then the pixels, plus the positional embedding
  S* keys = nullptr;    // [B, T, C]
  S* values = nullptr;  // [B, T, C]
  S* means = nullptr;   // [B, C]     token 0 (q_proj's input)
  S* query = nullptr;   // [B, C]
  S* pooled = nullptr;  // [B, C]     attention output (c_proj's input)
  // training
  float* lse = nullptr;     // [B, H]  logsumexp per head, for attention_backward
  S* d_pooled = nullptr;    // [B, C]
  S* d_query = nullptr;     // [B, C]
  S* d_keys = nullptr;      // [B, T, C]
  S* d_values = nullptr;    // [B, T, C]
  float* d_tok = nullptr;   // [B, T, C]  three projections' input gradients summed in fp32
  float* scratch = nullptr; // [B, H]  attention_backward's

  AttentionPoolActs() = default;
  template <class Arena>
  AttentionPoolActs(Arena& arena, int64_t capacity, bool training) {
    const int64_t b = capacity, bt = capacity * tokens;
    tok = arena.template take<S>(bt * C);
    keys = arena.template take<S>(bt * C);
    values = arena.template take<S>(bt * C);
    means = arena.template take<S>(b * C);
    query = arena.template take<S>(b * C);
    pooled = arena.template take<S>(b * C);
    if (!training) return;
    lse = arena.template take<float>(b * Heads);
    d_pooled = arena.template take<S>(b * C);
    d_query = arena.template take<S>(b * C);
    d_keys = arena.template take<S>(bt * C);
    d_values = arena.template take<S>(bt * C);
    d_tok = arena.template take<float>(bt * C);
    scratch = arena.template take<float>(b * Heads);
  }
  // Elements per image (S, then float) of what the constructor takes.
  static constexpr int64_t storage_per_sample(bool training) {
    return 3 * int64_t{tokens} * C + 3 * int64_t{C} + (training ? 2 * int64_t{tokens} * C + 2 * int64_t{C} : 0);
  }
  static constexpr int64_t floats_per_sample(bool training) {
    return training ? int64_t{tokens} * C + 2 * int64_t{Heads} : 0;
  }
};

// Sizes of the ModifiedResNet<Cfg> on the GPU (per image unless said otherwise).
template <ResNetConfig Cfg>
struct ResNetShape {
  using D = vision_dims<Cfg>;
  static constexpr int resolution = D::resolution;  // R
  static constexpr int width = D::width;            // w
  static constexpr int half = width / 2;
  static constexpr int s1 = resolution / 2;  // the stem's convolutions
  static constexpr int s2 = resolution / 4;  // the stem's output, layer1
  static constexpr int64_t hw1 = int64_t{s1} * s1, hw2 = int64_t{s2} * s2;
  static constexpr int blocks(int stage) { return D::layers[stage]; }
  // Block `b` of stage `s`: its input channels, planes P, stride, and spatial sizes.
  static constexpr int in_channels(int s, int b) { return b == 0 ? D::stage_in(s) : 4 * D::planes(s); }
  static constexpr int planes(int s) { return D::planes(s); }
  static constexpr int stride(int s, int b) { return s > 0 && b == 0 ? 2 : 1; }
  static constexpr bool downsample(int s, int b) { return b == 0; }  // every first block (channels or stride change)
  static constexpr int in_size(int s, int b) { return b == 0 ? (resolution / 4) >> (s == 0 ? 0 : s - 1) : out_size(s); }
  static constexpr int out_size(int s) { return (resolution / 4) >> s; }
  static constexpr int64_t mid(int s, int b) { return int64_t{planes(s)} * in_size(s, b) * in_size(s, b); }  // P*H*W
  static constexpr int64_t out(int s) { return int64_t{4} * planes(s) * out_size(s) * out_size(s); }         // 4P*Ho*Wo
  static constexpr int64_t pooled_in(int s, int b) {                                                          // In*Ho*Wo
    return int64_t{in_channels(s, b)} * out_size(s) * out_size(s);
  }

  template <class F>
  static constexpr void for_each_block(F&& f) {
    for (int s = 0; s < 4; ++s)
      for (int b = 0; b < blocks(s); ++b) f(s, b);
  }
  // The largest block output or stem output: gradients, shortcut, eval's ping-pong.
  static constexpr int64_t largest_activation() {
    int64_t n = int64_t{width} * hw2;
    for (int s = 0; s < 4; ++s) n = std::max(n, out(s));
    return n;
  }
  // Scratch areas a and b: a mid-block activation, a pooled block input, or the stem's widest.
  static constexpr int64_t scratch() {
    int64_t n = int64_t{width} * hw1;
    for_each_block([&](int s, int b) { n = std::max({n, mid(s, b), pooled_in(s, b)}); });
    return n;
  }
  // Eval's shared convolution output area (c1, c2, c3 of any block, or of the stem).
  static constexpr int64_t shared_convolution() {
    int64_t n = int64_t{width} * hw1;
    for_each_block([&](int s, int b) { n = std::max({n, mid(s, b), out(s)}); });
    return n;
  }
  // Training: every convolution's output kept.
  static constexpr int64_t all_convolutions() {
    int64_t n = (2 * int64_t{half} + width) * hw1;
    for_each_block([&](int s, int b) { n += 2 * mid(s, b) + (downsample(s, b) ? 2 : 1) * out(s); });
    return n;
  }
  static constexpr int64_t all_outputs() {
    int64_t n = int64_t{width} * hw2;
    for_each_block([&](int s, int b) { n += out(s); });
    return n;
  }
  static constexpr int widest_batchnorm() { return 4 * planes(3); }
  // Floats of train-mode BatchNorm statistics (mean and rstd per channel; not per image).
  static constexpr int64_t statistics_floats() {
    int64_t n = 2 * (2 * int64_t{half} + width);
    for_each_block([&](int s, int b) { n += 2 * (2 * int64_t{planes(s)} + (downsample(s, b) ? 2 : 1) * 4 * planes(s)); });
    return n;
  }
};

template <ResNetConfig Cfg, class S>
struct ResNetActs {
  using Shape = ResNetShape<Cfg>;
  using D = vision_dims<Cfg>;
  using PoolActs = AttentionPoolActs<D::grid, D::pool_width, D::heads, D::embed, S>;

  // One bottleneck: convolution outputs before their BatchNorm, the output, the statistics.
  struct Block {
    S* c1 = nullptr;  // [P, B, H, W]
    S* c2 = nullptr;  // [P, B, H, W]
    S* c3 = nullptr;  // [4P, B, H/s, W/s]
    S* cd = nullptr;  // [4P, B, H/s, W/s]  the downsample's (first block of a stage only)
    S* y = nullptr;   // [4P, B, H/s, W/s]
    BatchNormStats bn1, bn2, bn3, bnd;
  };

  int64_t capacity = 0;
  bool training = false;
  float* images = nullptr;  // [B, 3, R, R]  training: a copy of the NCHW input (the stem's first
                            // convolution reads it directly; its backward reads the copy)
  S* c1 = nullptr;      // [w/2, B, R/2, R/2]
  S* c2 = nullptr;      // [w/2, B, R/2, R/2]
  S* c3 = nullptr;      // [w, B, R/2, R/2]
  S* stem = nullptr;    // [w, B, R/4, R/4]
  BatchNormStats bn1, bn2, bn3;
  std::array<std::vector<Block>, 4> stages;
  S* a = nullptr;       // scratch, Shape::scratch() per image
  S* b = nullptr;
  S* grad_a = nullptr;  // Shape::largest_activation() per image; the forward's shortcut
  S* grad_b = nullptr;  // training only
  S* conv_scratch = nullptr;  // the convolutions' (im2col), conv_scratch_elements in all
  int64_t conv_scratch_elements = 0;
  PoolActs pool;
  BatchNormStats spare;     // training: [32w] each, where backward's recomputed BatchNorms put statistics
  int64_t last_batch = 0;   // of the last forward (backward checks it)
  bool last_training = false;

  ResNetActs() = default;
  // conv_scratch_elements: the most any convolution asks for at `capacity` images
  // (Conv2d::scratch_elements; the .cuh computes it).
  template <class Arena>
  ResNetActs(Arena& arena, int64_t capacity, bool training, int64_t conv_scratch_elements)
      : capacity(capacity), training(training), conv_scratch_elements(conv_scratch_elements) {
    CLIP_CHECK(capacity >= 0, "the CUDA ResNet's activations need a capacity of at least 0, got ", capacity);
    const int64_t n = capacity;
    auto take = [&](int64_t per_sample) { return arena.template take<S>(per_sample * n); };
    auto stats = [&](int channels) {
      if (!training) return BatchNormStats{};
      float* m = arena.template take<float>(channels);
      return BatchNormStats{m, arena.template take<float>(channels)};
    };
    if (training) {
      images = arena.template take<float>(3 * int64_t{Shape::resolution} * Shape::resolution * n);
      c1 = take(Shape::half * Shape::hw1);
      c2 = take(Shape::half * Shape::hw1);
      c3 = take(Shape::width * Shape::hw1);
      stem = take(Shape::width * Shape::hw2);
      bn1 = stats(Shape::half);
      bn2 = stats(Shape::half);
      bn3 = stats(Shape::width);
      Shape::for_each_block([&](int s, int bl) {
        Block k;
        k.c1 = take(Shape::mid(s, bl));
        k.c2 = take(Shape::mid(s, bl));
        k.c3 = take(Shape::out(s));
        if (Shape::downsample(s, bl)) k.cd = take(Shape::out(s));
        k.y = take(Shape::out(s));
        k.bn1 = stats(Shape::planes(s));
        k.bn2 = stats(Shape::planes(s));
        k.bn3 = stats(4 * Shape::planes(s));
        if (Shape::downsample(s, bl)) k.bnd = stats(4 * Shape::planes(s));
        stages[s].push_back(k);
      });
    } else {
      S* shared = take(Shape::shared_convolution());
      S* down = take(Shape::largest_activation());
      S* y0 = take(Shape::largest_activation());
      S* y1 = take(Shape::largest_activation());
      c1 = c2 = c3 = shared;
      stem = y0;
      int index = 0;  // the stem wrote y0; block k writes y1 when k is even
      Shape::for_each_block([&](int s, int bl) {
        Block k;
        k.c1 = k.c2 = k.c3 = shared;
        if (Shape::downsample(s, bl)) k.cd = down;
        k.y = index++ % 2 == 0 ? y1 : y0;
        stages[s].push_back(k);
      });
    }
    a = take(Shape::scratch());
    b = take(Shape::scratch());
    grad_a = take(Shape::largest_activation());
    if (training) grad_b = take(Shape::largest_activation());
    conv_scratch = arena.template take<S>(std::max<int64_t>(conv_scratch_elements, 1));
    pool = PoolActs(arena, capacity, training);
    spare = stats(Shape::widest_batchnorm());
  }

  // The last block's output: the attention pool's input.
  S* features_map() const { return stages[3].back().y; }

  // S elements per image the constructor takes (not the statistics nor the convolutions'
  // scratch, which do not grow per image; not the float tensors: the training copy of the
  // images and the pool's).
  static constexpr int64_t storage_per_sample(bool training) {
    const int64_t common = 2 * Shape::scratch() + PoolActs::storage_per_sample(training);
    if (training) return common + Shape::all_convolutions() + Shape::all_outputs() + 2 * Shape::largest_activation();
    return common + Shape::shared_convolution() + 4 * Shape::largest_activation();
  }
};

}  // namespace clip::cuda
