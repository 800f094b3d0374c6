// CLIP's text encoder: token + positional embedding -> causal transformer -> ln_final -> the row
// of the first maximum token id (end of text) -> @ text_projection.
//
// Because of the causal mask, positions after a caption's end-of-text token never influence the
// row it is pooled at. Without a trace, the forward therefore runs only the first
// max(pool position) + 1 positions of the batch (and ln_final only on the pooled rows): a batch
// of short captions costs a fraction of 77 positions. The result is the same computation (equal
// up to float rounding: Eigen's GEMM blocking, and so the order of some additions, depends on the
// row count). A trace runs all positions, as the reference does.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/models/transformer.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/linear.hpp"
#include "clip/tensor/param.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

template <Variant Cfg>
struct TextTransformer {
  using dims = text_dims<Cfg>;
  static constexpr int C = dims::width;    // C
  static constexpr int T = dims::context;  // T
  static constexpr int V = dims::vocab;    // V
  static constexpr int E = dims::embed;    // E
  using Stack = Transformer<C, dims::heads, dims::layers, T, /*Causal=*/true>;

  // The text tower's weights. In OpenAI's CLIP module they sit at the top level, interleaved
  // with the visual ones; Clip<Cfg>::Params derives from this struct and visits them in order.
  struct Params {
    Param<T, C> positional_embedding;  // [T, C]
    Param<C, E> text_projection;       // [C, E]
    typename Stack::Params transformer;
    EmbeddingParams<V, C> token_embedding;
    LayerNormParams<C> ln_final;

    // The text tower alone, in OpenAI's relative order.
    template <class F>
    void visit(F&& f, const std::string& prefix) {
      f(prefix + "positional_embedding", positional_embedding, Role::parameter);
      f(prefix + "text_projection", text_projection, Role::parameter);
      transformer.visit(f, prefix + "transformer.");
      token_embedding.visit(f, prefix + "token_embedding.");
      ln_final.visit(f, prefix + "ln_final.");
    }
  };

  // Floats of activation memory per caption during inference (block activations, token rows,
  // pooled row), at the full context length.
  static constexpr int64_t inference_floats_per_sample =
      Stack::Acts::floats_per_sample + int64_t{T} * C + C;

  // Positions a forward without a trace runs for this batch: up to the last pooled position.
  template <std::integral Id>
  static int64_t positions_needed(const Id* tokens, int64_t batch) {
    int64_t needed = 1;
    for (int64_t b = 0; b < batch; ++b) needed = std::max(needed, pool_position(tokens + b * T, T) + 1);
    return needed;
  }

  // features[b] = text encoder(tokens[b]) (unnormalised); tokens [B, T] ids in [0, V).
  // With a trace (all T positions): "text.embed", "text.transformer.resblocks.{i}",
  // "text.ln_final" [B, T, C].
  template <std::integral Id>
  static void forward(const Params& p,
                      const Id* tokens,  // [B, T]
                      float* features,   // [B, E]
                      int64_t batch, Trace* trace = nullptr) {
    CLIP_CHECK(batch >= 0, "a batch size cannot be negative (got ", batch, ")");
    if (batch == 0) return;
    check_token_ids(tokens, batch * T, V);
    std::vector<int64_t> pool(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) pool[b] = pool_position(tokens + b * T, T);
    const int64_t t = trace ? T : positions_needed(tokens, batch);  // positions to run

    std::vector<float> x(static_cast<size_t>(batch * t * C));  // [B, t, C]
    std::vector<float> pooled(static_cast<size_t>(batch * C));  // [B, C]
    embedding_forward<C>(x.data(), tokens, p.token_embedding.weight.data(), p.positional_embedding.data(), batch,
                         T, t);  // [B, t, C]
    record(trace, "text.embed", {batch, t, C}, x.data());
    {
      typename Stack::Acts acts(batch);
      Stack::forward(p.transformer, acts, x.data(), batch, t, trace, "text.transformer");  // [B, t, C]
    }
    for (int64_t b = 0; b < batch; ++b)
      std::memcpy(pooled.data() + b * C, x.data() + (b * t + pool[b]) * C, sizeof(float) * C);
    if (trace) {  // ln_final on every position, as recorded by the reference
      layernorm_forward<C>(x.data(), nullptr, nullptr, x.data(), p.ln_final.weight.data(), p.ln_final.bias.data(),
                           batch * t);
      record(trace, "text.ln_final", {batch, t, C}, x.data());
    }
    // LayerNorm is row-wise: normalising only the pooled rows gives the same values.
    layernorm_forward<C>(pooled.data(), nullptr, nullptr, pooled.data(), p.ln_final.weight.data(),
                         p.ln_final.bias.data(), batch);                               // [B, C]
    projection_forward<C, E>(features, pooled.data(), p.text_projection.data(), batch);  // [B, E]
  }
};

}  // namespace clip
