// Bias-free 2-D convolution of channel-major activations [C, B, H, W] (the CPU ModifiedResNet's
// layout, include/clip/ops/conv2d.hpp), as gemms on cuBLASLt (kernels/gemm.cuh).
//
//   1x1 stride 1:  y[Cout, B H W] = W[Cout, Cin] · x[Cin, B H W]            (x is its own im2col)
//   otherwise:     col[Cin K K, cols] = im2col(x) for a chunk of images (caller's scratch),
//                  y[Cout, cols] = W[Cout, Cin K K] · col                   (W is [Cout, Cin, K, K])
//   backward:      d_w += d_y · col^T       (fp32 output, beta 1: gradients accumulate in fp32)
//                  d_col = W^T · d_y        (fp32, in the scratch col occupied)
//                  d_x = col2im(d_col)      (a gather per input element: no atomics, fixed order)
// The index math is include/clip/ops/conv_index.hpp, checked on the CPU by
// tests/test_cuda_host_resnet_ops.cpp against clip's CPU Conv2d.
//
// Images are taken in chunks whose im2col fits kScratchBytes, so the scratch stays bounded at
// any batch (the stem's 3x3 convolutions at 112x112 take 14 MB of columns per image). A chunk's
// output columns are a strided slice of y's rows (row stride B Ho Wo), which the gemm takes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/core/error.hpp"
#include "clip/ops/conv_index.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/gemm.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace conv_detail {
inline constexpr int kThreads = 256;
// Bound on one chunk's fp32 columns (backward's d_col), in bytes.
inline constexpr int64_t kScratchBytes = int64_t{256} << 20;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// col[r, j] (r < depth, j < cols; row stride cols) = x under tap r of output pixel j of the
// chunk starting at image n0, 0 in the padding. Consecutive threads take consecutive j: the
// writes are coalesced, the reads nearly so (stride `Stride`).
template <int K, int Stride, int Pad, class TX, class S>
__global__ void im2col_kernel(S* __restrict__ col, const TX* __restrict__ x, conv_index::Layout xl, int h, int w,
                              int ho, int wo, int64_t n0, int64_t cols, int64_t depth) {
  const int64_t total = depth * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, j = i % cols;
    const int64_t at = conv_index::im2col_source<K, Stride, Pad>(r, j, n0, h, w, ho, wo, xl);
    col[i] = from_float<S>(at < 0 ? 0.0f : to_float(x[at]));
  }
}

// d_x (images [n0, n0 + images) of the batch, channel-major [Cin, B, H, W]) = col2im(d_col),
// assigned or (accumulate) added into.
template <int K, int Stride, int Pad, class S>
__global__ void col2im_kernel(S* d_x, const float* __restrict__ d_col, conv_index::Layout xl, int cin, int h, int w,
                              int ho, int wo, int64_t n0, int64_t images, bool accumulate) {
  const int64_t hw = int64_t{h} * w, cols = images * ho * wo;
  const int64_t total = int64_t{cin} * images * hw;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = i % hw, rest = i / hw;
    const int64_t n = rest % images;
    const int ci = static_cast<int>(rest / images);
    const int iy = static_cast<int>(p / w), ix = static_cast<int>(p % w);
    const float g = conv_index::col2im_gather<K, Stride, Pad>(ci, iy, ix, n, ho, wo, cols,
                                                              [&](int64_t at) { return d_col[at]; });
    S* out = d_x + (n0 + n) * xl.batch_stride + ci * xl.channel_stride + p;
    *out = from_float<S>(accumulate ? to_float(*out) + g : g);
  }
}
}  // namespace conv_detail

template <int Cin, int Cout, int K, int Stride, int Pad, class S>
struct Conv2d {
  static_assert(Cin > 0 && Cout > 0, "a convolution needs positive channel counts");
  static_assert(K > 0 && Stride > 0 && Pad >= 0,
                "a convolution needs a positive kernel and stride and a non-negative padding");
  static_assert(is_storage_type<S>, "a convolution stores float or bf16 activations");

  static constexpr int64_t depth = int64_t{Cin} * K * K;  // the gemm's inner dimension
  static constexpr bool direct = K == 1 && Stride == 1 && Pad == 0;

  static constexpr int out_size(int in) { return conv_index::out_size(in, K, Stride, Pad); }

  // Images per im2col chunk: as many as keep one chunk's fp32 columns within kScratchBytes.
  static int64_t chunk_images(int64_t batch, int h, int w) {
    const int64_t per_image = depth * out_size(h) * out_size(w) * int64_t{sizeof(float)};
    return std::clamp<int64_t>(conv_detail::kScratchBytes / per_image, 1, std::max<int64_t>(batch, 1));
  }
  // S elements of scratch for forward and backward with im2col: one chunk's columns in fp32
  // (backward's d_col reuses the columns' memory after d_w's gemm has read them).
  static int64_t image_scratch_elements(int64_t batch, int h, int w) {
    const int64_t floats = chunk_images(batch, h, w) * depth * out_size(h) * out_size(w);
    return (floats * int64_t{sizeof(float)} + int64_t{sizeof(S)} - 1) / int64_t{sizeof(S)};
  }
  // The same for forward/backward on channel-major activations: 0 when direct.
  static int64_t scratch_elements(int64_t batch, int h, int w) {
    return direct ? 0 : image_scratch_elements(batch, h, w);
  }

  // y [Cout, B, Ho, Wo] = conv(x [Cin, B, H, W]); weight [Cout, Cin, K, K].
  static void forward(Context& ctx, S* y, const S* x, const S* weight, int64_t batch, int h, int w, S* scratch) {
    check(batch, h, w);
    if constexpr (direct) {
      const int64_t n = batch * h * w;
      gemm_nn<S, S>(ctx, Cout, n, Cin, weight, Cin, x, n, y, n);
      CLIP_CUDA_CHECK(cudaGetLastError());
    } else {
      forward_im2col(ctx, y, x, conv_index::cnhw(batch, h, w), weight, batch, h, w, scratch);
    }
  }

  // d_w [Cout, Cin, K, K] += conv's weight gradient (fp32); d_x [Cin, B, H, W] = the input
  // gradient (assigned, added into with `accumulate`; skipped when null). d_x must not overlap
  // x, d_y or the scratch.
  static void backward(Context& ctx, S* d_x, float* d_w, const S* d_y, const S* x, const S* weight, int64_t batch,
                       int h, int w, S* scratch, bool accumulate = false) {
    check(batch, h, w);
    if constexpr (direct) {
      const int64_t n = batch * h * w;
      gemm_nt<S, float>(ctx, Cout, Cin, n, d_y, n, x, n, d_w, Cin, {.beta = 1});  // d_w += d_y x^T
      if (d_x)  // d_x = W^T d_y  (+ d_x)
        gemm_tn<S, S>(ctx, Cin, n, Cout, weight, Cin, d_y, n, d_x, n, {.beta = accumulate ? 1.0f : 0.0f});
      CLIP_CUDA_CHECK(cudaGetLastError());
    } else {
      backward_im2col(ctx, d_x, d_w, d_y, x, conv_index::cnhw(batch, h, w), weight, batch, h, w, scratch,
                      accumulate);
    }
  }

  // The stem's first convolution: y [Cout, B, Ho, Wo] from float images [B, Cin, H, W] (NCHW),
  // rounded to S as im2col reads them. scratch: image_scratch_elements.
  static void forward_images(Context& ctx, S* y, const float* images, const S* weight, int64_t batch, int h, int w,
                             S* scratch) {
    check(batch, h, w);
    forward_im2col(ctx, y, images, conv_index::nchw(Cin, h, w), weight, batch, h, w, scratch);
  }
  // Its weight gradient (images need none): d_w += d_y · im2col(images)^T.
  static void backward_images(Context& ctx, float* d_w, const S* d_y, const float* images, int64_t batch, int h, int w,
                              S* scratch) {
    check(batch, h, w);
    backward_im2col(ctx, static_cast<S*>(nullptr), d_w, d_y, images, conv_index::nchw(Cin, h, w), weight_none(), batch,
                    h, w, scratch, false);
  }

 private:
  static const S* weight_none() { return nullptr; }

  static void check(int64_t batch, int h, int w) {
    CLIP_CHECK(batch > 0, "a convolution needs a positive batch, got ", batch);
    CLIP_CHECK(h + 2 * Pad >= K && w + 2 * Pad >= K, "a ", K, "x", K, " convolution with padding ", Pad,
               " cannot run on a ", h, "x", w, " input");
  }

  template <class TX>
  static void forward_im2col(Context& ctx, S* y, const TX* x, conv_index::Layout xl, const S* weight, int64_t batch,
                             int h, int w, S* scratch) {
    CLIP_CHECK(scratch != nullptr, "an im2col convolution needs scratch (Conv2d::scratch_elements)");
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, ldy = batch * out_hw;
    const int64_t chunk = chunk_images(batch, h, w);
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t cols = std::min(chunk, batch - n0) * out_hw;
      conv_detail::im2col_kernel<K, Stride, Pad, TX, S>
          <<<conv_detail::blocks_for(depth * cols), conv_detail::kThreads, 0, ctx.stream()>>>(scratch, x, xl, h, w, ho,
                                                                                              wo, n0, cols, depth);
      CLIP_CUDA_CHECK(cudaGetLastError());
      // y[:, n0 Ho Wo + 0..cols) = W[Cout, depth] col[depth, cols]
      gemm_nn<S, S>(ctx, Cout, cols, depth, weight, depth, scratch, cols, y + n0 * out_hw, ldy);
    }
    CLIP_CUDA_CHECK(cudaGetLastError());
  }

  template <class TX>
  static void backward_im2col(Context& ctx, S* d_x, float* d_w, const S* d_y, const TX* x, conv_index::Layout xl,
                              const S* weight, int64_t batch, int h, int w, S* scratch, bool accumulate) {
    CLIP_CHECK(scratch != nullptr, "an im2col convolution needs scratch (Conv2d::scratch_elements)");
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, ldy = batch * out_hw;
    const int64_t chunk = chunk_images(batch, h, w);
    float* d_col = reinterpret_cast<float*>(scratch);  // reuses the columns' memory once d_w has read them
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t images = std::min(chunk, batch - n0), cols = images * out_hw;
      const S* dys = d_y + n0 * out_hw;  // d_y[Cout, cols], rows ldy apart
      conv_detail::im2col_kernel<K, Stride, Pad, TX, S>
          <<<conv_detail::blocks_for(depth * cols), conv_detail::kThreads, 0, ctx.stream()>>>(scratch, x, xl, h, w, ho,
                                                                                              wo, n0, cols, depth);
      CLIP_CUDA_CHECK(cudaGetLastError());
      // d_w[Cout, depth] += d_y[Cout, cols] col[depth, cols]^T
      gemm_nt<S, float>(ctx, Cout, depth, cols, dys, ldy, scratch, cols, d_w, depth, {.beta = 1});
      if (!d_x) continue;
      // d_col[depth, cols] = W[Cout, depth]^T d_y[Cout, cols]   (fp32, over the columns)
      gemm_tn<S, float>(ctx, depth, cols, Cout, weight, depth, dys, ldy, d_col, cols);
      const int64_t total = int64_t{Cin} * images * h * w;
      conv_detail::col2im_kernel<K, Stride, Pad, S>
          <<<conv_detail::blocks_for(total), conv_detail::kThreads, 0, ctx.stream()>>>(d_x, d_col, xl, Cin, h, w, ho,
                                                                                       wo, n0, images, accumulate);
      CLIP_CUDA_CHECK(cudaGetLastError());
    }
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace clip::cuda
