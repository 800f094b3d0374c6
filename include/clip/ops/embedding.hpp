// Token embedding for the text transformer: gather rows of the embedding table, add positional
// embeddings (and the backward pass, which scatters back); and the position CLIP pools at, the
// first maximum token id (the end-of-text token has the largest id in the vocabulary).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>

#include "clip/core/error.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// One nn.Embedding(V, C): "<prefix>weight" [V, C].
template <int V, int C>
struct EmbeddingParams {
  Param<V, C> weight;  // [V, C]

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "weight", weight, Role::parameter);
  }
};

// Throws unless every one of the n ids lies in [0, vocab).
template <std::integral Id>
void check_token_ids(const Id* ids, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i)
    CLIP_CHECK(ids[i] >= 0 && static_cast<int64_t>(ids[i]) < vocab, "token id ", static_cast<int64_t>(ids[i]),
               " at position ", i, " is outside the vocabulary of ", vocab, " tokens");
}

// The index of the first maximum of a row of token ids (torch.argmax's choice): where CLIP pools.
template <std::integral Id>
int64_t pool_position(const Id* row, int64_t context) {
  int64_t best = 0;
  for (int64_t t = 1; t < context; ++t)
    if (row[t] > row[best]) best = t;
  return best;
}

// out[b, t] = wte[ids[b, t]] + wpe[t] for t < tokens; each row of ids holds `context` ids, of which
// only the first `tokens` are embedded (tokens <= context). Ids must be valid (check_token_ids).
template <int C, std::integral Id>
void embedding_forward(float* out,        // [B, tokens, C]
                       const Id* ids,     // [B, context]
                       const float* wte,  // [V, C]
                       const float* wpe,  // [context, C]
                       int64_t batch, int64_t context, int64_t tokens) {
  const int64_t rows = batch * tokens;
#pragma omp parallel for schedule(static) if (rows * C >= (int64_t{1} << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / tokens, t = r % tokens;
    const float* e = wte + static_cast<int64_t>(ids[b * context + t]) * C;
    const float* p = wpe + t * C;
    float* y = out + r * C;
#pragma omp simd
    for (int j = 0; j < C; ++j) y[j] = e[j] + p[j];
  }
}

// Backward of embedding_forward: for t < tokens,
//   d_wte[ids[b, t]] += d_out[b, t]   (rows of ids that do not occur stay untouched)
//   d_wpe[t] += sum over b of d_out[b, t]   (skipped when d_wpe is null)
// Threads take column strips, so a repeated id never races with itself and every sum runs in
// the same order whatever the thread count.
template <int C, std::integral Id>
void embedding_backward(float* d_wte,        // [V, C]
                        float* d_wpe,        // [context, C] or null
                        const float* d_out,  // [B, tokens, C]
                        const Id* ids,       // [B, context]
                        int64_t batch, int64_t context, int64_t tokens) {
  constexpr int strip = 64;
  constexpr int strips = (C + strip - 1) / strip;
#pragma omp parallel for schedule(static) if (batch * tokens * C >= (int64_t{1} << 15) && strips > 1)
  for (int s = 0; s < strips; ++s) {
    const int j0 = s * strip, j1 = std::min(C, j0 + strip);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < tokens; ++t) {
        const float* g = d_out + (b * tokens + t) * C;
        float* e = d_wte + static_cast<int64_t>(ids[b * context + t]) * C;
#pragma omp simd
        for (int j = j0; j < j1; ++j) e[j] += g[j];
        if (d_wpe) {
          float* p = d_wpe + t * C;
#pragma omp simd
          for (int j = j0; j < j1; ++j) p[j] += g[j];
        }
      }
  }
}

}  // namespace clip
