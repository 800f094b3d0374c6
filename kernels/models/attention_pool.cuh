// OpenAI's AttentionPool2d on the GPU (include/clip/blocks/attention_pool.hpp is the spec): one
// query, the mean of the final feature map, attends over the map's pixels and that mean.
//
//   tokens = [mean; pixels in row-major order] + positional_embedding     [B, T, C]   T = G*G + 1
//   q = tokens[:, 0] Wq^T + bq                                             [B, C]
//   k = tokens Wk^T + bk,  v = tokens Wv^T + bv                            [B, T, C]
//   per head h: o_h = softmax(q_h k_h^T / sqrt(D)) v_h                     [B, H, D]
//   y = o Wc^T + bc                                                        [B, E]
//
// Composed from linear.cuh (the four projections, cuBLASLt) and attention.cuh's fused attention
// with one query per sample (tq = 1, tk = T); the only own kernels build the tokens from the
// channel-major feature map and scatter their gradient back. Training keeps the tokens, keys,
// values, query, pooled vector and the per-head logsumexp (AttentionPoolActs in
// include/clip/cuda/resnet_plan.hpp); backward sums the three projections' input gradients in
// fp32 (d_tok) before they reach the positional embedding and the feature map.
#pragma once

#include <cmath>
#include <cstdint>

#include "clip/blocks/attention_pool.hpp"
#include "clip/cuda/resnet_plan.hpp"
#include "kernels/attention.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/gemm.cuh"
#include "kernels/linear.cuh"
#include "kernels/models/device_weights.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace detail {

// tok[b, 0, c] = means[b, c] = mean_i x[c, b, i] + pos[0, c];  tok[b, 1 + i, c] = x[c, b, i] + pos[1 + i, c].
// One thread per (b, c), c fastest so that the token rows are written together. The mean is a
// sequential fp32 sum divided by HW, as the CPU.
template <int HW, int C, class S>
__global__ void pool_tokens_kernel(S* __restrict__ tok, S* __restrict__ means, const S* __restrict__ x,
                                   const S* __restrict__ pos, int64_t batch) {
  constexpr int T = HW + 1;
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= batch * C) return;
  const int c = static_cast<int>(i % C);
  const int64_t b = i / C;
  const S* plane = x + (int64_t{c} * batch + b) * HW;
  float sum = 0.0f;
  for (int k = 0; k < HW; ++k) sum += to_float(plane[k]);
  S* t = tok + b * T * C + c;
  const S m = from_float<S>(sum / float(HW) + to_float(pos[c]));
  t[0] = m;
  means[b * C + c] = m;
  for (int k = 0; k < HW; ++k) t[int64_t{k + 1} * C] = from_float<S>(to_float(plane[k]) + to_float(pos[int64_t{k + 1} * C + c]));
}

// d_x[c, b, i] = d_tok[b, 1 + i, c] + d_tok[b, 0, c] / HW  (pixel i is token 1 + i and a 1/HW share
// of the mean token). One thread per output element, in d_x's order.
template <int HW, int C, class S>
__global__ void pool_tokens_backward_kernel(S* __restrict__ d_x, const float* __restrict__ d_tok, int64_t batch) {
  constexpr int T = HW + 1;
  const int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (j >= int64_t{C} * batch * HW) return;
  const int i = static_cast<int>(j % HW);
  const int64_t b = (j / HW) % batch;
  const int c = static_cast<int>(j / (HW * batch));
  const float* t = d_tok + b * T * C + c;
  d_x[j] = from_float<S>(t[int64_t{i + 1} * C] + t[0] / float(HW));
}

}  // namespace detail

template <int Grid, int C, int Heads, int E, class S>
struct CudaAttentionPool {
  using Host = clip::AttentionPool2d<Grid, C, Heads, E>;
  using Acts = AttentionPoolActs<Grid, C, Heads, E, S>;
  static constexpr int hw = Grid * Grid;
  static constexpr int tokens = Host::tokens;   // T
  static constexpr int head_dim = Host::head_dim;  // D
  static_assert(tokens == Acts::tokens, "the plan and the CPU pool must agree on the token count");

  // q is one row per sample; k, v are [B, T, C]; heads are column blocks of D.
  static constexpr AttentionLayout layout() {
    return AttentionLayout{C, C, C, C, C, int64_t{tokens} * C, int64_t{tokens} * C, C};
  }
  static float scale() { return 1.0f / std::sqrt(float(head_dim)); }

  // y [B, E] = pool(x [C, B, G, G]). Keeps in `a` what backward needs (the lse only when a has it).
  static void forward(Context& ctx, const DeviceWeights<S>& dw, const typename Host::Params& p, Acts& a, const S* x,
                      S* y, int64_t batch) {
    CLIP_CHECK(batch > 0, "the attention pool needs a positive batch, got ", batch);
    const int64_t bt = batch * tokens;
    constexpr int threads = 256;
    detail::pool_tokens_kernel<hw, C, S><<<static_cast<unsigned>((batch * C + threads - 1) / threads), threads, 0,
                                           ctx.stream()>>>(a.tok, a.means, x, dw.w(p.positional_embedding), batch);
    CLIP_CUDA_CHECK(cudaGetLastError());
    linear_forward<C, C>(ctx, a.keys, a.tok, dw.w(p.k_proj.weight), dw.w(p.k_proj.bias), bt);     // [B, T, C]
    linear_forward<C, C>(ctx, a.values, a.tok, dw.w(p.v_proj.weight), dw.w(p.v_proj.bias), bt);   // [B, T, C]
    linear_forward<C, C>(ctx, a.query, a.means, dw.w(p.q_proj.weight), dw.w(p.q_proj.bias), batch);  // [B, C]
    attention_forward<head_dim, tokens, false, S>(ctx, a.pooled, a.lse, a.query, a.keys, a.values, layout(), batch,
                                                  Heads, 1, tokens, scale());                       // [B, C]
    linear_forward<C, E>(ctx, y, a.pooled, dw.w(p.c_proj.weight), dw.w(p.c_proj.bias), batch);      // [B, E]
  }

  // Gradients += (dw.g) and d_x [C, B, G, G] (assigned) from dy [B, E] and what forward kept.
  static void backward(Context& ctx, const DeviceWeights<S>& dw, const typename Host::Params& p, Acts& a, const S* dy,
                       S* d_x, int64_t batch) {
    CLIP_CHECK(a.lse && a.d_tok, "the attention pool's backward needs activations planned for training");
    const int64_t bt = batch * tokens;
    linear_backward<C, E>(ctx, a.d_pooled, dw.g(p.c_proj.weight), dw.g(p.c_proj.bias), dy, a.pooled,
                          dw.w(p.c_proj.weight), batch);                                            // d pooled [B, C]
    attention_backward<head_dim, tokens, false, S>(ctx, a.d_query, a.d_keys, a.d_values, a.d_pooled, a.query, a.keys,
                                                   a.values, a.pooled, a.lse, layout(), batch, Heads, 1, tokens,
                                                   scale(), a.scratch);
    // d tok = dk Wk + dv Wv (+ dq Wq on the mean token), summed in fp32.
    gemm_nn<S, float>(ctx, bt, C, C, a.d_keys, C, dw.w(p.k_proj.weight), C, a.d_tok, C);
    gemm_nn<S, float>(ctx, bt, C, C, a.d_values, C, dw.w(p.v_proj.weight), C, a.d_tok, C, GemmEpilogue<float>{1.0f, 1.0f});
    gemm_nn<S, float>(ctx, batch, C, C, a.d_query, C, dw.w(p.q_proj.weight), C, a.d_tok, int64_t{tokens} * C,
                      GemmEpilogue<float>{1.0f, 1.0f});
    // The projections' weights and biases (d_in skipped: it is in d_tok).
    linear_backward<C, C>(ctx, static_cast<S*>(nullptr), dw.g(p.k_proj.weight), dw.g(p.k_proj.bias), a.d_keys, a.tok,
                          dw.w(p.k_proj.weight), bt);
    linear_backward<C, C>(ctx, static_cast<S*>(nullptr), dw.g(p.v_proj.weight), dw.g(p.v_proj.bias), a.d_values, a.tok,
                          dw.w(p.v_proj.weight), bt);
    linear_backward<C, C>(ctx, static_cast<S*>(nullptr), dw.g(p.q_proj.weight), dw.g(p.q_proj.bias), a.d_query, a.means,
                          dw.w(p.q_proj.weight), batch);
    // The positional embedding is added to every image's tokens: column sums of d_tok as [B, T*C].
    column_sums_accumulate<tokens * C, float>(ctx, dw.g(p.positional_embedding), a.d_tok, batch);
    constexpr int threads = 256;
    const int64_t n = int64_t{C} * batch * hw;
    detail::pool_tokens_backward_kernel<hw, C, S>
        <<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, ctx.stream()>>>(d_x, a.d_tok, batch);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace clip::cuda
