// AvgPool2d(K): kernel = stride = K, no padding, floor mode, as include/clip/ops/pool.hpp (the
// ResNet stem's pool and the anti-aliased strided bottlenecks). Each output is the row-major
// sum of its K x K window divided by K*K, as PyTorch computes it.
//
// Works on any layout whose planes are contiguous h x w blocks (channel-major [C, B, H, W] and
// NCHW alike): there are channels * batch planes, plane p at p * h * w.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/core/error.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace pool_detail {
inline constexpr int kThreads = 256;

// y [planes, h/K, w/K] = avgpool(x [planes, h, w]); one thread per output.
template <int K, class S>
__global__ void avg_pool_forward_kernel(S* __restrict__ y, const S* __restrict__ x, int64_t planes, int h, int w) {
  const int ho = h / K, wo = w / K;
  const int64_t total = planes * ho * wo;
  constexpr float area = float(K * K);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int ox = static_cast<int>(i % wo), oy = static_cast<int>(i / wo % ho);
    const int64_t p = i / (int64_t{ho} * wo);
    const S* in = x + p * h * w + int64_t{oy} * K * w + ox * K;
    float s = 0.0f;
    for (int ky = 0; ky < K; ++ky)
      for (int kx = 0; kx < K; ++kx) s += to_float(in[int64_t{ky} * w + kx]);
    y[i] = from_float<S>(s / area);
  }
}

// d_x [planes, h, w] = d_y of the input's window / (K*K), 0 in rows and columns floor mode
// dropped; assigned or (accumulate) added into. One thread per input: no atomics.
template <int K, class S>
__global__ void avg_pool_backward_kernel(S* d_x, const S* __restrict__ d_y, int64_t planes, int h, int w,
                                         bool accumulate) {
  const int ho = h / K, wo = w / K;
  const int64_t total = planes * h * w;
  constexpr float area = float(K * K);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int ix = static_cast<int>(i % w), iy = static_cast<int>(i / w % h);
    const int64_t p = i / (int64_t{h} * w);
    const int oy = iy / K, ox = ix / K;
    const float g = oy < ho && ox < wo ? to_float(d_y[(p * ho + oy) * wo + ox]) / area : 0.0f;
    d_x[i] = from_float<S>(accumulate ? to_float(d_x[i]) + g : g);
  }
}

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
}
}  // namespace pool_detail

// y [channels, B, h/K, w/K] = AvgPool2d(K)(x [channels, B, h, w]).
template <int K, class S>
void avg_pool_forward(Context& ctx, S* y, const S* x, int64_t channels, int64_t batch, int h, int w) {
  static_assert(K > 0, "a pooling window must be positive");
  CLIP_CHECK(h >= K && w >= K, "AvgPool2d(", K, ") cannot pool a ", h, "x", w, " plane");
  const int64_t planes = channels * batch;
  const int64_t total = planes * (h / K) * (w / K);
  if (total == 0) return;
  pool_detail::avg_pool_forward_kernel<K, S>
      <<<pool_detail::blocks_for(total), pool_detail::kThreads, 0, ctx.stream()>>>(y, x, planes, h, w);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// d_x [channels, B, h, w] (assigned, or added into with `accumulate`) from d_y [channels, B, h/K, w/K].
template <int K, class S>
void avg_pool_backward(Context& ctx, S* d_x, const S* d_y, int64_t channels, int64_t batch, int h, int w,
                       bool accumulate = false) {
  static_assert(K > 0, "a pooling window must be positive");
  CLIP_CHECK(h >= K && w >= K, "AvgPool2d(", K, ") cannot pool a ", h, "x", w, " plane");
  const int64_t total = channels * batch * h * w;
  if (total == 0) return;
  pool_detail::avg_pool_backward_kernel<K, S>
      <<<pool_detail::blocks_for(total), pool_detail::kThreads, 0, ctx.stream()>>>(d_x, d_y, channels * batch, h, w,
                                                                                   accumulate);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
