// CLIP's text encoder: token + positional embedding -> causal transformer -> ln_final -> the row
// of the first maximum token id (end of text) -> @ text_projection.
//
// Because of the causal mask, positions after a caption's end-of-text token never influence the
// row it is pooled at. Without a trace, the forward therefore runs only the first
// max(pool position) + 1 positions of the batch (and ln_final only on the pooled rows): a batch
// of short captions costs a fraction of 77 positions. The result is the same computation (equal
// up to float rounding: Eigen's GEMM blocking, and so the order of some additions, depends on the
// row count). A trace runs all positions, as the reference does.
//
// forward_train() runs the same positions and keeps what backward() reads in a TrainActs
// allocated once per batch capacity.
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

  // Everything backward reads, for up to `capacity` captions; allocated once, reused every step.
  // With `recompute`, the transformer keeps only each block's input and re-runs the block during
  // backward (see Transformer::TrainActs).
  struct TrainActs {
    static constexpr int64_t floats_per_sample(bool recompute = false) {
      return Stack::TrainActs::floats_per_sample(recompute)  // block inputs and activations
             + int64_t{T} * C                                 // d_x
             + 2 * int64_t{C} + 2;                            // pooled_ln, d_pooled, ln_final statistics
    }

    int64_t capacity = 0;
    int64_t batch = 0;   // of the last forward_train
    int64_t tokens = 0;  // positions it ran
    typename Stack::TrainActs stack;
    std::vector<int32_t> ids;   // [B, T] the token ids (below 2^31: V is an int)
    std::vector<int64_t> pool;  // [B] pooled position of each caption
    std::vector<float> storage;
    float* d_x = nullptr;            // [B, t, C]
    float* pooled_ln = nullptr;      // [B, C]  ln_final of the pooled rows
    float* ln_final_mean = nullptr;  // [B]
    float* ln_final_rstd = nullptr;  // [B]
    float* d_pooled = nullptr;       // [B, C]

    explicit TrainActs(int64_t capacity_, bool recompute = false)
        : capacity(capacity_), stack(capacity_, recompute),
          ids(static_cast<size_t>(capacity_ * T)), pool(static_cast<size_t>(capacity_)) {
      const int64_t b = capacity;
      const int64_t own = floats_per_sample(recompute) - Stack::TrainActs::floats_per_sample(recompute);
      storage.resize(static_cast<size_t>(b * own));
      float* q = storage.data();
      auto take = [&](int64_t n) { float* r = q; q += n; return r; };
      d_x = take(b * T * C);
      pooled_ln = take(b * C); ln_final_mean = take(b); ln_final_rstd = take(b);
      d_pooled = take(b * C);
    }
    // The pointers point into `storage`: moving keeps them valid, copying would not.
    TrainActs(TrainActs&&) noexcept = default;
    TrainActs& operator=(TrainActs&&) noexcept = default;
    TrainActs(const TrainActs&) = delete;
    TrainActs& operator=(const TrainActs&) = delete;
  };

  // features = text encoder(tokens), as forward() computes them over the positions the batch
  // needs, keeping in `a` what backward reads. Only the pooled rows leave the transformer, so its
  // last block runs the other positions only as keys and values (Transformer::forward_train with
  // pool).
  template <std::integral Id>
  static void forward_train(const Params& p, TrainActs& a,
                            const Id* tokens,  // [B, T]
                            float* features,   // [B, E]
                            int64_t batch) {
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the training activations hold ", a.capacity,
               " captions, not ", batch);
    a.batch = batch;
    if (batch == 0) return;
    check_token_ids(tokens, batch * T, V);
    for (int64_t i = 0; i < batch * T; ++i) a.ids[i] = static_cast<int32_t>(tokens[i]);
    for (int64_t b = 0; b < batch; ++b) a.pool[b] = pool_position(tokens + b * T, T);
    const int64_t t = a.tokens = positions_needed(tokens, batch);

    embedding_forward<C>(a.stack.input(0), a.ids.data(), p.token_embedding.weight.data(),
                         p.positional_embedding.data(), batch, T, t);                            // [B, t, C]
    Stack::forward_train(p.transformer, a.stack, batch, t, a.pool.data());                      // [B, C]
    // LayerNorm is row-wise: ln_final on the pooled rows only.
    layernorm_forward<C>(a.pooled_ln, a.ln_final_mean, a.ln_final_rstd, a.stack.output(), p.ln_final.weight.data(),
                         p.ln_final.bias.data(), batch);                                         // [B, C]
    projection_forward<C, E>(features, a.pooled_ln, p.text_projection.data(), batch);           // [B, E]
  }

  // grads += d loss / d params from d_features and what the last forward_train saved in `a`
  // (which this overwrites). Token-embedding rows of ids absent from the batch stay untouched.
  // The model's gradient struct can be passed as it is: Clip<Cfg>::Params derives from Params.
  static void backward(const Params& p, TrainActs& a,
                       const float* d_features,  // [B, E]
                       Params& grads, int64_t batch) {
    CLIP_CHECK(batch == a.batch, "backward runs on the batch of the last forward_train (", a.batch,
               " captions), not ", batch);
    if (batch == 0) return;
    const int64_t t = a.tokens;
    projection_backward<C, E>(a.d_pooled, grads.text_projection.data(), d_features, a.pooled_ln,
                              p.text_projection.data(), batch);                                 // [B, C]
    layernorm_backward<C>(a.d_x, grads.ln_final.weight.data(), grads.ln_final.bias.data(), a.d_pooled,
                          a.stack.output(), a.ln_final_mean, a.ln_final_rstd, p.ln_final.weight.data(),
                          batch);                                                                // [B, C]
    Stack::backward(p.transformer, a.stack, a.d_x, grads.transformer, batch, t, a.pool.data());  // [B, t, C]
    embedding_backward<C>(grads.token_embedding.weight.data(), grads.positional_embedding.data(), a.d_x,
                          a.ids.data(), batch, T, t);                                            // [V, C], [T, C]
  }
};

}  // namespace clip
