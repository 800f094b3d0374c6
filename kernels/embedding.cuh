// Transformer inputs and pooling, mirroring the CPU code:
//   text:   token + positional embedding (include/clip/ops/embedding.hpp embedding_forward/backward)
//   pool:   one row per sample, the end-of-text position or the class token (TextTransformer,
//           VisionTransformer: memcpy of the pooled row; backward scatters it into zeros)
//   vision: patch im2col, [class token; patches] + positional embedding and its backward
//           (VisionTransformer::im2col, add_tokens and the end of backward).
// Every gradient here is deterministic (no atomics), and in fp32 mode the parameter gradients are
// the CPU's bits: each sum starts from the accumulated value and adds rows in the CPU's order.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/ops/quick_gelu_math.hpp"  // patch_pixel_index
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace detail {

// Blocks for a grid-stride loop over n items with `threads` per block (capped; the loops stride).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t wanted = (n + threads - 1) / threads;
  return static_cast<unsigned>(wanted < 65536 ? (wanted > 0 ? wanted : 1) : 65536);
}

// x[b, t, j] = wte[tokens[b, t], j] + wpe[t, j] for t < tokens_per_row.
template <int C, class S>
__global__ void token_embedding_forward_kernel(S* x, const int32_t* tokens, int64_t context, int64_t tokens_per_row,
                                               const S* wte, const S* wpe, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / C, j = i % C;
    const int64_t b = r / tokens_per_row, t = r % tokens_per_row;
    const int64_t id = tokens[b * context + t];
    x[i] = from_float<S>(to_float(wte[id * C + j]) + to_float(wpe[t * C + j]));
  }
}

inline constexpr int embed_threads = 128;

// d_wte[id] += Σ d_x[r] over the rows r whose token is id, in row order, without atomics: block r
// leaves unless row r is the FIRST row holding its id; that leader block then adds every row with
// the id, in order, starting from d_wte[id] (the CPU's order and bits in fp32). Finding earlier
// and later rows scans the token ids (cheap next to the C-wide rows).
template <int C, class S>
__global__ void __launch_bounds__(embed_threads)
    token_embedding_backward_kernel(float* d_wte, const S* d_x, const int32_t* tokens, int64_t context,
                                    int64_t tokens_per_row, int64_t rows) {
  constexpr int per_thread = (C + embed_threads - 1) / embed_threads;
  __shared__ unsigned match_mask[embed_threads / 32];
  const int64_t r = blockIdx.x;
  const auto id_of = [&](int64_t row) { return tokens[(row / tokens_per_row) * context + row % tokens_per_row]; };
  const int32_t id = id_of(r);
  // Leader check: does a row before r hold the same id? (uniform across the block)
  for (int64_t c0 = 0; c0 < r; c0 += embed_threads) {
    const int64_t rr = c0 + threadIdx.x;
    if (__syncthreads_or(rr < r && id_of(rr) == id)) return;
  }
  float acc[per_thread];
#pragma unroll
  for (int i = 0; i < per_thread; ++i) {
    const int j = threadIdx.x + embed_threads * i;
    acc[i] = j < C ? d_wte[int64_t{id} * C + j] : 0.0f;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  for (int64_t c0 = r; c0 < rows; c0 += embed_threads) {
    const int64_t rr = c0 + threadIdx.x;
    const unsigned m = __ballot_sync(0xffffffffu, rr < rows && id_of(rr) == id);
    if (lane == 0) match_mask[warp] = m;
    __syncthreads();
    for (int w = 0; w < embed_threads / 32; ++w) {
      unsigned bits = match_mask[w];
      while (bits) {  // matching rows of this chunk in increasing order
        const int k = __ffs(bits) - 1;
        bits &= bits - 1;
        const S* g = d_x + (c0 + 32 * w + k) * C;
#pragma unroll
        for (int i = 0; i < per_thread; ++i) {
          const int j = threadIdx.x + embed_threads * i;
          if (j < C) acc[i] += to_float(g[j]);
        }
      }
    }
    __syncthreads();  // match_mask is rewritten by the next chunk
  }
#pragma unroll
  for (int i = 0; i < per_thread; ++i) {
    const int j = threadIdx.x + embed_threads * i;
    if (j < C) d_wte[int64_t{id} * C + j] = acc[i];
  }
}

// d_wpe[t, j] += Σ_b d_x[b, t, j], b in order (one thread per (t, j)).
template <int C, class S>
__global__ void positional_embedding_backward_kernel(float* d_wpe, const S* d_x, int64_t tokens_per_row,
                                                     int64_t batch) {
  const int64_t n = tokens_per_row * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    float acc = d_wpe[i];
    for (int64_t b = 0; b < batch; ++b) acc += to_float(d_x[b * n + i]);
    d_wpe[i] = acc;
  }
}

// out[b, j] = x[b, pos[b], j]
template <int C, class S>
__global__ void gather_rows_kernel(S* out, const S* x, const int32_t* pos, int64_t t, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / C, j = i % C;
    out[i] = x[(b * t + pos[b]) * C + j];
  }
}

// d_x[b, s, j] = s == pos[b] ? d_out[b, j] : 0
template <int C, class S>
__global__ void scatter_rows_kernel(S* d_x, const S* d_out, const int32_t* pos, int64_t t, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / C, j = i % C;
    const int64_t b = r / t, s = r % t;
    d_x[i] = s == pos[b] ? d_out[b * C + j] : from_float<S>(0.0f);
  }
}

// patches[row, k] = images[patch_pixel_index(row, k)] (one thread per output element: writes are
// coalesced, reads run along image rows for Patch consecutive k).
template <int R, int Patch, class S>
__global__ void patch_im2col_kernel(S* patches, const float* images, int64_t n) {
  constexpr int P = 3 * Patch * Patch;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    patches[i] = from_float<S>(images[clip::patch_pixel_index<R, Patch>(i / P, static_cast<int>(i % P))]);
}

// x[b, t] = (t == 0 ? cls : embedded[b, t - 1]) + pos[t]
template <int N, int C, class S>
__global__ void add_class_and_positions_kernel(S* x, const S* embedded, const S* cls, const S* pos, int64_t n) {
  constexpr int T = N + 1;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / C, j = i % C;
    const int64_t b = r / T, t = r % T;
    const S src = t == 0 ? cls[j] : embedded[(b * N + t - 1) * C + j];
    x[i] = from_float<S>(to_float(src) + to_float(pos[t * C + j]));
  }
}

// One thread per (t, j): d_pos[t, j] += Σ_b d_x[b, t, j] (from zero, then added: the CPU's
// column_sums_accumulate); d_cls[j] += d_x[b, 0, j] for b in order (the CPU's loop); rows t > 0
// are copied to d_embedded[b, t - 1].
template <int N, int C, class S>
__global__ void class_and_positions_backward_kernel(S* d_embedded, float* d_cls, float* d_pos, const S* d_x,
                                                    int64_t batch) {
  constexpr int T = N + 1;
  constexpr int64_t n = int64_t{T} * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / C, j = i % C;
    float acc = 0.0f;
    float cls = t == 0 && d_cls ? d_cls[j] : 0.0f;
    for (int64_t b = 0; b < batch; ++b) {
      const S g = d_x[b * n + i];
      const float gf = to_float(g);
      acc += gf;
      if (t == 0)
        cls += gf;
      else if (d_embedded)
        d_embedded[(b * N + t - 1) * C + j] = g;
    }
    if (d_pos) d_pos[i] += acc;
    if (t == 0 && d_cls) d_cls[j] = cls;
  }
}

}  // namespace detail

// Text input: x[b, t] = wte[tokens[b, t]] + wpe[t] for t < tokens_per_row. Each row of `tokens`
// holds `context` ids (tokens_per_row <= context). Ids must lie in [0, V): the caller checks them
// on the host (check_token_ids), the kernel does not.
template <int C, class S>
void token_embedding_forward(Context& ctx,
                             S* x,                    // [B, tokens_per_row, C]
                             const int32_t* tokens,   // device [B, context]
                             int64_t context, int64_t tokens_per_row,
                             const S* wte,            // [V, C]
                             const S* wpe,            // [context, C]
                             int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(C > 0, "an embedding needs a positive width");
  CLIP_CHECK(batch >= 0 && tokens_per_row >= 0 && tokens_per_row <= context,
             "token_embedding_forward: bad shape (batch ", batch, ", ", tokens_per_row, " of ", context, " tokens)");
  const int64_t n = batch * tokens_per_row * C;
  if (n == 0) return;
  detail::token_embedding_forward_kernel<C, S>
      <<<detail::grid_for(n, 256), 256, 0, ctx.stream()>>>(x, tokens, context, tokens_per_row, wte, wpe, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// Backward of token_embedding_forward: d_wte[tokens[b, t]] += d_x[b, t] (rows of absent ids stay
// untouched), d_wpe[t] += Σ_b d_x[b, t] (null: skipped). DETERMINISTIC, no atomics: each distinct
// id is summed by one block in row order (fp32 mode: the CPU's bits).
template <int C, class S>
void token_embedding_backward(Context& ctx,
                              float* d_wte,           // [V, C]
                              float* d_wpe,           // [context, C] or null
                              const S* d_x,           // [B, tokens_per_row, C]
                              const int32_t* tokens,  // device [B, context]
                              int64_t context, int64_t tokens_per_row, int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(C > 0, "an embedding needs a positive width");
  CLIP_CHECK(batch >= 0 && tokens_per_row >= 0 && tokens_per_row <= context,
             "token_embedding_backward: bad shape (batch ", batch, ", ", tokens_per_row, " of ", context, " tokens)");
  const int64_t rows = batch * tokens_per_row;
  if (rows == 0) return;
  CLIP_CHECK(rows <= 0x7fffffff, "token_embedding_backward: too many rows (", rows, ")");
  detail::token_embedding_backward_kernel<C, S><<<static_cast<unsigned>(rows), detail::embed_threads, 0,
                                                   ctx.stream()>>>(d_wte, d_x, tokens, context, tokens_per_row, rows);
  CLIP_CUDA_CHECK(cudaGetLastError());
  if (d_wpe) {
    detail::positional_embedding_backward_kernel<C, S>
        <<<detail::grid_for(tokens_per_row * C, 256), 256, 0, ctx.stream()>>>(d_wpe, d_x, tokens_per_row, batch);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
}

// Pooling: out[b] = x[b, pos[b]] (the end-of-text token; the class token is pos 0). pos[b] < t.
template <int C, class S>
void gather_rows(Context& ctx,
                 S* out,                // [B, C]
                 const S* x,            // [B, t, C]
                 const int32_t* pos,    // device [B]
                 int64_t t, int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  CLIP_CHECK(batch >= 0 && t > 0, "gather_rows: bad shape (batch ", batch, ", ", t, " tokens)");
  const int64_t n = batch * C;
  if (n == 0) return;
  detail::gather_rows_kernel<C, S><<<detail::grid_for(n, 256), 256, 0, ctx.stream()>>>(out, x, pos, t, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// Backward of gather_rows: d_x[b, pos[b]] = d_out[b], every other row of d_x zero (assigned).
template <int C, class S>
void scatter_rows(Context& ctx,
                  S* d_x,               // [B, t, C]
                  const S* d_out,       // [B, C]
                  const int32_t* pos,   // device [B]
                  int64_t t, int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  CLIP_CHECK(batch >= 0 && t > 0, "scatter_rows: bad shape (batch ", batch, ", ", t, " tokens)");
  const int64_t n = batch * t * C;
  if (n == 0) return;
  detail::scatter_rows_kernel<C, S><<<detail::grid_for(n, 256), 256, 0, ctx.stream()>>>(d_x, d_out, pos, t, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// ViT input: row (b, gy, gx) of patches holds that patch in conv1.weight's (c, ky, kx) order,
// rounded to S (VisionTransformer::im2col).
template <int R, int Patch, class S>
void patch_im2col(Context& ctx,
                  S* patches,            // [B, N, 3 Patch^2], N = (R / Patch)^2
                  const float* images,   // [B, 3, R, R]
                  int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(R > 0 && Patch > 0 && R % Patch == 0, "the image side must be a multiple of the patch side");
  CLIP_CHECK(batch >= 0, "patch_im2col: negative batch (", batch, ")");
  constexpr int64_t per_image = int64_t{R / Patch} * (R / Patch) * 3 * Patch * Patch;
  const int64_t n = batch * per_image;
  if (n == 0) return;
  detail::patch_im2col_kernel<R, Patch, S><<<detail::grid_for(n, 256), 256, 0, ctx.stream()>>>(patches, images, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// x[b] = [cls; embedded[b]] + pos (VisionTransformer::add_tokens), rounded once to S.
template <int N, int C, class S>
void add_class_and_positions(Context& ctx,
                             S* x,                // [B, N + 1, C]
                             const S* embedded,   // [B, N, C]
                             const S* cls,        // [C]
                             const S* pos,        // [N + 1, C]
                             int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(N > 0 && C > 0, "a vision transformer needs patches and channels");
  CLIP_CHECK(batch >= 0, "add_class_and_positions: negative batch (", batch, ")");
  const int64_t n = batch * (N + 1) * C;
  if (n == 0) return;
  detail::add_class_and_positions_kernel<N, C, S>
      <<<detail::grid_for(n, 256), 256, 0, ctx.stream()>>>(x, embedded, cls, pos, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// Backward of add_class_and_positions: d_embedded[b] = d_x[b, 1:] (assigned; null: skipped),
// d_cls += Σ_b d_x[b, 0], d_pos += Σ_b d_x[b] (either null: skipped). Deterministic.
template <int N, int C, class S>
void class_and_positions_backward(Context& ctx,
                                  S* d_embedded,   // [B, N, C] or null
                                  float* d_cls,    // [C] or null
                                  float* d_pos,    // [N + 1, C] or null
                                  const S* d_x,    // [B, N + 1, C]
                                  int64_t batch) {
  static_assert(is_storage_type<S>, "activations are float or bf16");
  static_assert(N > 0 && C > 0, "a vision transformer needs patches and channels");
  CLIP_CHECK(batch >= 0, "class_and_positions_backward: negative batch (", batch, ")");
  if (batch == 0) return;
  constexpr int64_t n = int64_t{N + 1} * C;
  detail::class_and_positions_backward_kernel<N, C, S>
      <<<detail::grid_for(n, 128), 128, 0, ctx.stream()>>>(d_embedded, d_cls, d_pos, d_x, batch);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
