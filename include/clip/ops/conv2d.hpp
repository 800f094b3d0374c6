// Bias-free 2-D convolution (PyTorch's nn.Conv2d(bias=False)) as one matrix product per layer.
//
// Channels, kernel, stride and padding are template ints; batch and the spatial size are
// run-time values (the models pass their constexpr sizes). Weights keep PyTorch's layout
// [Cout, Cin, K, K], which read as a column-major [Cin*K*K, Cout] matrix is W^T without a copy.
//
// Activations are batches of C planes of H x W floats. `Planes` says where the planes lie, so the
// same code reads and writes PyTorch's NCHW and the channel-major CNHW ([C, B, H, W]) the
// ResNet uses inside: in CNHW the pixels of all images of a channel are one contiguous row, so a
// 1x1 convolution over the whole batch is a single GEMM and deep layers with 7x7 planes still
// give the GEMM B*49 columns instead of 49.
//
//   y[P, Cout] = col[P, Cin*K*K] * W^T[Cin*K*K, Cout]      (column-major; P = output pixels)
//
// col is im2col of the input (one row of the transposed view per (ci, ky, kx)); a 1x1 stride-1
// convolution reads the input directly. The output pixels are cut into blocks (about 2 MiB of
// im2col plus output, at least 512 pixels, at least one block per thread) that threads take one
// at a time: im2col, a single-threaded GEMM and the
// epilogue (BatchNorm, ReLU, residual) of a block all run while the block sits in that core's
// cache. Deep layers at small batch, with too few pixels to share, split output channels instead.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clip/core/error.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// Where element (n, c, y, x) of a batch of C planes of H x W lives:
// data[n * batch_stride + c * channel_stride + y * W + x]. Shared by conv2d, batchnorm and pool.
struct Planes {
  int64_t batch_stride;
  int64_t channel_stride;

  // PyTorch's layout, [B, C, H, W].
  static constexpr Planes nchw(int64_t channels, int64_t h, int64_t w) { return {channels * h * w, h * w}; }
  // Channel-major, [C, B, H, W]: each channel's pixels of the whole batch are one row.
  static constexpr Planes cnhw(int64_t batch, int64_t h, int64_t w) { return {h * w, batch * h * w}; }

  // Whether the images' planes of one channel abut, so a batch is one plane of B*H*W pixels.
  constexpr bool batch_contiguous(int64_t hw) const { return batch_stride == hw; }
  const float* plane(const float* data, int64_t n, int64_t c) const { return data + n * batch_stride + c * channel_stride; }
  float* plane(float* data, int64_t n, int64_t c) const { return data + n * batch_stride + c * channel_stride; }
};

namespace detail {
inline int conv_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}
inline int conv_thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
}  // namespace detail

// The epilogue that does nothing: the convolution's output is left as the product.
struct NoEpilogue {
  void operator()(float*, int64_t, int64_t, int64_t, int, int) const {}
};

// Bytes of im2col columns plus output that one thread keeps in flight (about its L2 cache).
inline constexpr int64_t kConvBlockBytes = int64_t{1} << 21;
// Below this many output pixels per thread, threads split the output channels instead.
inline constexpr int64_t kConvMinColumnsPerThread = 128;

template <int Cin, int Cout, int K, int Stride = 1, int Pad = 0>
struct Conv2d {
  static_assert(Cin > 0 && Cout > 0, "a convolution needs positive channel counts");
  static_assert(K > 0 && Stride > 0 && Pad >= 0, "a convolution needs a positive kernel and stride and a non-negative padding");

  static constexpr int in_channels = Cin;
  static constexpr int out_channels = Cout;
  static constexpr int kernel = K;
  static constexpr int stride = Stride;
  static constexpr int padding = Pad;
  static constexpr int64_t depth = int64_t{Cin} * K * K;     // GEMM inner dimension
  static constexpr bool direct = K == 1 && Stride == 1 && Pad == 0;  // no im2col needed

  using Weight = Param<Cout, Cin, K, K>;

  static constexpr int out_size(int in) { return (in + 2 * Pad - K) / Stride + 1; }

  // y (Cout planes of out_size(h) x out_size(w), layout yl) = conv(x (Cin planes of h x w, layout xl)),
  // then epilogue(y, yl.channel_stride, offset, cols, c0, c1) on each finished tile: channels
  // [c0, c1) of `cols` contiguous output pixels, element i of channel c at
  // y[offset + c * channel_stride + i] (a fused BatchNorm/ReLU/residual, see batchnorm.hpp).
  // `col` is scratch, grown as needed and reused across calls. Called inside a parallel region,
  // the convolution runs on the calling thread alone (and `col` must be that thread's own).
  template <class Epilogue = NoEpilogue>
  static void forward(const float* x, Planes xl, const Weight& weight, float* y, Planes yl, int64_t batch, int h, int w,
                      std::vector<float>& col, const Epilogue& epilogue = {}) {
    forward(x, xl, weight.data(), y, yl, batch, h, w, col, epilogue);
  }

  template <class Epilogue = NoEpilogue>
  static void forward(const float* x, Planes xl, const float* weight, float* y, Planes yl, int64_t batch, int h, int w,
                      std::vector<float>& col, const Epilogue& epilogue = {}) {
    CLIP_CHECK(h + 2 * Pad >= K && w + 2 * Pad >= K, "a ", K, "x", K, " convolution with padding ", Pad,
               " cannot run on a ", h, "x", w, " input");
    CLIP_CHECK(batch > 0, "a convolution needs a positive batch, got ", batch);
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, in_hw = int64_t{h} * w;

    // Segments: runs of output pixels whose planes are contiguous in y (and in x for a direct
    // conv): the whole batch in CNHW, one image in NCHW.
    const bool whole_batch = yl.batch_contiguous(out_hw) && (!direct || xl.batch_contiguous(in_hw));
    const int64_t segments = whole_batch ? 1 : batch;
    const int64_t seg_cols = whole_batch ? batch * out_hw : out_hw;
    const int threads = detail::conv_threads();

    if (segments * seg_cols >= threads * kConvMinColumnsPerThread) {
      // Threads take blocks of output pixels: im2col, GEMM and epilogue of a block stay in the
      // thread's cache, and the GEMMs run single-threaded with no synchronisation inside.
      int64_t block = kConvBlockBytes / (int64_t{sizeof(float)} * ((direct ? 0 : depth) + Cout));
      block = std::clamp<int64_t>(block, 512, 8192);  // >= 512: re-packing W per block stays cheap
      const int64_t per_thread = (segments * seg_cols + threads - 1) / threads;
      block = std::min(block, (per_thread + 15) / 16 * 16);  // at least one block per thread
      const int64_t blocks_per_seg = (seg_cols + block - 1) / block;
      const int64_t tasks = segments * blocks_per_seg;
      if (!direct && static_cast<int64_t>(col.size()) < threads * block * depth) {
        col.clear();
        col.resize(threads * block * depth);
      }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t s = t / blocks_per_seg, j0 = (t % blocks_per_seg) * block;
        const int64_t cols = std::min(block, seg_cols - j0);
        float* buffer = direct ? nullptr : col.data() + detail::conv_thread_id() * block * depth;
        tile(x, xl, weight, y, yl, h, w, s, j0, cols, 0, Cout, buffer, /*pack=*/true);
        epilogue(y, yl.channel_stride, s * yl.batch_stride + j0, cols, 0, Cout);
      }
    } else {
      // Few pixels (deep layers at small batch): one im2col, threads split the output channels.
      if (!direct && static_cast<int64_t>(col.size()) < seg_cols * depth) {
        col.clear();
        col.resize(seg_cols * depth);
      }
      const int groups = std::min(threads, Cout / 16 > 0 ? Cout / 16 : 1);
      const int per_group = (Cout / groups + 15) / 16 * 16;
      for (int64_t s = 0; s < segments; ++s) {
        if (!direct) im2col(x, xl, h, w, s * out_hw, seg_cols, 0, depth, col.data());
#pragma omp parallel for schedule(static) num_threads(groups) if (groups > 1)
        for (int g = 0; g < groups; ++g) {
          const int c0 = std::min(Cout, g * per_group), c1 = std::min(Cout, c0 + per_group);
          if (c0 >= c1) continue;
          tile(x, xl, weight, y, yl, h, w, s, 0, seg_cols, c0, c1, col.data(), /*pack=*/false);
          epilogue(y, yl.channel_stride, s * yl.batch_stride, seg_cols, c0, c1);
        }
      }
    }
  }

  // Output channels [c0, c1) of pixels [j0, j0 + cols) of segment s: y = col * W^T for that tile.
  // With `pack`, `buffer` receives the tile's im2col first; otherwise it already holds the
  // segment's whole im2col (columns from j0 = 0).
  static void tile(const float* x, Planes xl, const float* weight, float* y, Planes yl, int h, int w, int64_t s,
                   int64_t j0, int64_t cols, int c0, int c1, float* buffer, bool pack) {
    // Y[c1 - c0, cols] = W[c0:c1, depth] * X[depth, cols], rows of Y `channel_stride` apart.
    float* ys = y + s * yl.batch_stride + j0 + c0 * yl.channel_stride;
    const float* ws = weight + int64_t{c0} * depth;
    if constexpr (direct) {
      // X is the input itself: [Cin, pixels], planes `channel_stride` apart.
      gemm_nn(c1 - c0, cols, Cin, ws, depth, x + s * xl.batch_stride + j0, xl.channel_stride, ys, yl.channel_stride,
              /*accumulate=*/false);
    } else {
      // The segment starts at image s (per-image segments); the whole batch is segment 0.
      const int64_t out_hw = int64_t{out_size(h)} * out_size(w);
      if (pack) im2col(x, xl, h, w, s * out_hw + j0, cols, 0, depth, buffer, /*parallel=*/false);
      gemm_nn(c1 - c0, cols, depth, ws, depth, buffer, cols, ys, yl.channel_stride, /*accumulate=*/false);
    }
  }

  // col[r * cols + j] for rows r = (ci, ky, kx) in [r0, r1) and output pixel j = first + 0..cols-1
  // of the batch (pixel index n * Ho * Wo + oy * Wo + ox): the input value under that tap, 0 in
  // the padding.
  static void im2col(const float* x, Planes xl, int h, int w, int64_t first, int64_t cols, int64_t r0, int64_t r1,
                     float* col, bool parallel = true) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo;
#pragma omp parallel for schedule(static) if (parallel && (r1 - r0) * cols >= (int64_t{1} << 16))
    for (int64_t r = r0; r < r1; ++r) {
      const int ci = static_cast<int>(r / (K * K));
      const int ky = static_cast<int>(r / K % K), kx = static_cast<int>(r % K);
      // Output columns whose tap lies inside the input: ox in [lo, hi).
      const int lo = Pad - kx <= 0 ? 0 : std::min(wo, (Pad - kx + Stride - 1) / Stride);
      const int last = w - 1 + Pad - kx;  // ox * Stride <= last
      const int hi = last < 0 ? lo : std::max(lo, std::min(wo, last / Stride + 1));
      float* dst = col + (r - r0) * cols;
      int64_t j = first;
      const int64_t end = first + cols;
      while (j < end) {
        const int64_t n = j / out_hw, rem = j % out_hw;
        const int oy = static_cast<int>(rem / wo), ox0 = static_cast<int>(rem % wo);
        const int ox1 = static_cast<int>(std::min<int64_t>(wo, ox0 + (end - j)));
        const int iy = oy * Stride + ky - Pad;
        float* d = dst + (j - first) - ox0;  // d[ox] is column (n, oy, ox)
        if (iy < 0 || iy >= h) {
          std::fill(d + ox0, d + ox1, 0.0f);
        } else {
          const float* src = xl.plane(x, n, ci) + int64_t{iy} * w + kx - Pad;  // src[ox * Stride]
          const int a = std::clamp(lo, ox0, ox1), b = std::clamp(hi, ox0, ox1);
          std::fill(d + ox0, d + a, 0.0f);
          if constexpr (Stride == 1) {
            std::memcpy(d + a, src + a, sizeof(float) * (b - a));
          } else {
            for (int ox = a; ox < b; ++ox) d[ox] = src[ox * Stride];
          }
          std::fill(d + b, d + ox1, 0.0f);
        }
        j += ox1 - ox0;
      }
    }
  }
};

// A direct loop over every output and tap (no GEMM), for tests.
template <int Cin, int Cout, int K, int Stride = 1, int Pad = 0>
void conv2d_reference(const float* x, Planes xl, const float* weight, float* y, Planes yl, int64_t batch, int h, int w) {
  using C = Conv2d<Cin, Cout, K, Stride, Pad>;
  const int ho = C::out_size(h), wo = C::out_size(w);
  for (int64_t n = 0; n < batch; ++n)
    for (int co = 0; co < Cout; ++co)
      for (int oy = 0; oy < ho; ++oy)
        for (int ox = 0; ox < wo; ++ox) {
          double acc = 0;
          for (int ci = 0; ci < Cin; ++ci)
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) {
                const int iy = oy * Stride + ky - Pad, ix = ox * Stride + kx - Pad;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                acc += double(weight[((int64_t{co} * Cin + ci) * K + ky) * K + kx]) * xl.plane(x, n, ci)[iy * w + ix];
              }
          yl.plane(y, n, co)[oy * wo + ox] = static_cast<float>(acc);
        }
}

}  // namespace clip
