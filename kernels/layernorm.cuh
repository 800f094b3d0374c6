// LayerNorm over the last dimension (C static), forward and backward, mirroring
// include/clip/ops/layernorm.hpp: eps 1e-5, biased variance, fp32 statistics (mean, rstd [rows]).
// One warp per row: C <= 2048 fits in registers (at most 64 values a lane), so a row is read once,
// reduced with warp shuffles (no shared memory, no block barrier) and written once. Rows are
// loaded 16 bytes at a time (float4 / 8 bf16) when C and every pointer allow it.
//
// Backward: d_in per row as the CPU (one warp a row, two passes over the row, the second mostly
// from cache), and the parameter gradients in the same kernel: each lane keeps running sums for
// its columns, a block adds its warps in a fixed order into one partial row, and a second small
// kernel adds the partials in block order to d_weight / d_bias. No atomics: the result depends on
// `rows` and the workspace size only. The partials live in ctx.workspace() (stream-ordered
// scratch, see kernels/context.cuh).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/ops/quick_gelu_math.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace detail {

// VW consecutive values of S, loaded and stored as one 16-byte (or narrower) transaction.
template <class S, int VW>
struct alignas(sizeof(S) * VW) Vec {
  S v[VW];
};

// Elements per 16-byte vector when N values of a row split into whole vectors, else 1.
template <class S, int N>
inline constexpr int vector_width = (N % (16 / static_cast<int>(sizeof(S))) == 0) ? 16 / static_cast<int>(sizeof(S)) : 1;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loads VW values of S at p (aligned to the vector) as floats.
template <int VW, class S>
__device__ inline void load_vec(float (&out)[VW], const S* p) {
  const Vec<S, VW> v = *reinterpret_cast<const Vec<S, VW>*>(p);
#pragma unroll
  for (int e = 0; e < VW; ++e) out[e] = to_float(v.v[e]);
}

template <int VW, class S>
__device__ inline void store_vec(S* p, const float (&in)[VW]) {
  Vec<S, VW> v;
#pragma unroll
  for (int e = 0; e < VW; ++e) v.v[e] = from_float<S>(in[e]);
  *reinterpret_cast<Vec<S, VW>*>(p) = v;
}

// Sum over the 32 lanes of a warp (butterfly: every lane gets the same bits).
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// sums[j] += Σ_p partial[p, j] for p = 0..parts-1 in order (j < n): the second, deterministic
// stage of a column reduction whose first stage wrote one partial row per block.
// `sums2` (may be null) takes columns [n/2, n) when the partial rows hold two vectors side by
// side (LayerNorm's weight and bias gradients).
template <int Unused = 0>  // a template, so that every unit including this header may emit it
__global__ void add_partials_kernel(float* sums, float* sums2, const float* partial, int n, int parts) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float s = 0.0f;
  for (int p = 0; p < parts; ++p) s += partial[static_cast<int64_t>(p) * n + j];
  if (sums2 == nullptr) {
    sums[j] += s;
  } else {
    const int half = n / 2;
    if (j < half)
      sums[j] += s;
    else
      sums2[j - half] += s;
  }
}

// How many partial rows of n floats the context's workspace holds, capped at `cap`.
inline int partial_rows_available(Context& ctx, int64_t n, int cap) {
  const int64_t fit = static_cast<int64_t>(ctx.workspace_bytes() / (sizeof(float) * static_cast<size_t>(n)));
  CLIP_CHECK(fit >= 1, "the CUDA context's workspace (", ctx.workspace_bytes(),
             " bytes) cannot hold one row of partial sums of ", n, " floats");
  return static_cast<int>(fit < cap ? fit : cap);
}

inline constexpr int ln_warps = 4;  // rows (warps) per block

// Forward, one warp per row. out may equal in (the row is in registers before it is written).
template <int C, int VW, class S>
__global__ void __launch_bounds__(ln_warps * 32)
    layernorm_forward_kernel(S* out, float* mean, float* rstd, const S* in, const S* weight, const S* bias,
                             int64_t rows) {
  constexpr int NV = (C / VW + 31) / 32;  // vectors per lane
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ln_warps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
  const S* x = in + row * C;
  float v[NV][VW];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int j = (lane + 32 * i) * VW;
    if (j < C) {
      load_vec<VW>(v[i], x + j);
#pragma unroll
      for (int e = 0; e < VW; ++e) sum += v[i][e];
    }
  }
  const float m = clip::layernorm_mean(warp_sum(sum), C);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int j = (lane + 32 * i) * VW;
    if (j < C) {
#pragma unroll
      for (int e = 0; e < VW; ++e) sq += (v[i][e] - m) * (v[i][e] - m);
    }
  }
  const float s = clip::layernorm_rstd(warp_sum(sq), C);
  S* y = out + row * C;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int j = (lane + 32 * i) * VW;
    if (j < C) {
      float w[VW], b[VW], r[VW];
      load_vec<VW>(w, weight + j);
      load_vec<VW>(b, bias + j);
#pragma unroll
      for (int e = 0; e < VW; ++e) r[e] = (v[i][e] - m) * s * w[e] + b[e];
      store_vec<VW>(y + j, r);
    }
  }
  if (lane == 0) {
    if (mean) mean[row] = m;
    if (rstd) rstd[row] = s;
  }
}

// Backward. Warp w of block k takes rows k*ln_warps + w, then strides by gridDim.x * ln_warps,
// so each lane's parameter sums run over a fixed set of rows in order. partial: [gridDim.x, 2C],
// columns [0, C) the weight gradient, [C, 2C) the bias gradient of this block's rows.
// d_in may equal d_out or d_residual: a lane reads its elements of a row before it writes them.
template <int C, int VW, class S>
__global__ void __launch_bounds__(ln_warps * 32)
    layernorm_backward_kernel(S* d_in, float* partial, const S* d_out, const S* in, const float* mean,
                              const float* rstd, const S* weight, const S* d_residual, int64_t rows) {
  constexpr int NV = (C / VW + 31) / 32;
  __shared__ float block_sums[2 * C];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  float acc_w[NV][VW], acc_b[NV][VW];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int e = 0; e < VW; ++e) acc_w[i][e] = acc_b[i][e] = 0.0f;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ln_warps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * ln_warps) {
    const S* dy_row = d_out + row * C;
    const S* x_row = in + row * C;
    const float m = mean[row], sd = rstd[row];
    // Pass 1: the row sums and this lane's parameter sums. Pass 2 reads the row again (from L1 /
    // L2) rather than keeping it in registers: C = 1024 would otherwise need ~250 registers.
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int j = (lane + 32 * i) * VW;
      if (j < C) {
        float dy[VW], x[VW], w[VW];
        load_vec<VW>(dy, dy_row + j);
        load_vec<VW>(x, x_row + j);
        load_vec<VW>(w, weight + j);
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const float xhat = (x[e] - m) * sd;
          const float g = dy[e] * w[e];
          sum_g += g;
          sum_gx += g * xhat;
          acc_w[i][e] += dy[e] * xhat;
          acc_b[i][e] += dy[e];
        }
      }
    }
    const float mean_g = warp_sum(sum_g) / C, mean_gx = warp_sum(sum_gx) / C;
    // Pass 2: d_in. Each element is read (d_out, d_residual) before the same lane writes it.
    S* dx_row = d_in + row * C;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int j = (lane + 32 * i) * VW;
      if (j < C) {
        float dy[VW], x[VW], w[VW], r[VW], res[VW];
        load_vec<VW>(dy, dy_row + j);
        load_vec<VW>(x, x_row + j);
        load_vec<VW>(w, weight + j);
        if (d_residual) {
          load_vec<VW>(res, d_residual + row * C + j);
        } else {
#pragma unroll
          for (int e = 0; e < VW; ++e) res[e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < VW; ++e)
          r[e] = res[e] + clip::layernorm_backward_element(dy[e], x[e], w[e], m, sd, mean_g, mean_gx);
        store_vec<VW>(dx_row + j, r);
      }
    }
  }

  // The block's warps add into shared memory one after the other (fixed order).
  for (int w = 0; w < ln_warps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int j = (lane + 32 * i) * VW;
        if (j < C) {
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            block_sums[j + e] = (w == 0 ? 0.0f : block_sums[j + e]) + acc_w[i][e];
            block_sums[C + j + e] = (w == 0 ? 0.0f : block_sums[C + j + e]) + acc_b[i][e];
          }
        }
      }
    }
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int j = threadIdx.x; j < 2 * C; j += blockDim.x) out[j] = block_sums[j];
}

}  // namespace detail

// out[r] = (in[r] - mean) / sqrt(var + eps) * weight + bias over rows of C values; mean, rstd
// [rows] receive the statistics when not null. out may equal in.
template <int C, class S>
void layernorm_forward(Context& ctx,
                       S* out,            // [rows, C]
                       float* mean,       // [rows] or null
                       float* rstd,       // [rows] or null
                       const S* in,       // [rows, C]
                       const S* weight,   // [C]
                       const S* bias,     // [C]
                       int64_t rows) {
  static_assert(is_storage_type<S>, "LayerNorm stores float or bf16");
  static_assert(C > 0 && C <= 2048, "one warp normalises a row in registers: C must lie in [1, 2048]");
  CLIP_CHECK(rows >= 0, "LayerNorm got a negative row count (", rows, ")");
  if (rows == 0) return;
  constexpr int VW = detail::vector_width<S, C>;
  const unsigned blocks = static_cast<unsigned>((rows + detail::ln_warps - 1) / detail::ln_warps);
  const bool vec = detail::aligned16(out) && detail::aligned16(in) && detail::aligned16(weight) &&
                   detail::aligned16(bias);
  if (VW > 1 && vec)
    detail::layernorm_forward_kernel<C, VW, S>
        <<<blocks, detail::ln_warps * 32, 0, ctx.stream()>>>(out, mean, rstd, in, weight, bias, rows);
  else
    detail::layernorm_forward_kernel<C, 1, S>
        <<<blocks, detail::ln_warps * 32, 0, ctx.stream()>>>(out, mean, rstd, in, weight, bias, rows);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// Backward of layernorm_forward from its statistics. Per row, with xhat = (in - mean) rstd and
// g = d_out weight: d_in = rstd (g - mean(g) - xhat mean(g xhat)) (+ d_residual when not null),
// assigned; d_in may equal d_out or d_residual. d_weight += Σ_rows d_out xhat, d_bias += Σ_rows
// d_out (deterministic, two stages through ctx.workspace(); no atomics).
template <int C, class S>
void layernorm_backward(Context& ctx,
                        S* d_in,                          // [rows, C]
                        float* d_weight,                  // [C]
                        float* d_bias,                    // [C]
                        const S* d_out,                   // [rows, C]
                        const S* in,                      // [rows, C] the forward's input
                        const float* mean,                // [rows]
                        const float* rstd,                // [rows]
                        const S* weight,                  // [C]
                        int64_t rows,
                        const S* d_residual = nullptr) {  // [rows, C] or null
  static_assert(is_storage_type<S>, "LayerNorm stores float or bf16");
  static_assert(C > 0 && C <= 2048, "one warp handles a row in registers: C must lie in [1, 2048]");
  CLIP_CHECK(rows >= 0, "LayerNorm got a negative row count (", rows, ")");
  CLIP_CHECK(d_weight != nullptr && d_bias != nullptr, "layernorm_backward needs both parameter gradients");
  if (rows == 0) return;
  constexpr int VW = detail::vector_width<S, C>;
  // At most 512 blocks of 4 warps: enough to fill an H100 several times over, few partial rows.
  const int64_t wanted = (rows + detail::ln_warps - 1) / detail::ln_warps;
  const int cap = detail::partial_rows_available(ctx, 2 * int64_t{C}, 512);
  const int blocks = static_cast<int>(wanted < cap ? wanted : cap);
  float* partial = static_cast<float*>(ctx.workspace());  // [blocks, 2C]
  const bool vec = detail::aligned16(d_in) && detail::aligned16(d_out) && detail::aligned16(in) &&
                   detail::aligned16(weight) && (d_residual == nullptr || detail::aligned16(d_residual));
  if (VW > 1 && vec)
    detail::layernorm_backward_kernel<C, VW, S><<<blocks, detail::ln_warps * 32, 0, ctx.stream()>>>(
        d_in, partial, d_out, in, mean, rstd, weight, d_residual, rows);
  else
    detail::layernorm_backward_kernel<C, 1, S><<<blocks, detail::ln_warps * 32, 0, ctx.stream()>>>(
        d_in, partial, d_out, in, mean, rstd, weight, d_residual, rows);
  CLIP_CUDA_CHECK(cudaGetLastError());
  constexpr int n = 2 * C;
  detail::add_partials_kernel<><<<(n + 255) / 256, 256, 0, ctx.stream()>>>(d_weight, d_bias, partial, n, blocks);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
