// OpenAI's VisionTransformer image encoder:
//   patches (conv1, no bias) -> [class token; patches] + positional embedding -> ln_pre
//   -> transformer -> ln_post on the class token -> @ proj.
// forward() is inference; forward_train() keeps what backward() reads in a TrainActs allocated
// once per batch capacity. conv1 runs as im2col + one matrix product, so its weight gradient is
// one product too.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/models/transformer.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/linear.hpp"
#include "clip/tensor/param.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

template <ViTConfig Cfg>
struct VisionTransformer {
  using dims = vision_dims<Cfg>;
  static constexpr int R = dims::resolution;    // image side in pixels
  static constexpr int patch = dims::patch;     // patch side in pixels
  static constexpr int grid = dims::grid;       // patches per side
  static constexpr int C = dims::width;         // C
  static constexpr int T = dims::tokens;        // T = grid^2 + 1
  static constexpr int P = dims::patch_pixels;  // P = 3 * patch^2
  static constexpr int E = dims::embed;         // E
  static constexpr int N = grid * grid;         // patches per image
  using Stack = Transformer<C, dims::heads, dims::layers, T, /*Causal=*/false>;

  // conv1: nn.Conv2d(3, C, patch, stride=patch, bias=False).
  struct PatchConv {
    Param<C, 3, patch, patch> weight;  // [C, 3, p, p] = [C, P] row-major

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "weight", weight, Role::parameter);
    }
  };

  struct Params {
    Param<C> class_embedding;          // [C]
    Param<T, C> positional_embedding;  // [T, C]
    Param<C, E> proj;                  // [C, E]
    PatchConv conv1;
    LayerNormParams<C> ln_pre;
    typename Stack::Params transformer;
    LayerNormParams<C> ln_post;

    // OpenAI's state_dict order; the caller passes the prefix ("visual.").
    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "class_embedding", class_embedding, Role::parameter);
      f(prefix + "positional_embedding", positional_embedding, Role::parameter);
      f(prefix + "proj", proj, Role::parameter);
      conv1.visit(f, prefix + "conv1.");
      ln_pre.visit(f, prefix + "ln_pre.");
      transformer.visit(f, prefix + "transformer.");
      ln_post.visit(f, prefix + "ln_post.");
    }
  };

  // im2col: row (b, gy, gx) of `patches` holds that patch in conv1.weight's (channel, ky, kx) order.
  static void im2col(float* patches,       // [B, N, P]
                     const float* images,  // [B, 3, R, R]
                     int64_t batch) {
    const int64_t patch_rows = batch * N;
#pragma omp parallel for schedule(static) if (patch_rows * P >= (int64_t{1} << 15))
    for (int64_t r = 0; r < patch_rows; ++r) {
      const int64_t b = r / N, gy = (r % N) / grid, gx = r % grid;
      float* dst = patches + r * P;
      for (int c = 0; c < 3; ++c)
        for (int ky = 0; ky < patch; ++ky) {
          const float* src = images + ((b * 3 + c) * R + gy * patch + ky) * R + gx * patch;
          std::memcpy(dst + (c * patch + ky) * patch, src, sizeof(float) * patch);
        }
    }
  }

  // x[b] = [class_embedding; embedded[b]] + positional_embedding
  static void add_tokens(float* x,               // [B, T, C]
                         const Params& p,
                         const float* embedded,  // [B, N, C]
                         int64_t batch) {
    const float* cls = p.class_embedding.data();
    const float* pos = p.positional_embedding.data();
    const int64_t rows = batch * T;
#pragma omp parallel for schedule(static) if (rows * C >= (int64_t{1} << 15))
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* src = t == 0 ? cls : embedded + (b * N + t - 1) * C;
      const float* pe = pos + t * C;
      float* dst = x + r * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) dst[j] = src[j] + pe[j];
    }
  }

  // Floats of activation memory per image during inference (block activations, token rows,
  // patches, pooled rows).
  static constexpr int64_t inference_floats_per_sample =
      Stack::Acts::floats_per_sample + int64_t{T} * C + int64_t{N} * (P + C) + 2 * C;

  // features[b] = image encoder(images[b]) (unnormalised). With a trace: "visual.conv1"
  // [B, C, grid, grid], "visual.embed", "visual.ln_pre", "visual.transformer.resblocks.{i}"
  // [B, T, C], "visual.ln_post" [B, C].
  static void forward(const Params& p,
                      const float* images,  // [B, 3, R, R]
                      float* features,      // [B, E]
                      int64_t batch, Trace* trace = nullptr) {
    CLIP_CHECK(batch >= 0, "a batch size cannot be negative (got ", batch, ")");
    if (batch == 0) return;
    std::vector<float> patches(static_cast<size_t>(batch * N * P));  // [B, N, P]
    std::vector<float> embedded(static_cast<size_t>(batch * N * C));  // [B, N, C]
    std::vector<float> x(static_cast<size_t>(batch * T * C));         // [B, T, C]
    std::vector<float> pooled(static_cast<size_t>(batch * C));        // [B, C]

    const int64_t patch_rows = batch * N;
    im2col(patches.data(), images, batch);
    linear_forward<P, C>(embedded.data(), patches.data(), p.conv1.weight.data(), nullptr, patch_rows);  // [B, N, C]
    if (trace) {
      Tensor conv({batch, C, grid, grid});  // NCHW, as the reference records it
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c) conv.values[(b * C + c) * N + n] = embedded[(b * N + n) * C + c];
      (*trace)["visual.conv1"] = std::move(conv);
    }

    const int64_t rows = batch * T;
    add_tokens(x.data(), p, embedded.data(), batch);
    record(trace, "visual.embed", {batch, T, C}, x.data());

    layernorm_forward<C>(x.data(), nullptr, nullptr, x.data(), p.ln_pre.weight.data(), p.ln_pre.bias.data(),
                         rows);  // [B, T, C]
    record(trace, "visual.ln_pre", {batch, T, C}, x.data());

    {
      typename Stack::Acts acts(batch);
      Stack::forward(p.transformer, acts, x.data(), batch, T, trace, "visual.transformer");  // [B, T, C]
    }

    for (int64_t b = 0; b < batch; ++b)  // the class token of each image
      std::memcpy(pooled.data() + b * C, x.data() + b * T * C, sizeof(float) * C);
    layernorm_forward<C>(pooled.data(), nullptr, nullptr, pooled.data(), p.ln_post.weight.data(),
                         p.ln_post.bias.data(), batch);  // [B, C]
    record(trace, "visual.ln_post", {batch, C}, pooled.data());

    projection_forward<C, E>(features, pooled.data(), p.proj.data(), batch);  // [B, E]
  }

  // Everything backward reads, for up to `capacity` images; allocated once, reused every step.
  // With `recompute`, the transformer keeps only each block's input and re-runs the block during
  // backward (see Transformer::TrainActs).
  struct TrainActs {
    static constexpr int64_t floats_per_sample(bool recompute = false) {
      return Stack::TrainActs::floats_per_sample(recompute)  // block inputs and activations
             + int64_t{N} * P                                 // patches
             + int64_t{T} * (C + 2)                           // embed, ln_pre statistics
             + int64_t{T} * C                                 // d_x (conv1 output during forward)
             + 2 * int64_t{C} + 2;                            // pooled_ln, d_pooled, ln_post statistics
    }

    int64_t capacity = 0;
    int64_t batch = 0;  // of the last forward_train
    typename Stack::TrainActs stack;
    std::vector<int64_t> class_token;  // [B] zeros: the position each image pools at
    std::vector<float> storage;
    float* patches = nullptr;       // [B, N, P]  im2col of the images
    float* embed = nullptr;         // [B, T, C]  ln_pre's input
    float* ln_pre_mean = nullptr;   // [B, T]
    float* ln_pre_rstd = nullptr;   // [B, T]
    float* d_x = nullptr;           // [B, T, C]  the tokens' gradient; conv1's output during forward
    float* pooled_ln = nullptr;     // [B, C]     ln_post(class tokens)
    float* ln_post_mean = nullptr;  // [B]
    float* ln_post_rstd = nullptr;  // [B]
    float* d_pooled = nullptr;      // [B, C]

    explicit TrainActs(int64_t capacity_, bool recompute = false)
        : capacity(capacity_), stack(capacity_, recompute), class_token(static_cast<size_t>(capacity_), 0) {
      const int64_t b = capacity;
      const int64_t own = floats_per_sample(recompute) - Stack::TrainActs::floats_per_sample(recompute);
      storage.resize(static_cast<size_t>(b * own));
      float* q = storage.data();
      auto take = [&](int64_t n) { float* r = q; q += n; return r; };
      patches = take(b * N * P);
      embed = take(b * T * C); ln_pre_mean = take(b * T); ln_pre_rstd = take(b * T);
      d_x = take(b * T * C);
      pooled_ln = take(b * C); ln_post_mean = take(b); ln_post_rstd = take(b);
      d_pooled = take(b * C);
    }
    // The pointers point into `storage`: moving keeps them valid, copying would not.
    TrainActs(TrainActs&&) noexcept = default;
    TrainActs& operator=(TrainActs&&) noexcept = default;
    TrainActs(const TrainActs&) = delete;
    TrainActs& operator=(const TrainActs&) = delete;
  };

  // features = image encoder(images), as forward() computes them, keeping in `a` what backward
  // reads. Only the class token leaves the transformer, so its last block runs the other tokens
  // only as keys and values (Transformer::forward_train with pool). `update_running_stats` is for
  // the image-tower interface shared with ModifiedResNet; a vision transformer has no running
  // statistics and ignores it.
  static void forward_train(const Params& p, TrainActs& a,
                            const float* images,  // [B, 3, R, R]
                            float* features,      // [B, E]
                            int64_t batch, bool update_running_stats = true) {
    (void)update_running_stats;
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the training activations hold ", a.capacity, " images, not ",
               batch);
    a.batch = batch;
    if (batch == 0) return;
    im2col(a.patches, images, batch);                                                              // [B, N, P]
    float* embedded = a.d_x;  // free until backward
    linear_forward<P, C>(embedded, a.patches, p.conv1.weight.data(), nullptr, batch * N);          // [B, N, C]
    add_tokens(a.embed, p, embedded, batch);                                                       // [B, T, C]
    layernorm_forward<C>(a.stack.input(0), a.ln_pre_mean, a.ln_pre_rstd, a.embed, p.ln_pre.weight.data(),
                         p.ln_pre.bias.data(), batch * T);                                         // [B, T, C]
    Stack::forward_train(p.transformer, a.stack, batch, T, a.class_token.data());                  // [B, C]
    layernorm_forward<C>(a.pooled_ln, a.ln_post_mean, a.ln_post_rstd, a.stack.output(), p.ln_post.weight.data(),
                         p.ln_post.bias.data(), batch);                                            // [B, C]
    projection_forward<C, E>(features, a.pooled_ln, p.proj.data(), batch);                        // [B, E]
  }

  // grads += d loss / d params from d_features and what the last forward_train saved in `a`
  // (which this overwrites).
  static void backward(const Params& p, TrainActs& a,
                       const float* d_features,  // [B, E]
                       Params& grads, int64_t batch) {
    CLIP_CHECK(batch == a.batch, "backward runs on the batch of the last forward_train (", a.batch,
               " images), not ", batch);
    if (batch == 0) return;
    projection_backward<C, E>(a.d_pooled, grads.proj.data(), d_features, a.pooled_ln, p.proj.data(), batch);  // [B, C]
    layernorm_backward<C>(a.d_x, grads.ln_post.weight.data(), grads.ln_post.bias.data(), a.d_pooled,
                          a.stack.output(), a.ln_post_mean, a.ln_post_rstd, p.ln_post.weight.data(), batch);  // [B, C]
    Stack::backward(p.transformer, a.stack, a.d_x, grads.transformer, batch, T, a.class_token.data());  // [B, T, C]
    layernorm_backward<C>(a.d_x, grads.ln_pre.weight.data(), grads.ln_pre.bias.data(), a.d_x, a.embed,
                          a.ln_pre_mean, a.ln_pre_rstd, p.ln_pre.weight.data(), batch * T);        // [B, T, C]

    // x[b] = [class_embedding; conv1(patches[b])] + positional_embedding
    column_sums_accumulate(grads.positional_embedding.data(), a.d_x, batch, int64_t{T} * C);       // [T, C]
    float* d_cls = grads.class_embedding.data();
    for (int64_t b = 0; b < batch; ++b) {
      const float* g = a.d_x + b * T * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) d_cls[j] += g[j];
    }
    float* d_embedded = a.embed;  // [B, N, C], gathered where ln_pre's input was
    for (int64_t b = 0; b < batch; ++b)
      std::memcpy(d_embedded + b * N * C, a.d_x + (b * T + 1) * C, sizeof(float) * N * C);
    gemm_tn(C, P, batch * N, d_embedded, C, a.patches, P, grads.conv1.weight.data(), P, /*accumulate=*/true);  // [C, P]
  }
};

}  // namespace clip
