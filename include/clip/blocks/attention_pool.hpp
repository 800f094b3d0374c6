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
//
// Training: forward_train keeps the tokens, keys, values, query, attention probabilities and
// pooled vector; backward runs the chain back through c_proj, the per-head softmax (the query
// only from the mean token, keys and values from every token) and the three projections to the
// positional embedding and the feature map.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/ops/conv2d.hpp"  // Planes
#include "clip/ops/gemm.hpp"
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

  // Floats per image of forward's scratch, and of what forward_train keeps plus backward's own
  // scratch (the token gradients and three [C] vectors).
  static constexpr int64_t inference_floats_per_sample = 3 * int64_t{tokens} * C + 3 * int64_t{C};
  static constexpr int64_t train_floats_per_sample =
      inference_floats_per_sample + int64_t{Heads} * tokens + int64_t{tokens} * C + 3 * int64_t{C};

  // y [B, E] = pool(x: C planes of Grid x Grid, layout xl). `scratch` is grown as needed.
  static void forward(const Params& p, const float* x, Planes xl, float* y, int64_t batch, std::vector<float>& scratch) {
    const int64_t need = inference_floats_per_sample * batch;
    if (static_cast<int64_t>(scratch.size()) < need) {
      scratch.clear();
      scratch.resize(need);
    }
    run(p, x, xl, y, batch, Buffers(scratch.data(), batch), /*keep_probs=*/false);
  }

  // forward, keeping in `saved` (train_floats_per_sample * batch floats) what backward reads.
  static void forward_train(const Params& p, const float* x, Planes xl, float* y, int64_t batch, float* saved) {
    run(p, x, xl, y, batch, Buffers(saved, batch), /*keep_probs=*/true);
  }

  // grads += d loss / d params and d_x (C planes of Grid x Grid, layout dxl; assigned) from
  // dy [B, E] and what forward_train left in `saved` (which this overwrites).
  static void backward(const Params& p, float* saved, const float* dy, float* d_x, Planes dxl, Params& grads,
                       int64_t batch) {
    constexpr int hw = Grid * Grid;
    const int64_t bt = batch * tokens;
    const Buffers b(saved, batch);
    linear_backward<C, E>(b.d_pooled, grads.c_proj.weight.data(), grads.c_proj.bias.data(), dy, b.pooled,
                          p.c_proj.weight.data(), batch);  // d pooled [B, C]

    // Per head, with s_t = q.k_t / sqrt(D), w = softmax(s), o = sum_t w_t v_t:
    //   dw_t = do.v_t,  ds_t = w_t (dw_t - sum_u w_u dw_u),  dq = sum_t ds_t k_t / sqrt(D),
    //   dk_t = ds_t q / sqrt(D),  dv_t = w_t do.   dk and dv overwrite k and v (disjoint per head).
    const float scale = 1.0f / std::sqrt(float(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < batch; ++n)
      for (int h = 0; h < Heads; ++h) {
        const float* q = b.query + n * C + h * head_dim;
        const float* d_o = b.d_pooled + n * C + h * head_dim;
        const float* w = b.probs + (n * Heads + h) * tokens;
        float ds[tokens];
        double total = 0;
        for (int t = 0; t < tokens; ++t) {
          const float* v = b.values + (n * tokens + t) * C + h * head_dim;
          float dw = 0.0f;
          for (int d = 0; d < head_dim; ++d) dw += d_o[d] * v[d];
          ds[t] = dw;
          total += double(w[t]) * dw;
        }
        for (int t = 0; t < tokens; ++t) ds[t] = w[t] * (ds[t] - static_cast<float>(total));
        float* dq = b.d_query + n * C + h * head_dim;
        for (int d = 0; d < head_dim; ++d) dq[d] = 0.0f;
        for (int t = 0; t < tokens; ++t) {
          float* k = b.keys + (n * tokens + t) * C + h * head_dim;
          float* v = b.values + (n * tokens + t) * C + h * head_dim;
          const float g = ds[t] * scale;
          for (int d = 0; d < head_dim; ++d) {
            dq[d] += g * k[d];
            k[d] = g * q[d];        // dk
            v[d] = w[t] * d_o[d];   // dv
          }
        }
      }
    const float* dk = b.keys;    // [B, T, C]
    const float* dv = b.values;  // [B, T, C]

    // d tokens = dk Wk + dv Wv (+ dq Wq on the mean token); the weights' gradients.
    linear_backward<C, C>(b.d_means, grads.q_proj.weight.data(), grads.q_proj.bias.data(), b.d_query, b.means,
                          p.q_proj.weight.data(), batch);
    linear_backward<C, C>(b.d_tok, grads.k_proj.weight.data(), grads.k_proj.bias.data(), dk, b.tok,
                          p.k_proj.weight.data(), bt);
    gemm_nn(bt, C, C, dv, C, p.v_proj.weight.data(), C, b.d_tok, C, /*accumulate=*/true);
    linear_backward<C, C>(nullptr, grads.v_proj.weight.data(), grads.v_proj.bias.data(), dv, b.tok,
                          p.v_proj.weight.data(), bt);
    for (int64_t n = 0; n < batch; ++n)
      for (int c = 0; c < C; ++c) b.d_tok[n * tokens * C + c] += b.d_means[n * C + c];

    // The positional embedding is added to every image's tokens.
    float* d_pos = grads.positional_embedding.data();
#pragma omp parallel for schedule(static) if (bt * C >= (int64_t{1} << 15))
    for (int t = 0; t < tokens; ++t)
      for (int64_t n = 0; n < batch; ++n) {
        const float* src = b.d_tok + (n * tokens + t) * C;
        float* dst = d_pos + int64_t{t} * C;
        for (int c = 0; c < C; ++c) dst[c] += src[c];
      }
    // Pixel i is token i + 1 and a 1/hw share of the mean token.
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < batch; ++n)
      for (int c = 0; c < C; ++c) {
        const float* t = b.d_tok + n * tokens * C + c;
        const float mean_share = t[0] / float(hw);
        float* plane = dxl.plane(d_x, n, c);
        for (int i = 0; i < hw; ++i) plane[i] = t[int64_t{i + 1} * C] + mean_share;
      }
  }

 private:
  // Where forward's and backward's arrays lie in one block of floats (forward uses the prefix).
  struct Buffers {
    float *tok, *keys, *values, *means, *query, *pooled;  // forward
    float *probs, *d_tok, *d_pooled, *d_query, *d_means;  // training
    Buffers(float* base, int64_t batch) {
      const int64_t bt = batch * tokens;
      tok = base;                     // [B, T, C]
      keys = tok + bt * C;            // [B, T, C]
      values = keys + bt * C;         // [B, T, C]
      means = values + bt * C;        // [B, C]  token 0 of each image
      query = means + batch * C;      // [B, C]
      pooled = query + batch * C;     // [B, C]
      probs = pooled + batch * C;     // [B, H, T]
      d_tok = probs + batch * Heads * tokens;  // [B, T, C]
      d_pooled = d_tok + bt * C;      // [B, C]
      d_query = d_pooled + batch * C; // [B, C]
      d_means = d_query + batch * C;  // [B, C]
    }
  };

  static void run(const Params& p, const float* x, Planes xl, float* y, int64_t batch, const Buffers& buf,
                  bool keep_probs) {
    constexpr int hw = Grid * Grid;
    const int64_t bt = batch * tokens;
    float* tok = buf.tok;
    float* keys = buf.keys;
    float* values = buf.values;
    float* means = buf.means;
    float* query = buf.query;
    float* pooled = buf.pooled;

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
        float* probs = keep_probs ? buf.probs + (b * Heads + h) * tokens : nullptr;
        for (int t = 0; t < tokens; ++t) {
          const float w = score[t] / total;
          if (probs) probs[t] = w;
          const float* v = values + (b * tokens + t) * C + h * head_dim;
          for (int d = 0; d < head_dim; ++d) o[d] += w * v[d];
        }
      }

    linear_forward<C, E>(y, pooled, p.c_proj.weight.data(), p.c_proj.bias.data(), batch);  // [B, E]
  }
};

}  // namespace clip
