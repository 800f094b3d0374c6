// OpenAI's AttentionPool2d (clip/model.py): one query, the mean of the final feature map,
// attends over the map's pixels and that mean.
//
//   tokens = [mean; pixels in row-major order] + positional_embedding     [B, T, C]   T = G*G + 1
//   q = tokens[:, 0] Wq^T + bq       (the mean token only)                  [B, C]
//   k = tokens Wk^T + bk,  v = tokens Wv^T + bv                             [B, T, C]
//   per head h: o_h = softmax(q_h k_h^T / sqrt(D)) v_h                      [B, H, D]
//   y = o Wc^T + bc                                                          [B, E]
//
// state_dict order is OpenAI's: positional_embedding, k_proj, q_proj, v_proj, c_proj.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/ops/conv2d.hpp"  // Planes
#include "clip/ops/linear.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

template <int Grid, int C, int Heads, int E>
struct AttentionPool2d {
  static_assert(Grid > 0 && C > 0 && E > 0, "an attention pool needs a positive grid, width and output size");
  static_assert(Heads > 0 && C % Heads == 0, "the attention pool's width must be a multiple of its head count");
  static constexpr int grid = Grid;
  static constexpr int width = C;       // C
  static constexpr int heads = Heads;   // H
  static constexpr int head_dim = C / Heads;  // D
  static constexpr int tokens = Grid * Grid + 1;  // T
  static constexpr int embed = E;       // E

  struct Params {
    Param<tokens, C> positional_embedding;
    LinearParams<C, C> k_proj, q_proj, v_proj;  // weight [C, C], bias [C]
    LinearParams<C, E> c_proj;                  // weight [E, C], bias [E]

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "positional_embedding", positional_embedding, Role::parameter);
      k_proj.visit(f, prefix + "k_proj.");
      q_proj.visit(f, prefix + "q_proj.");
      v_proj.visit(f, prefix + "v_proj.");
      c_proj.visit(f, prefix + "c_proj.");
    }
  };

  // y [B, E] = pool(x: C planes of Grid x Grid, layout xl). `scratch` is grown as needed.
  static void forward(const Params& p, const float* x, Planes xl, float* y, int64_t batch, std::vector<float>& scratch) {
    constexpr int hw = Grid * Grid;
    const int64_t bt = batch * tokens;
    const int64_t need = 3 * bt * C + 3 * batch * C;
    if (static_cast<int64_t>(scratch.size()) < need) {
      scratch.clear();
      scratch.resize(need);
    }
    float* tok = scratch.data();        // [B, T, C]
    float* keys = tok + bt * C;         // [B, T, C]
    float* values = keys + bt * C;      // [B, T, C]
    float* means = values + bt * C;     // [B, C]  token 0 of each image
    float* query = means + batch * C;   // [B, C]
    float* pooled = query + batch * C;  // [B, C]

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      for (int c = 0; c < C; ++c) {
        const float* plane = xl.plane(x, b, c);
        float* t = tok + b * tokens * C + c;
        float sum = 0.0f;
        for (int i = 0; i < hw; ++i) sum += plane[i];
        t[0] = means[b * C + c] = sum / float(hw) + p.positional_embedding[c];
        for (int i = 0; i < hw; ++i) t[int64_t{i + 1} * C] = plane[i] + p.positional_embedding[int64_t{i + 1} * C + c];
      }

    linear_forward<C, C>(keys, tok, p.k_proj.weight.data(), p.k_proj.bias.data(), bt);
    linear_forward<C, C>(values, tok, p.v_proj.weight.data(), p.v_proj.bias.data(), bt);
    linear_forward<C, C>(query, means, p.q_proj.weight.data(), p.q_proj.bias.data(), batch);

    const float scale = std::sqrt(float(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      for (int h = 0; h < Heads; ++h) {
        const float* q = query + b * C + h * head_dim;
        float qs[head_dim];
        for (int d = 0; d < head_dim; ++d) qs[d] = q[d] / scale;
        float score[tokens];
        float top = -INFINITY;
        for (int t = 0; t < tokens; ++t) {
          const float* k = keys + (b * tokens + t) * C + h * head_dim;
          float s = 0.0f;
          for (int d = 0; d < head_dim; ++d) s += qs[d] * k[d];
          score[t] = s;
          top = std::max(top, s);
        }
        float total = 0.0f;
        for (int t = 0; t < tokens; ++t) total += (score[t] = std::exp(score[t] - top));
        float* o = pooled + b * C + h * head_dim;
        for (int d = 0; d < head_dim; ++d) o[d] = 0.0f;
        for (int t = 0; t < tokens; ++t) {
          const float w = score[t] / total;
          const float* v = values + (b * tokens + t) * C + h * head_dim;
          for (int d = 0; d < head_dim; ++d) o[d] += w * v[d];
        }
      }

    linear_forward<C, E>(y, pooled, p.c_proj.weight.data(), p.c_proj.bias.data(), batch);  // [B, E]
  }
};

}  // namespace clip
