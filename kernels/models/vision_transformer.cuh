// OpenAI's VisionTransformer image tower on the GPU (mirrors include/clip/models/vision_transformer.hpp):
//   im2col patches -> conv1 as one gemm -> [class; patches] + positions -> ln_pre -> transformer
//   -> ln_post on the class token -> @ proj.
// The plan's image-tower interface (CudaModifiedResNet has the same shape).
#pragma once

#include <cstdint>

#include "clip/models/vision_transformer.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/embedding.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/linear.cuh"
#include "kernels/models/device_weights.cuh"
#include "kernels/models/transformer.cuh"

namespace clip::cuda {

// The class-token rows x[b, 0, :] of [B, T, C] <-> [B, C]: one strided copy.
template <int C, class S>
void copy_class_rows(Context& ctx, S* dst, int64_t dst_pitch, const S* src, int64_t src_pitch, int64_t batch) {
  if (batch == 0) return;
  CLIP_CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(S) * dst_pitch, src, sizeof(S) * src_pitch, sizeof(S) * C, batch,
                                    cudaMemcpyDeviceToDevice, ctx.stream()));
}

template <class Cfg, class S>
struct CudaVisionTransformer {
  using Host = VisionTransformer<Cfg>;
  using Params = typename Host::Params;
  static constexpr int R = Host::R, patch = Host::patch, C = Host::C, T = Host::T, P = Host::P, E = Host::E,
                       N = Host::N;
  using Stack = CudaTransformer<C, vision_dims<Cfg>::heads, vision_dims<Cfg>::layers, T, /*Causal=*/false, S>;

  struct Acts {
    int64_t capacity = 0;
    bool training = false;
    int64_t batch = 0;           // of the last training forward
    S* patches = nullptr;        // [B, N, P]
    S* embedded = nullptr;       // [B, N, C]  conv1 output; d embedded in backward
    S* embed = nullptr;          // [B, T, C]  ln_pre's input
    float* ln_pre_mean = nullptr, *ln_pre_rstd = nullptr;  // [B, T]
    typename Stack::Acts stack;
    S* pooled = nullptr;         // [B, C]  class rows of the stack output
    S* pooled_ln = nullptr;      // [B, C]
    float* ln_post_mean = nullptr, *ln_post_rstd = nullptr;  // [B]
    S* d_pooled = nullptr;       // [B, C]
    S* d_x = nullptr;            // [B, T, C]

    Acts(Arena& arena, int64_t capacity_, bool training_, bool recompute = false)
        : capacity(capacity_), training(training_) {
      const int64_t b = capacity;
      patches = arena.take<S>(b * N * P);
      embedded = arena.take<S>(b * N * C);
      embed = arena.take<S>(b * T * C);
      stack = typename Stack::Acts(arena, b, training, recompute);
      pooled = arena.take<S>(b * C);
      pooled_ln = arena.take<S>(b * C);
      if (training) {
        ln_pre_mean = arena.take<float>(b * T); ln_pre_rstd = arena.take<float>(b * T);
        ln_post_mean = arena.take<float>(b); ln_post_rstd = arena.take<float>(b);
        d_pooled = arena.take<S>(b * C);
        d_x = arena.take<S>(b * T * C);
      }
    }
  };

  static int64_t bytes(int64_t capacity, bool training, bool recompute = false) {
    Arena planner = Arena::planner();
    Acts a(planner, capacity, training, recompute);
    return static_cast<int64_t>(planner.used() + Arena::alignment);
  }

  // features [B, E] of images [B, 3, R, R] (device, fp32 normalised pixels).
  static void forward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, const float* images,
                      S* features, int64_t batch, bool training, bool update_running_stats = false) {
    (void)update_running_stats;  // no running statistics in a vision transformer
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the image activations hold ", a.capacity, " images, not ", batch);
    CLIP_CHECK(!training || a.training, "a training forward needs training activations");
    a.batch = batch;
    if (batch == 0) return;
    patch_im2col<R, patch>(ctx, a.patches, images, batch);                                          // [B, N, P]
    linear_forward<P, C>(ctx, a.embedded, a.patches, W.w(p.conv1.weight), static_cast<const S*>(nullptr),
                         batch * N);                                                                // [B, N, C]
    add_class_and_positions<N, C>(ctx, a.embed, a.embedded, W.w(p.class_embedding), W.w(p.positional_embedding),
                                  batch);                                                           // [B, T, C]
    layernorm_forward<C>(ctx, a.stack.input(0), training ? a.ln_pre_mean : nullptr,
                         training ? a.ln_pre_rstd : nullptr, a.embed, W.w(p.ln_pre.weight), W.w(p.ln_pre.bias),
                         batch * T);                                                                // [B, T, C]
    if (training) Stack::forward_train(ctx, W, p.transformer, a.stack, batch, T);
    else Stack::forward(ctx, W, p.transformer, a.stack, batch, T);
    copy_class_rows<C>(ctx, a.pooled, C, a.stack.output(), int64_t{T} * C, batch);                 // [B, C]
    layernorm_forward<C>(ctx, a.pooled_ln, training ? a.ln_post_mean : nullptr,
                         training ? a.ln_post_rstd : nullptr, a.pooled, W.w(p.ln_post.weight),
                         W.w(p.ln_post.bias), batch);                                               // [B, C]
    projection_forward<C, E>(ctx, features, a.pooled_ln, W.w(p.proj), batch);                    // [B, E]
  }

  // W.g(...) += d loss / d params, from d_features and the last training forward.
  static void backward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, const S* d_features,
                       int64_t batch) {
    CLIP_CHECK(a.training && batch == a.batch, "backward runs on the batch of the last training forward (", a.batch,
               " images), not ", batch);
    if (batch == 0) return;
    projection_backward<C, E>(ctx, a.d_pooled, W.g(p.proj), d_features, a.pooled_ln, W.w(p.proj), batch);  // [B, C]
    layernorm_backward<C>(ctx, a.d_pooled, W.g(p.ln_post.weight), W.g(p.ln_post.bias), a.d_pooled, a.pooled,
                          a.ln_post_mean, a.ln_post_rstd, W.w(p.ln_post.weight), batch);            // [B, C]
    CLIP_CUDA_CHECK(cudaMemsetAsync(a.d_x, 0, sizeof(S) * batch * T * C, ctx.stream()));
    copy_class_rows<C>(ctx, a.d_x, int64_t{T} * C, a.d_pooled, C, batch);                          // [B, T, C]
    Stack::backward(ctx, W, p.transformer, a.stack, a.d_x, batch, T);                               // [B, T, C]
    layernorm_backward<C>(ctx, a.d_x, W.g(p.ln_pre.weight), W.g(p.ln_pre.bias), a.d_x, a.embed, a.ln_pre_mean,
                          a.ln_pre_rstd, W.w(p.ln_pre.weight), batch * T);                          // [B, T, C]
    S* d_embedded = a.embedded;
    class_and_positions_backward<N, C>(ctx, d_embedded, W.g(p.class_embedding), W.g(p.positional_embedding), a.d_x,
                                       batch);                                                      // [B, N, C]
    // conv1 has no bias and its input (pixels) needs no gradient: the weight gradient only.
    linear_backward<P, C>(ctx, static_cast<S*>(nullptr), W.g(p.conv1.weight), static_cast<float*>(nullptr),
                          d_embedded, a.patches, W.w(p.conv1.weight), batch * N);                  // [C, P]
  }
};

}  // namespace clip::cuda
