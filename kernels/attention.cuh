// Fused multi-head attention: out = softmax(q k^T * scale [+ causal mask]) v per head, never
// materialising the T x T scores (FlashAttention's online softmax), and its backward pass in the
// FlashAttention-2 form without atomics:
//   forward   one thread per query row; K/V tiles staged in shared memory as fp32; keeps the
//             logsumexp of each row [B, H, tq] for the backward pass.
//   backward  (1) delta_i = rowsum(dO_i * O_i) into scratch [B, H, tq];
//             (2) dQ: one thread per query row, looping over keys;
//             (3) dK, dV: one thread per key row, looping over queries;
//             both recompute p = exp(q.k * scale - lse) instead of reading saved probabilities.
// Every row's arithmetic is the CLIP_HOST_DEVICE code of include/clip/ops/online_softmax.hpp, in
// the key / query order described there, which tests/test_cuda_host_attention.cpp replays on the
// CPU against clip's attention. All reads go through AttentionLayout strides, so one kernel serves
// a block's packed qkv [B, t, 3C] and the ResNet attention pool (tq = 1, q rows C apart).
//
// Shapes: B batch, H heads, D head dim (static), tq query rows, tk key rows (tk <= TMax, static
// bound). Head h of a row is columns [h*D, (h+1)*D). S is float or bf16; accumulation is fp32.
//
// Why one thread per row rather than tensor-core tiles: CLIP's sequences are short (50..257
// tokens, 77 for text) and D = 64, so attention is a small share of a step next to the GEMMs; the
// simple form keeps the kernels' arithmetic identical to a host loop we can test without a GPU.
// A tensor-core version can replace these kernels behind the same launchers.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/ops/online_softmax.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

// Strides (in elements) of the four row sets; head h of a row is columns [h*D, (h+1)*D).
struct AttentionLayout {
  int64_t q_row, k_row, v_row, o_row;          // between rows (tokens) of one sample
  int64_t q_batch, k_batch, v_batch, o_batch;  // between samples
};

namespace attention_detail {

// dst[r * ld + d] = float(src[r * row + d]) for r < n, d < D: the block stages n rows of one head
// (consecutive threads read consecutive columns of a row: coalesced).
template <int D, class S>
__device__ inline void stage_rows(float* dst, int ld, const S* src, int64_t row, int n) {
  for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    dst[r * ld + d] = to_float<S>(src[r * row + d]);
  }
}

// Keys of sample b's per-sample limit (-1: none).
__device__ inline int64_t last_key_of(const int32_t* last_key, int64_t b) { return last_key ? last_key[b] : -1; }

// ---------------------------------------------------------------------------------------------
// Forward: grid = B * H * ceil(tq / rows) blocks of `rows` threads; thread = query row i.
template <int D, int TMax, bool Causal, class S>
__global__ void __launch_bounds__(AttentionTiles<D, TMax>::rows)
    forward_kernel(S* out, float* lse, const S* q, const S* k, const S* v, AttentionLayout L, int heads, int64_t tq,
                   int64_t tk, int64_t q_tiles, float scale, int64_t q_offset, const int32_t* last_key) {
  using Tiles = AttentionTiles<D, TMax>;
  __shared__ float ks[Tiles::keys * D];  // [keys, D]
  __shared__ float vs[Tiles::keys * D];  // [keys, D]
  const int64_t tile = blockIdx.x % q_tiles;
  const int64_t bh = blockIdx.x / q_tiles;
  const int64_t h = bh % heads, b = bh / heads;
  const int64_t i0 = tile * Tiles::rows;
  const int64_t i = i0 + threadIdx.x;
  const bool active = i < tq;
  const int64_t lk = last_key_of(last_key, b);
  // The block stages the keys its last row sees (the most of any of its rows).
  const int64_t i_last = (i0 + Tiles::rows < tq ? i0 + Tiles::rows : tq) - 1;
  const int64_t block_keys = attention_key_limit(i_last, tk, Causal, q_offset, lk);
  const int64_t my_keys = active ? attention_key_limit(i, tk, Causal, q_offset, lk) : 0;

  float qr[D];  // q row in registers
  float acc[D];
  const S* qp = q + b * L.q_batch + i * L.q_row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? to_float<S>(qp[d]) : 0.0f;
    acc[d] = 0.0f;
  }
  OnlineSoftmax st;
  const S* kb = k + b * L.k_batch + h * D;
  const S* vb = v + b * L.v_batch + h * D;
  for (int64_t j0 = 0; j0 < block_keys; j0 += Tiles::keys) {
    const int n_tile = static_cast<int>(block_keys - j0 < Tiles::keys ? block_keys - j0 : Tiles::keys);
    __syncthreads();  // every thread is done with the previous tile
    stage_rows<D>(ks, D, kb + j0 * L.k_row, L.k_row, n_tile);
    stage_rows<D>(vs, D, vb + j0 * L.v_row, L.v_row, n_tile);
    __syncthreads();
    for (int c = 0; c < n_tile; c += attention_key_chunk) {
      const int64_t left = my_keys - (j0 + c);
      if (left <= 0) break;
      const int n = static_cast<int>(left < attention_key_chunk ? left : attention_key_chunk);
      attention_forward_chunk<D>(st, acc, qr, ks + c * D, vs + c * D, D, n, scale);
    }
  }
  if (!active) return;
  const float row_lse = attention_forward_finish<D>(st, acc);
  S* op = out + b * L.o_batch + i * L.o_row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) op[d] = from_float<S>(acc[d]);
  if (lse) lse[bh * tq + i] = row_lse;
}

// ---------------------------------------------------------------------------------------------
// Backward (1): delta [B, H, tq] = rowsum(dO * O), one thread per (b, h, i).
template <int D, class S>
__global__ void delta_kernel(float* delta, const S* d_out, const S* out, AttentionLayout L, int heads, int64_t tq,
                             int64_t rows) {
  const int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;  // (b * H + h) * tq + i
  if (r >= rows) return;
  const int64_t i = r % tq, bh = r / tq;
  const int64_t h = bh % heads, b = bh / heads;
  const int64_t off = b * L.o_batch + i * L.o_row + h * D;  // d_out has out's layout
  float o[D], g[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    o[d] = to_float<S>(out[off + d]);
    g[d] = to_float<S>(d_out[off + d]);
  }
  delta[r] = attention_delta<D>(o, g);
}

// Backward (2): dQ, same grid as the forward; thread = query row i, K/V tiles of dq_keys keys.
// dO and the dq accumulator sit in registers, the block's q rows in shared memory (padded).
template <int D, int TMax, bool Causal, class S>
__global__ void __launch_bounds__(AttentionTiles<D, TMax>::rows)
    dq_kernel(S* d_q, const S* d_out, const S* q, const S* k, const S* v, const float* lse, const float* delta,
              AttentionLayout L, int heads, int64_t tq, int64_t tk, int64_t q_tiles, float scale, int64_t q_offset,
              const int32_t* last_key) {
  using Tiles = AttentionTiles<D, TMax>;
  __shared__ float ks[Tiles::dq_keys * D];               // [dq_keys, D]
  __shared__ float vs[Tiles::dq_keys * D];               // [dq_keys, D]
  __shared__ float own_q[Tiles::rows * Tiles::own_ld];  // [rows, D + 1]
  const int64_t tile = blockIdx.x % q_tiles;
  const int64_t bh = blockIdx.x / q_tiles;
  const int64_t h = bh % heads, b = bh / heads;
  const int64_t i0 = tile * Tiles::rows;
  const int64_t i = i0 + threadIdx.x;
  const bool active = i < tq;
  const int64_t lk = last_key_of(last_key, b);
  const int64_t i_last = (i0 + Tiles::rows < tq ? i0 + Tiles::rows : tq) - 1;
  const int64_t block_keys = attention_key_limit(i_last, tk, Causal, q_offset, lk);
  const int64_t my_keys = active ? attention_key_limit(i, tk, Causal, q_offset, lk) : 0;

  const int n_own = static_cast<int>(i_last + 1 - i0);
  stage_rows<D>(own_q, Tiles::own_ld, q + b * L.q_batch + i0 * L.q_row + h * D, L.q_row, n_own);
  // volatile: read at each use rather than hoisted into registers (see dkv_kernel)
  const volatile float* qr = own_q + threadIdx.x * Tiles::own_ld;
  float gr[D], dq[D];
  const S* gp = d_out + b * L.o_batch + i * L.o_row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    gr[d] = active ? to_float<S>(gp[d]) : 0.0f;
    dq[d] = 0.0f;
  }
  const float row_lse = active ? lse[bh * tq + i] : 0.0f;
  const float row_delta = active ? delta[bh * tq + i] : 0.0f;
  const S* kb = k + b * L.k_batch + h * D;
  const S* vb = v + b * L.v_batch + h * D;
  for (int64_t j0 = 0; j0 < block_keys; j0 += Tiles::dq_keys) {
    const int n_tile = static_cast<int>(block_keys - j0 < Tiles::dq_keys ? block_keys - j0 : Tiles::dq_keys);
    __syncthreads();  // own q rows staged / every thread is done with the previous tile
    stage_rows<D>(ks, D, kb + j0 * L.k_row, L.k_row, n_tile);
    stage_rows<D>(vs, D, vb + j0 * L.v_row, L.v_row, n_tile);
    __syncthreads();
    for (int c = 0; c < n_tile; c += attention_key_chunk) {
      const int64_t left = my_keys - (j0 + c);
      if (left <= 0) break;
      const int n = static_cast<int>(left < attention_key_chunk ? left : attention_key_chunk);
      attention_dq_chunk<D>(dq, qr, gr, row_lse, row_delta, ks + c * D, vs + c * D, D, n, scale);
    }
  }
  if (!active) return;
  S* dp = d_q + b * L.q_batch + i * L.q_row + h * D;  // d_q has q's layout
#pragma unroll
  for (int d = 0; d < D; ++d) dp[d] = from_float<S>(dq[d] * scale);
}

// Backward (3): dK, dV; grid = B * H * ceil(tk / rows) blocks; thread = key row j. Its own k, v
// rows sit in shared memory (padded rows: the two D-long accumulators already fill the
// registers); Q/dO tiles of `queries` rows, with their lse and delta, are staged in turn.
template <int D, int TMax, bool Causal, class S>
__global__ void __launch_bounds__(AttentionTiles<D, TMax>::rows)
    dkv_kernel(S* d_k, S* d_v, const S* d_out, const S* q, const S* k, const S* v, const float* lse,
               const float* delta, AttentionLayout L, int heads, int64_t tq, int64_t tk, int64_t k_tiles, float scale,
               int64_t q_offset, const int32_t* last_key) {
  using Tiles = AttentionTiles<D, TMax>;
  constexpr int Q = Tiles::queries;
  __shared__ float own_k[Tiles::rows * Tiles::own_ld];  // [rows, D + 1]
  __shared__ float own_v[Tiles::rows * Tiles::own_ld];  // [rows, D + 1]
  __shared__ float qs[Q * D];                           // [Q, D]
  __shared__ float gs[Q * D];                           // [Q, D] dO
  __shared__ float ls[Q], es[Q];                        // lse, delta of the staged queries
  const int64_t tile = blockIdx.x % k_tiles;
  const int64_t bh = blockIdx.x / k_tiles;
  const int64_t h = bh % heads, b = bh / heads;
  const int64_t j0 = tile * Tiles::rows;
  const int64_t j = j0 + threadIdx.x;
  const int64_t lk = last_key_of(last_key, b);
  const int n_own = static_cast<int>(tk - j0 < Tiles::rows ? tk - j0 : Tiles::rows);
  // A key past the sample's last_key is seen by no query: its gradients are 0.
  const bool active = j < tk && (lk < 0 || j <= lk);
  const bool block_seen = lk < 0 || j0 <= lk;  // uniform over the block

  stage_rows<D>(own_k, Tiles::own_ld, k + b * L.k_batch + j0 * L.k_row + h * D, L.k_row, n_own);
  stage_rows<D>(own_v, Tiles::own_ld, v + b * L.v_batch + j0 * L.v_row + h * D, L.v_row, n_own);
  // volatile: read k, v from shared memory at each use. Otherwise the compiler hoists all 2 D of
  // them into registers next to the 2 D accumulators and spills (444 bytes per thread at D = 64).
  const volatile float* kr = own_k + threadIdx.x * Tiles::own_ld;
  const volatile float* vr = own_v + threadIdx.x * Tiles::own_ld;
  float dk[D], dv[D];
#pragma unroll
  for (int d = 0; d < D; ++d) dk[d] = dv[d] = 0.0f;

  const int64_t my_first = attention_first_query(j, Causal, q_offset);
  // Query tiles start at multiples of Q (the host replay's chunks), from the block's first key's.
  const int64_t first = block_seen ? attention_first_query(j0, Causal, q_offset) / Q * Q : tq;
  const S* qb = q + b * L.q_batch + h * D;
  const S* gb = d_out + b * L.o_batch + h * D;
  for (int64_t i0 = first; i0 < tq; i0 += Q) {
    const int n = static_cast<int>(tq - i0 < Q ? tq - i0 : Q);
    __syncthreads();  // the own rows are staged / every thread is done with the previous tile
    stage_rows<D>(qs, D, qb + i0 * L.q_row, L.q_row, n);
    stage_rows<D>(gs, D, gb + i0 * L.o_row, L.o_row, n);
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
      ls[r] = lse[bh * tq + i0 + r];
      es[r] = delta[bh * tq + i0 + r];
    }
    __syncthreads();
    if (!active) continue;
    const int64_t skip = my_first - i0;
    if (skip >= n) continue;
    const int begin = static_cast<int>(skip > 0 ? skip : 0);
    attention_dkv_chunk<D>(dk, dv, kr, vr, qs, gs, D, ls, es, begin, n, scale);
  }
  if (j >= tk) return;
  S* dkp = d_k + b * L.k_batch + j * L.k_row + h * D;  // d_k, d_v have k's and v's layouts
  S* dvp = d_v + b * L.v_batch + j * L.v_row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    dkp[d] = from_float<S>(dk[d] * scale);
    dvp[d] = from_float<S>(dv[d]);
  }
}

template <int D, int TMax, bool Causal>
inline void check_shapes(int64_t batch, int heads, int64_t tq, int64_t tk, int64_t q_offset) {
  CLIP_CHECK(batch >= 0 && heads > 0, "attention needs a non-negative batch and a positive head count (got ", batch,
             " and ", heads, ")");
  CLIP_CHECK(tq > 0 && tk > 0, "attention needs at least one query and one key (got ", tq, " and ", tk, ")");
  CLIP_CHECK(tk <= TMax, "these attention kernels were built for at most ", TMax, " keys, not ", tk);
  CLIP_CHECK(!Causal || q_offset >= 0, "causal attention needs a non-negative query offset (got ", q_offset, ")");
  const int64_t rows = AttentionTiles<D, TMax>::rows;
  const int64_t tiles = (tq > tk ? tq : tk) + rows - 1;
  CLIP_CHECK(batch * heads * (tiles / rows) < (int64_t{1} << 31), "attention over ", batch, " samples of ", heads,
             " heads needs more blocks than one launch holds");
}

}  // namespace attention_detail

// out [B, tq, H*D] (o_* strides) = softmax(q k^T * scale [+ causal mask]) v for `heads` heads;
// lse [B, H, tq] float (logsumexp of each row, for backward; may be null).
// Causal: query i (0-based) sees keys j <= i + q_offset (the CPU op's mask is q_offset = tk - tq).
// last_key (extension; device [B] or null): sample b's queries see keys j <= last_key[b] only, as
// the CPU op's last_key (a caption's pooled position attending its causal prefix).
template <int D, int TMax, bool Causal, class S>
void attention_forward(Context& ctx, S* out, float* lse, const S* q, const S* k, const S* v, const AttentionLayout& L,
                       int64_t batch, int heads, int64_t tq, int64_t tk, float scale, int64_t q_offset = 0,
                       const int32_t* last_key = nullptr) {
  static_assert(is_storage_type<S>, "attention stores float or bf16");
  attention_detail::check_shapes<D, TMax, Causal>(batch, heads, tq, tk, q_offset);
  if (batch == 0) return;
  using Tiles = AttentionTiles<D, TMax>;
  const int64_t q_tiles = (tq + Tiles::rows - 1) / Tiles::rows;
  const int64_t blocks = batch * heads * q_tiles;
  attention_detail::forward_kernel<D, TMax, Causal, S><<<static_cast<unsigned>(blocks), Tiles::rows, 0, ctx.stream()>>>(
      out, lse, q, k, v, L, heads, tq, tk, q_tiles, scale, q_offset, last_key);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// d_q, d_k, d_v (same layouts as q, k, v; assigned; may share one packed buffer, must not overlap
// the inputs) from d_out (out's layout), the forward's inputs, out and lse. scratch: [B, H, tq]
// floats (delta). Keys no query sees get zero gradients.
template <int D, int TMax, bool Causal, class S>
void attention_backward(Context& ctx, S* d_q, S* d_k, S* d_v, const S* d_out, const S* q, const S* k, const S* v,
                        const S* out, const float* lse, const AttentionLayout& L, int64_t batch, int heads, int64_t tq,
                        int64_t tk, float scale, float* scratch, int64_t q_offset = 0,
                        const int32_t* last_key = nullptr) {
  static_assert(is_storage_type<S>, "attention stores float or bf16");
  attention_detail::check_shapes<D, TMax, Causal>(batch, heads, tq, tk, q_offset);
  CLIP_CHECK(lse != nullptr && scratch != nullptr, "attention backward needs the forward's logsumexp and scratch");
  if (batch == 0) return;
  using Tiles = AttentionTiles<D, TMax>;
  const int64_t rows = batch * heads * tq;
  constexpr int delta_threads = 128;
  attention_detail::delta_kernel<D, S>
      <<<static_cast<unsigned>((rows + delta_threads - 1) / delta_threads), delta_threads, 0, ctx.stream()>>>(
          scratch, d_out, out, L, heads, tq, rows);
  CLIP_CUDA_CHECK(cudaGetLastError());
  const int64_t q_tiles = (tq + Tiles::rows - 1) / Tiles::rows;
  attention_detail::dq_kernel<D, TMax, Causal, S>
      <<<static_cast<unsigned>(batch * heads * q_tiles), Tiles::rows, 0, ctx.stream()>>>(
          d_q, d_out, q, k, v, lse, scratch, L, heads, tq, tk, q_tiles, scale, q_offset, last_key);
  CLIP_CUDA_CHECK(cudaGetLastError());
  const int64_t k_tiles = (tk + Tiles::rows - 1) / Tiles::rows;
  attention_detail::dkv_kernel<D, TMax, Causal, S>
      <<<static_cast<unsigned>(batch * heads * k_tiles), Tiles::rows, 0, ctx.stream()>>>(
          d_k, d_v, d_out, q, k, v, lse, scratch, L, heads, tq, tk, k_tiles, scale, q_offset, last_key);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// A block's packed qkv [B, t, 3C] (q, k, v at column offsets 0, C, 2C; C = H*D) -> out [B, t, C],
// lse [B, H, t]; scale 1/sqrt(D), causal with q_offset 0 (tq = tk), as the CPU self_attention_forward.
template <int H, int D, int T, bool Causal, class S>
void self_attention_forward(Context& ctx, S* out, float* lse, const S* qkv, int64_t batch, int64_t tokens) {
  constexpr int64_t C = int64_t{H} * D;
  const AttentionLayout L{3 * C, 3 * C, 3 * C, C, tokens * 3 * C, tokens * 3 * C, tokens * 3 * C, tokens * C};
  attention_forward<D, T, Causal, S>(ctx, out, lse, qkv, qkv + C, qkv + 2 * C, L, batch, H, tokens, tokens,
                                     1.0f / std::sqrt(static_cast<float>(D)));
}

// d_qkv [B, t, 3C] (assigned) from d_out [B, t, C]; scratch [B, H, t] floats.
template <int H, int D, int T, bool Causal, class S>
void self_attention_backward(Context& ctx, S* d_qkv, const S* d_out, const S* qkv, const S* out, const float* lse,
                             float* scratch, int64_t batch, int64_t tokens) {
  constexpr int64_t C = int64_t{H} * D;
  const AttentionLayout L{3 * C, 3 * C, 3 * C, C, tokens * 3 * C, tokens * 3 * C, tokens * 3 * C, tokens * C};
  attention_backward<D, T, Causal, S>(ctx, d_qkv, d_qkv + C, d_qkv + 2 * C, d_out, qkv, qkv + C, qkv + 2 * C, out,
                                      lse, L, batch, H, tokens, tokens, 1.0f / std::sqrt(static_cast<float>(D)),
                                      scratch);
}

}  // namespace clip::cuda
