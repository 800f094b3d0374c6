// The reference logsumexp of attention rows, which the CPU op does not keep (it stores the
// probabilities): the CUDA attention test and its host replay both check the kernels' lse
// against this one computation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "clip/ops/online_softmax.hpp"

namespace clip::test {

// lse[(b * heads + h) * tq + i] = log sum_j exp(scale * q_i . k_j) over row i's keys, in double.
// Layout: the q/k row and batch strides (q_row, q_batch, k_row, k_batch), head h at column h * D.
template <class Layout>
std::vector<float> reference_lse(const float* q, const float* k, const Layout& L, int64_t batch, int heads, int D,
                                 int64_t tq, int64_t tk, float scale, bool causal, int64_t q_offset,
                                 const int64_t* last_key) {
  std::vector<float> lse(batch * heads * tq);
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i = 0; i < tq; ++i) {
        const int64_t n = clip::attention_key_limit(i, tk, causal, q_offset, last_key ? last_key[b] : -1);
        std::vector<double> s(n);
        double m = -INFINITY, sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += double(q[b * L.q_batch + i * L.q_row + h * D + d]) * k[b * L.k_batch + j * L.k_row + h * D + d];
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        for (double x : s) sum += std::exp(x - m);
        lse[(b * heads + h) * tq + i] = static_cast<float>(m + std::log(sum));
      }
  return lse;
}

}  // namespace clip::test
