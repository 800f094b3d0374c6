// QuickGELU of the MLP (x sigmoid(1.702 x)), fused with c_fc's bias: the gemm writes the product
// without bias, one elementwise pass adds the bias (kept in `pre` for backward) and applies the
// activation. Backward produces d_pre and the bias gradient in the same pass. The element math
// is include/clip/ops/quick_gelu_math.hpp, shared with the host tests.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/ops/quick_gelu_math.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/layernorm.cuh"  // detail::Vec, load_vec/store_vec, add_partials_kernel
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace detail {

// pre[r, j] += bias[j]; act[r, j] = QuickGELU(pre[r, j]), from the stored (rounded) pre so that
// backward differentiates exactly what forward activated. One thread per VW-vector, grid-stride.
template <int F, int VW, class S>
__global__ void bias_quick_gelu_forward_kernel(S* act, S* pre, const S* bias, int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t at = v * VW;
    const int j = static_cast<int>(at % F);
    float p[VW], b[VW], a[VW];
    load_vec<VW>(p, pre + at);
    load_vec<VW>(b, bias + j);
#pragma unroll
    for (int e = 0; e < VW; ++e) p[e] = to_float(from_float<S>(p[e] + b[e]));
    store_vec<VW>(pre + at, p);
#pragma unroll
    for (int e = 0; e < VW; ++e) a[e] = clip::quick_gelu(p[e]);
    store_vec<VW>(act + at, a);
  }
}

// Block (x, y): column vectors x*blockDim.x + threadIdx.x of rows [y*rows_per, (y+1)*rows_per).
// d_pre = d_act QuickGELU'(pre) (assigned, may equal d_act); when partial is not null,
// partial[y, j] = Σ of this chunk's fp32 d_pre over its rows in order (bias gradient, stage 1).
template <int F, int VW, class S>
__global__ void quick_gelu_backward_kernel(S* d_pre, float* partial, const S* d_act, const S* pre, int64_t rows,
                                           int64_t rows_per) {
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) * VW;
  if (j >= F) return;
  const int64_t r0 = blockIdx.y * rows_per;
  const int64_t r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
  float acc[VW] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = r * F + j;
    float dy[VW], x[VW], dx[VW];
    load_vec<VW>(dy, d_act + at);
    load_vec<VW>(x, pre + at);
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      dx[e] = dy[e] * clip::quick_gelu_derivative(x[e]);
      acc[e] += dx[e];
    }
    store_vec<VW>(d_pre + at, dx);
  }
  if (partial) {
#pragma unroll
    for (int e = 0; e < VW; ++e) partial[blockIdx.y * int64_t{F} + j + e] = acc[e];
  }
}

}  // namespace detail

// pre[r, j] += bias[j] (the c_fc output, kept for backward); act = pre sigmoid(1.702 pre).
template <int F, class S>
void bias_quick_gelu_forward(Context& ctx,
                             S* act,          // [rows, F]
                             S* pre,          // [rows, F] in: c_fc's product without bias; out: with bias
                             const S* bias,   // [F]
                             int64_t rows) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(F > 0, "QuickGELU needs a positive width");
  CLIP_CHECK(rows >= 0, "QuickGELU got a negative row count (", rows, ")");
  if (rows == 0) return;
  constexpr int VW = detail::vector_width<S, F>;
  const bool vec = detail::aligned16(act) && detail::aligned16(pre) && detail::aligned16(bias);
  const int64_t n = rows * F;
  auto launch = [&](auto vw) {
    constexpr int W = decltype(vw)::value;
    const int64_t vectors = n / W;
    const int64_t wanted = (vectors + 255) / 256;
    const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
    detail::bias_quick_gelu_forward_kernel<F, W, S><<<blocks, 256, 0, ctx.stream()>>>(act, pre, bias, vectors);
  };
  if (VW > 1 && vec)
    launch(std::integral_constant<int, VW>{});
  else
    launch(std::integral_constant<int, 1>{});
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// d_pre = d_act QuickGELU'(pre) (assigned; may equal d_act); d_bias += column sums of d_pre (in
// fp32, before rounding to S; null: skipped). Deterministic: per-chunk partial sums in
// ctx.workspace(), then added in chunk order (no atomics).
template <int F, class S>
void quick_gelu_backward(Context& ctx,
                         S* d_pre,           // [rows, F]
                         float* d_bias,      // [F] or null
                         const S* d_act,     // [rows, F]
                         const S* pre,       // [rows, F] the forward's input (bias included)
                         int64_t rows) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(F > 0, "QuickGELU needs a positive width");
  CLIP_CHECK(rows >= 0, "QuickGELU got a negative row count (", rows, ")");
  if (rows == 0) return;
  constexpr int VW = detail::vector_width<S, F>;
  // Row chunks of at least 16 rows, at most 256 of them (fewer when the workspace is smaller).
  const int64_t wanted = (rows + 15) / 16;
  const int cap = d_bias ? detail::partial_rows_available(ctx, F, 256) : 256;
  const int64_t chunks0 = wanted < cap ? wanted : cap;
  const int64_t rows_per = (rows + chunks0 - 1) / chunks0;
  const int chunks = static_cast<int>((rows + rows_per - 1) / rows_per);
  float* partial = d_bias ? static_cast<float*>(ctx.workspace()) : nullptr;  // [chunks, F]
  const bool vec = detail::aligned16(d_pre) && detail::aligned16(d_act) && detail::aligned16(pre);
  auto launch = [&](auto vw) {
    constexpr int W = decltype(vw)::value;
    constexpr int threads = 128;
    const dim3 grid((F / W + threads - 1) / threads, static_cast<unsigned>(chunks));
    detail::quick_gelu_backward_kernel<F, W, S>
        <<<grid, threads, 0, ctx.stream()>>>(d_pre, partial, d_act, pre, rows, rows_per);
  };
  if (VW > 1 && vec)
    launch(std::integral_constant<int, VW>{});
  else
    launch(std::integral_constant<int, 1>{});
  CLIP_CUDA_CHECK(cudaGetLastError());
  if (d_bias) {
    detail::add_partials_kernel<><<<(F + 255) / 256, 256, 0, ctx.stream()>>>(d_bias, nullptr, partial, F, chunks);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace clip::cuda
