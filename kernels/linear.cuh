// Fully connected layers on the GPU, mirroring include/clip/ops/linear.hpp:
//   linear:     out[rows, Out] = in[rows, In] W^T + b (+ residual), W [Out, In] (nn.Linear)
//   projection: out[rows, Out] = in[rows, In] P, P [In, Out] (visual.proj, text_projection)
// Forward passes are one cuBLASLt product each, bias and residual folded into its epilogue.
// Backward: weight gradients accumulate in fp32 (+=), activation gradients are assigned in S.
// Also here: the deterministic column sums of a bias gradient and the storage conversions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/gemm.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

// ---------------------------------------------------------------------------------------------
// Column sums: sums[N] += Σ_r x[r, :]. Deterministic (no atomics): rows are cut into chunks of a
// size that depends on rows and N alone; pass 1 sums each chunk of 32 columns in one block (8
// threads per column, each over a fixed stride of rows, then a fixed-order tree in shared memory),
// pass 2 adds the chunk sums in chunk order. Partial sums live in ctx.workspace().

namespace detail {

inline constexpr int sums_cols = 32;      // columns per block (one warp across)
inline constexpr int sums_lanes = 8;      // threads per column
inline constexpr int64_t sums_min_rows = 256;  // rows per chunk at least (a chunk is one block)

// partial[chunk, col] (or sums[col] += when accumulate) = Σ over rows of chunk of x[r, col].
template <class S>
__global__ void column_sums_chunk_kernel(float* out, const S* x, int64_t rows, int n, int64_t rows_per_chunk,
                                         bool accumulate) {
  __shared__ float part[sums_lanes][sums_cols + 1];
  const int col = blockIdx.x * sums_cols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  float acc = 0.0f;
  if (col < n)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += sums_lanes) acc += to_float(x[r * n + col]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float s = part[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < sums_lanes; ++i) s += part[i][threadIdx.x];
    float* dst = out + static_cast<int64_t>(blockIdx.y) * n + col;
    if (accumulate) {
      *dst += s;
    } else {
      *dst = s;
    }
  }
}

// sums[col] += Σ_chunk partial[chunk, col], in chunk order.
// (A template so that the header can be included by several translation units.)
template <class Unused = void>
__global__ void column_sums_finish_kernel(float* sums, const float* partial, int chunks, int n) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.0f;
  for (int c = 0; c < chunks; ++c) s += partial[static_cast<int64_t>(c) * n + col];
  sums[col] += s;
}

}  // namespace detail

// sums[N] += Σ_rows x[rows, N] (fp32). Uses ctx.workspace() as scratch.
template <int N, class S>
void column_sums_accumulate(Context& ctx, float* sums, const S* x, int64_t rows) {
  static_assert(N > 0, "column sums need a positive number of columns");
  CLIP_CHECK(rows >= 0, "column sums of ", rows, " rows");
  if (rows == 0) return;
  // Enough chunks to give ~1000 blocks, each of at least sums_min_rows rows, and the partials must
  // fit the workspace. A function of (rows, N, workspace) only: the same shape sums the same way.
  constexpr int64_t col_blocks = (N + detail::sums_cols - 1) / detail::sums_cols;
  const int64_t by_rows = (rows + detail::sums_min_rows - 1) / detail::sums_min_rows;
  const int64_t by_blocks = std::max<int64_t>(1, 1024 / col_blocks);
  const int64_t by_workspace = static_cast<int64_t>(ctx.workspace_bytes() / (sizeof(float) * N));
  int64_t chunks = std::max<int64_t>(1, std::min({by_rows, by_blocks, by_workspace, int64_t{65535}}));
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const dim3 block(detail::sums_cols, detail::sums_lanes);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  if (chunks == 1) {
    detail::column_sums_chunk_kernel<S><<<grid, block, 0, ctx.stream()>>>(sums, x, rows, N, rows_per_chunk, true);
  } else {
    auto* partial = static_cast<float*>(ctx.workspace());
    detail::column_sums_chunk_kernel<S>
        <<<grid, block, 0, ctx.stream()>>>(partial, x, rows, N, rows_per_chunk, false);
    CLIP_CUDA_CHECK(cudaGetLastError());
    detail::column_sums_finish_kernel<><<<static_cast<unsigned>((N + 255) / 256), 256, 0, ctx.stream()>>>(
        sums, partial, static_cast<int>(chunks), N);
  }
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// Conversions between storage types: out[i] = In -> fp32 -> Out (round to nearest even into bf16).

namespace detail {
template <class To, class From>
__global__ void convert_kernel(To* out, const From* in, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<To>(to_float(in[i]));
}
}  // namespace detail

// out[n] = in[n] converted: float -> S (convert<S>(ctx, out, in, n)), S -> float, or S -> S copies.
template <class To, class From>
void convert(Context& ctx, To* out, const From* in, int64_t n) {
  static_assert(is_storage_type<To> && is_storage_type<From>, "conversions are between float and bf16");
  CLIP_CHECK(n >= 0, "cannot convert ", n, " elements");
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  detail::convert_kernel<To, From><<<static_cast<unsigned>(blocks), 256, 0, ctx.stream()>>>(out, in, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// Linear layers.

// out[rows, Out] = in[rows, In] W^T + b (+ residual[rows, Out]). W [Out, In]; b [Out] or null;
// residual may be out itself (in-place residual update) or null. out must not overlap in.
template <int In, int Out, class S>
void linear_forward(Context& ctx, S* out, const S* in, const S* w, const S* b, int64_t rows,
                    const S* residual = nullptr) {
  static_assert(In > 0 && Out > 0, "a linear layer needs positive input and output sizes");
  CLIP_CHECK(rows >= 0, "a linear layer over ", rows, " rows");
  GemmEpilogue<S> e;
  e.bias = b;
  if (residual) {
    e.beta = 1;
    e.c = residual;
    e.ldc = Out;
  }
  gemm_nt(ctx, rows, Out, In, in, In, w, In, out, Out, e);
}

// Backward of linear_forward (a residual's gradient is d_out itself):
//   d_w[Out, In] += d_out^T in (fp32), d_b[Out] += column sums of d_out (skipped when null),
//   d_in[rows, In] = d_out W (assigned; skipped when null).
// The weight gradient is taken first, so d_in may be the buffer `in` (as on the CPU). S is deduced
// from d_out, so d_in may be passed as nullptr.
template <int In, int Out, class S>
void linear_backward(Context& ctx, std::type_identity_t<S>* d_in, float* d_w, float* d_b, const S* d_out, const S* in, const S* w,
                     int64_t rows) {
  static_assert(In > 0 && Out > 0, "a linear layer needs positive input and output sizes");
  CLIP_CHECK(rows >= 0, "a linear layer over ", rows, " rows");
  if (rows == 0) return;
  GemmEpilogue<float> acc;
  acc.beta = 1;
  gemm_tn(ctx, Out, In, rows, d_out, Out, in, In, d_w, In, acc);
  if (d_b) column_sums_accumulate<Out>(ctx, d_b, d_out, rows);
  if (d_in) gemm_nn(ctx, rows, In, Out, d_out, Out, w, In, d_in, In);
}

// out[rows, Out] = in[rows, In] P, P stored [In, Out] and used as is.
template <int In, int Out, class S>
void projection_forward(Context& ctx, S* out, const S* in, const S* p, int64_t rows) {
  static_assert(In > 0 && Out > 0, "a projection needs positive input and output sizes");
  CLIP_CHECK(rows >= 0, "a projection over ", rows, " rows");
  gemm_nn(ctx, rows, Out, In, in, In, p, Out, out, Out);
}

// Backward of projection_forward: d_p[In, Out] += in^T d_out (fp32), d_in = d_out P^T (assigned;
// skipped when null). As in linear_backward, d_in may be the buffer `in`.
template <int In, int Out, class S>
void projection_backward(Context& ctx, std::type_identity_t<S>* d_in, float* d_p, const S* d_out, const S* in, const S* p, int64_t rows) {
  static_assert(In > 0 && Out > 0, "a projection needs positive input and output sizes");
  CLIP_CHECK(rows >= 0, "a projection over ", rows, " rows");
  if (rows == 0) return;
  GemmEpilogue<float> acc;
  acc.beta = 1;
  gemm_tn(ctx, In, Out, rows, in, In, d_out, Out, d_p, Out, acc);
  if (d_in) gemm_nt(ctx, rows, In, Out, d_out, Out, p, Out, d_in, In);
}

}  // namespace clip::cuda
