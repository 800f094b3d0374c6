// OpenAI's VisionTransformer image encoder:
//   patches (conv1, no bias) -> [class token; patches] + positional embedding -> ln_pre
//   -> transformer -> ln_post on the class token -> @ proj.
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

    // im2col: row (b, gy, gx) holds the patch in conv1.weight's (channel, ky, kx) order.
    const int64_t patch_rows = batch * N;
#pragma omp parallel for schedule(static) if (patch_rows > 1)
    for (int64_t r = 0; r < patch_rows; ++r) {
      const int64_t b = r / N, gy = (r % N) / grid, gx = r % grid;
      float* dst = patches.data() + r * P;
      for (int c = 0; c < 3; ++c)
        for (int ky = 0; ky < patch; ++ky) {
          const float* src = images + ((b * 3 + c) * R + gy * patch + ky) * R + gx * patch;
          std::memcpy(dst + (c * patch + ky) * patch, src, sizeof(float) * patch);
        }
    }
    linear_forward<P, C>(embedded.data(), patches.data(), p.conv1.weight.data(), nullptr, patch_rows);  // [B, N, C]
    if (trace) {
      Tensor conv({batch, C, grid, grid});  // NCHW, as the reference records it
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c) conv.values[(b * C + c) * N + n] = embedded[(b * N + n) * C + c];
      (*trace)["visual.conv1"] = std::move(conv);
    }

    // x[b] = [class_embedding; patches[b]] + positional_embedding
    const float* cls = p.class_embedding.data();
    const float* pos = p.positional_embedding.data();
    const int64_t rows = batch * T;
#pragma omp parallel for schedule(static) if (rows * C >= (int64_t{1} << 15))
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* src = t == 0 ? cls : embedded.data() + (b * N + t - 1) * C;
      const float* pe = pos + t * C;
      float* dst = x.data() + r * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) dst[j] = src[j] + pe[j];
    }
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
};

}  // namespace clip
