// Multi-head scaled dot-product attention, as nn.MultiheadAttention computes it after its input
// projection: per head, P = softmax(q k^T / sqrt(D) [+ causal mask]), out = P v.
//
// Queries, keys, values and the output are read through strided row views, so one routine serves
//   * self-attention over a packed qkv buffer [B, T, 3C] (q, k, v at column offsets 0, C, 2C),
//   * attention pooling, where 1 query attends T keys (ModifiedResNet's AttentionPool2d).
// Head h of a row is the D contiguous values at column h*D. The probabilities go to a buffer the
// caller owns ([B, H, Tq, Tk], masked entries exactly 0): a backward pass needs them.
// Parallel over batch x heads; each (b, h) is two small Eigen GEMMs on strided maps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// For each b < batch and head h < Heads:
//   S = q[b, :, h] k[b, :, h]^T / sqrt(HeadDim)            [Tq, Tk]
//   causal: query i sees keys j <= i + (Tk - Tq)           (the usual mask when Tq == Tk)
//   probs[b, h] = softmax_rows(S)                           [Tq, Tk]
//   out[b, :, h] = probs[b, h] v[b, :, h]                   [Tq, D]
template <int Heads, int HeadDim>
void attention_forward(RowsView<float> out,        // [B, Tq, H*D] (strided)
                       float* probs,               // [B, H, Tq, Tk]
                       RowsView<const float> q,    // [B, Tq, H*D] (strided)
                       RowsView<const float> k,    // [B, Tk, H*D] (strided)
                       RowsView<const float> v,    // [B, Tk, H*D] (strided)
                       int64_t batch, int64_t tq, int64_t tk, bool causal) {
  static_assert(Heads > 0 && HeadDim > 0, "attention needs a positive head count and head size");
  constexpr int D = HeadDim;
  CLIP_CHECK(tq > 0 && tk > 0, "attention needs at least one query and one key (got ", tq, " and ", tk, ")");
  CLIP_CHECK(!causal || tk >= tq, "causal attention needs at least as many keys as queries (got ", tq,
             " queries and ", tk, " keys)");
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t shift = tk - tq;
  const int64_t tasks = batch * Heads;

#pragma omp parallel for schedule(static) if (tasks > 1)
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
      const int64_t n = causal ? std::min(tk, i + shift + 1) : tk;  // keys this query sees
      Eigen::Map<Eigen::ArrayXf> s(row, n);
      s *= scale;
      const float m = s.maxCoeff();
      s = (s - m).exp();
      s *= 1.0f / s.sum();
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

}  // namespace clip
