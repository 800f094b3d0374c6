// AvgPool2d(K): kernel = stride = K, no padding, floor mode, as OpenAI's anti-aliased strided
// ResNet uses it (the stem's pool, and before the strided 1x1 convolutions of a bottleneck).
// Each output is the sum of its K x K window divided by K*K, as PyTorch computes it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/core/error.hpp"
#include "clip/ops/conv2d.hpp"  // Planes

namespace clip {

template <int K>
struct AvgPool2d {
  static_assert(K > 0, "a pooling window must be positive");
  static constexpr int kernel = K;
  static constexpr int out_size(int in) { return in / K; }

  // y (channels planes of h/K x w/K, layout yl) = avgpool(x (channels planes of h x w, layout xl)).
  static void forward(const float* x, Planes xl, float* y, Planes yl, int64_t batch, int64_t channels, int h, int w) {
    CLIP_CHECK(h >= K && w >= K, "AvgPool2d(", K, ") cannot pool a ", h, "x", w, " plane");
    const int ho = out_size(h), wo = out_size(w);
    constexpr float area = float(K * K);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c = 0; c < channels; ++c) {
        const float* px = xl.plane(x, n, c);
        float* py = yl.plane(y, n, c);
        for (int oy = 0; oy < ho; ++oy) {
          const float* in = px + int64_t{oy} * K * w;
          float* row = py + int64_t{oy} * wo;
          for (int ox = 0; ox < wo; ++ox) {
            float s = 0.0f;  // row-major over the window, as PyTorch sums
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) s += in[int64_t{ky} * w + ox * K + kx];
            row[ox] = s / area;
          }
        }
      }
  }

  // Backward: every input of a window gets its output's gradient / (K*K); rows and columns that
  // floor mode dropped get 0. d_x (channels planes of h x w, layout xl) is assigned, or added
  // into with `accumulate`. dy: channels planes of h/K x w/K, layout yl.
  static void backward(const float* dy, Planes yl, float* d_x, Planes xl, int64_t batch, int64_t channels, int h, int w,
                       bool accumulate = false) {
    CLIP_CHECK(h >= K && w >= K, "AvgPool2d(", K, ") cannot pool a ", h, "x", w, " plane");
    const int ho = out_size(h), wo = out_size(w);
    constexpr float area = float(K * K);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c = 0; c < channels; ++c) {
        const float* py = yl.plane(dy, n, c);
        float* px = xl.plane(d_x, n, c);
        for (int iy = 0; iy < h; ++iy) {
          float* in = px + int64_t{iy} * w;
          const int oy = iy / K;
          if (oy >= ho) {  // dropped row
            if (!accumulate) std::fill(in, in + w, 0.0f);
            continue;
          }
          const float* row = py + int64_t{oy} * wo;
          for (int ox = 0; ox < wo; ++ox) {
            const float g = row[ox] / area;
            for (int kx = 0; kx < K; ++kx) in[ox * K + kx] = accumulate ? in[ox * K + kx] + g : g;
          }
          if (!accumulate) std::fill(in + wo * K, in + w, 0.0f);
        }
      }
  }
};

}  // namespace clip
