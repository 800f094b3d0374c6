// Multi-head scaled dot-product attention, as nn.MultiheadAttention computes it after its input
// projection: per head, P = softmax(q k^T / sqrt(D) [+ causal mask]), out = P v.
//
// Queries, keys, values and the output are read through strided row views, so one routine serves
//   * self-attention over a packed qkv buffer [B, T, 3C] (q, k, v at column offsets 0, C, 2C),
//   * attention pooling, where 1 query attends T keys (ModifiedResNet's AttentionPool2d).
// Head h of a row is the D contiguous values at column h*D. The probabilities go to a buffer the
// caller owns ([B, H, Tq, Tk], masked entries exactly 0): a backward pass needs them.
// Parallel over batch x heads; each (b, h) is two small Eigen GEMMs on strided maps (four in the
// backward pass).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "clip/core/error.hpp"

namespace clip {

// Element (b, t, j) of a [B, T, ...] activation is data[b * batch_stride + t * row_stride + j].
template <class T>
struct RowsView {
  T* data;
  int64_t row_stride;
  int64_t batch_stride;
};

namespace detail {

// Work (Tq Tk D multiply-adds summed over the tasks) below which waking a second thread costs
// more than it saves.
inline constexpr int64_t attention_parallel_min = int64_t{1} << 16;

// row[j] = softmax(scale * row)[j] for j < n. The exponentials go through aligned fixed-size
// blocks of 64 and the sum adds the blocks in order, so the result does not depend on the row's
// address (on a mapped array Eigen computes an unaligned head with the scalar exp and starts its
// vectorised sum at the first aligned element).
inline void softmax_row(float* row, int64_t n, float scale) {
  using Block = Eigen::Array<float, 64, 1>;
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j] * scale);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; j += 64) {
    const int w = static_cast<int>(std::min<int64_t>(64, n - j));
    Block x;
    if (w == 64) {
      x = Eigen::Map<const Block>(row + j);
    } else {
      x.setConstant(-INFINITY);  // exp(-inf) = 0: padding adds nothing to the sum
      for (int i = 0; i < w; ++i) x[i] = row[j + i];
    }
    x = (x * scale - m).exp();
    sum += x.sum();
    for (int i = 0; i < w; ++i) row[j + i] = x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
}

}  // namespace detail

// For each b < batch and head h < Heads:
//   S = q[b, :, h] k[b, :, h]^T / sqrt(HeadDim)            [Tq, Tk]
//   causal: query i sees keys j <= i + (Tk - Tq)           (the usual mask when Tq == Tk)
//   last_key: every query of sample b sees keys j <= last_key[b] (when not null; one caption's
//             pooled position querying its causal prefix)
//   probs[b, h] = softmax_rows(S)                           [Tq, Tk]
//   out[b, :, h] = probs[b, h] v[b, :, h]                   [Tq, D]
template <int Heads, int HeadDim>
void attention_forward(RowsView<float> out,        // [B, Tq, H*D] (strided)
                       float* probs,               // [B, H, Tq, Tk]
                       RowsView<const float> q,    // [B, Tq, H*D] (strided)
                       RowsView<const float> k,    // [B, Tk, H*D] (strided)
                       RowsView<const float> v,    // [B, Tk, H*D] (strided)
                       int64_t batch, int64_t tq, int64_t tk, bool causal,
                       const int64_t* last_key = nullptr) {  // [B] or null
  static_assert(Heads > 0 && HeadDim > 0, "attention needs a positive head count and head size");
  constexpr int D = HeadDim;
  CLIP_CHECK(tq > 0 && tk > 0, "attention needs at least one query and one key (got ", tq, " and ", tk, ")");
  CLIP_CHECK(!causal || tk >= tq, "causal attention needs at least as many keys as queries (got ", tq,
             " queries and ", tk, " keys)");
  for (int64_t b = 0; last_key && b < batch; ++b)
    CLIP_CHECK(last_key[b] >= 0 && last_key[b] < tk, "sample ", b, " attends up to key ", last_key[b], " of ", tk);
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t shift = tk - tq;
  const int64_t tasks = batch * Heads;

#pragma omp parallel for schedule(static) if (tasks > 1 && tasks * tq * tk * D >= detail::attention_parallel_min)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / Heads;
    const int64_t h = task % Heads;
    Strided qh(q.data + b * q.batch_stride + h * D, tq, D, Eigen::OuterStride<>(q.row_stride));  // [Tq, D]
    Strided kh(k.data + b * k.batch_stride + h * D, tk, D, Eigen::OuterStride<>(k.row_stride));  // [Tk, D]
    Strided vh(v.data + b * v.batch_stride + h * D, tk, D, Eigen::OuterStride<>(v.row_stride));  // [Tk, D]
    StridedOut oh(out.data + b * out.batch_stride + h * D, tq, D, Eigen::OuterStride<>(out.row_stride));
    float* p = probs + task * tq * tk;                                                            // [Tq, Tk]
    Eigen::Map<Matrix> ph(p, tq, tk);

    ph.noalias() = qh * kh.transpose();  // raw scores, scaled in the softmax pass
    for (int64_t i = 0; i < tq; ++i) {
      float* row = p + i * tk;
      int64_t n = causal ? std::min(tk, i + shift + 1) : tk;  // keys this query sees
      if (last_key) n = std::min(n, last_key[b] + 1);
      detail::softmax_row(row, n, scale);
      std::fill(row + n, row + tk, 0.0f);
    }
    oh.noalias() = ph * vh;  // [Tq, D]
  }
}

// Self-attention over a packed [B, T, 3C] buffer of q, k, v rows (nn.MultiheadAttention's
// in_proj output), C = Heads * HeadDim; writes the head outputs side by side into [B, T, C].
template <int Heads, int HeadDim>
void self_attention_forward(float* out,        // [B, T, C]
                            float* probs,      // [B, H, T, T]
                            const float* qkv,  // [B, T, 3C]
                            int64_t batch, int64_t tokens, bool causal) {
  constexpr int64_t C = int64_t{Heads} * HeadDim;
  const RowsView<const float> q{qkv, 3 * C, tokens * 3 * C};
  const RowsView<const float> k{qkv + C, 3 * C, tokens * 3 * C};
  const RowsView<const float> v{qkv + 2 * C, 3 * C, tokens * 3 * C};
  attention_forward<Heads, HeadDim>(RowsView<float>{out, C, tokens * C}, probs, q, k, v, batch, tokens, tokens,
                                    causal);
}

namespace detail {
// One [Tq, Tk] matrix per thread for the attention backward pass, grown once and then reused, so
// a training step allocates nothing here after its first call.
inline float* attention_scratch(int64_t floats) {
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}
}  // namespace detail

// Backward of attention_forward, from the probabilities it kept. For each b and head h, with
// O = P V and P = softmax(S), S = q k^T / sqrt(D):
//   dV = P^T dO                                    [Tk, D]
//   dP = dO V^T                                    [Tq, Tk]
//   dS = P * (dP - rowsum(P * dP)) / sqrt(D)       [Tq, Tk]  (masked entries: P = 0, so dS = 0)
//   dQ = dS K,  dK = dS^T Q                        [Tq, D], [Tk, D]
// d_q, d_k, d_v are assigned; they must not overlap q, k, v or d_out (they may share one packed
// buffer, as d_qkv does). The causal mask needs no argument here: it lives in the zeros of probs.
template <int Heads, int HeadDim>
void attention_backward(RowsView<float> d_q,          // [B, Tq, H*D] (strided)
                        RowsView<float> d_k,          // [B, Tk, H*D] (strided)
                        RowsView<float> d_v,          // [B, Tk, H*D] (strided)
                        RowsView<const float> d_out,  // [B, Tq, H*D] (strided)
                        const float* probs,           // [B, H, Tq, Tk]
                        RowsView<const float> q,      // [B, Tq, H*D] (strided)
                        RowsView<const float> k,      // [B, Tk, H*D] (strided)
                        RowsView<const float> v,      // [B, Tk, H*D] (strided)
                        int64_t batch, int64_t tq, int64_t tk) {
  static_assert(Heads > 0 && HeadDim > 0, "attention needs a positive head count and head size");
  constexpr int D = HeadDim;
  CLIP_CHECK(tq > 0 && tk > 0, "attention needs at least one query and one key (got ", tq, " and ", tk, ")");
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t tasks = batch * Heads;

#pragma omp parallel for schedule(static) if (tasks > 1 && tasks * tq * tk * D >= detail::attention_parallel_min)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / Heads;
    const int64_t h = task % Heads;
    Strided qh(q.data + b * q.batch_stride + h * D, tq, D, Eigen::OuterStride<>(q.row_stride));  // [Tq, D]
    Strided kh(k.data + b * k.batch_stride + h * D, tk, D, Eigen::OuterStride<>(k.row_stride));  // [Tk, D]
    Strided vh(v.data + b * v.batch_stride + h * D, tk, D, Eigen::OuterStride<>(v.row_stride));  // [Tk, D]
    Strided doh(d_out.data + b * d_out.batch_stride + h * D, tq, D, Eigen::OuterStride<>(d_out.row_stride));
    StridedOut dqh(d_q.data + b * d_q.batch_stride + h * D, tq, D, Eigen::OuterStride<>(d_q.row_stride));
    StridedOut dkh(d_k.data + b * d_k.batch_stride + h * D, tk, D, Eigen::OuterStride<>(d_k.row_stride));
    StridedOut dvh(d_v.data + b * d_v.batch_stride + h * D, tk, D, Eigen::OuterStride<>(d_v.row_stride));
    const float* p = probs + task * tq * tk;
    Eigen::Map<const Matrix> ph(p, tq, tk);                               // [Tq, Tk]
    float* ds = detail::attention_scratch(tq * tk);
    Eigen::Map<Matrix> dsh(ds, tq, tk);                                   // [Tq, Tk]

    dvh.noalias() = ph.transpose() * doh;  // [Tk, D]
    dsh.noalias() = doh * vh.transpose();  // dP
    for (int64_t i = 0; i < tq; ++i) {  // plain loops: a sum order independent of the address
      const float* pr = p + i * tk;
      float* dr = ds + i * tk;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < tk; ++j) dot += pr[j] * dr[j];
#pragma omp simd
      for (int64_t j = 0; j < tk; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
    }
    dqh.noalias() = dsh * kh;              // [Tq, D]
    dkh.noalias() = dsh.transpose() * qh;  // [Tk, D]
  }
}

// Backward of self_attention_forward: d_qkv [B, T, 3C] (assigned) from d_out [B, T, C], the
// probabilities and the packed qkv buffer the forward read.
template <int Heads, int HeadDim>
void self_attention_backward(float* d_qkv,        // [B, T, 3C]
                             const float* d_out,  // [B, T, C]
                             const float* probs,  // [B, H, T, T]
                             const float* qkv,    // [B, T, 3C]
                             int64_t batch, int64_t tokens) {
  constexpr int64_t C = int64_t{Heads} * HeadDim;
  const int64_t rs = 3 * C, bs = tokens * 3 * C;
  attention_backward<Heads, HeadDim>(RowsView<float>{d_qkv, rs, bs}, RowsView<float>{d_qkv + C, rs, bs},
                                     RowsView<float>{d_qkv + 2 * C, rs, bs},
                                     RowsView<const float>{d_out, C, tokens * C}, probs,
                                     RowsView<const float>{qkv, rs, bs}, RowsView<const float>{qkv + C, rs, bs},
                                     RowsView<const float>{qkv + 2 * C, rs, bs}, batch, tokens, tokens);
}

}  // namespace clip
