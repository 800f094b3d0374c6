// CLIP's text tower on the GPU (mirrors include/clip/models/text_transformer.hpp):
//   token + positional embedding -> causal transformer -> row of the first maximum id (end of
//   text) -> ln_final -> @ text_projection.
// A batch runs only `positions` = max(pool) + 1 positions (TextBatch::from_host computes it from
// the host ids, as TextTransformer::positions_needed): with the causal mask, later positions
// never reach a pooled row.
#pragma once

#include <cstdint>
#include <vector>

#include "clip/models/text_transformer.hpp"
#include "clip/ops/embedding.hpp"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/embedding.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/linear.cuh"
#include "kernels/models/device_weights.cuh"
#include "kernels/models/transformer.cuh"

namespace clip::cuda {

// Host-side facts about a batch of token rows: where each caption pools and how many positions
// the batch needs. Checks the ids (as the CPU forward does).
struct TextBatch {
  std::vector<int32_t> pool;  // [B] first argmax of each row
  int64_t positions = 1;      // max(pool) + 1

  template <class Id>
  static TextBatch from_host(const Id* tokens, int64_t batch, int64_t context, int64_t vocab) {
    check_token_ids(tokens, batch * context, vocab);
    TextBatch tb;
    tb.pool.resize(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      tb.pool[b] = static_cast<int32_t>(pool_position(tokens + b * context, context));
      tb.positions = std::max<int64_t>(tb.positions, tb.pool[b] + 1);
    }
    return tb;
  }
};

template <class Cfg, class S>
struct CudaTextTransformer {
  using Host = TextTransformer<Cfg>;
  using Params = typename Host::Params;
  static constexpr int C = Host::C, T = Host::T, V = Host::V, E = Host::E;
  using Stack = CudaTransformer<C, text_dims<Cfg>::heads, text_dims<Cfg>::layers, T, /*Causal=*/true, S>;

  struct Acts {
    int64_t capacity = 0;
    bool training = false;
    int64_t batch = 0, tokens = 0;          // of the last training forward
    const int32_t* ids = nullptr;           // its device ids and pool positions (the caller keeps them)
    const int32_t* pool = nullptr;
    typename Stack::Acts stack;
    S* pooled = nullptr;                    // [B, C]
    S* pooled_ln = nullptr;                 // [B, C]
    float* ln_mean = nullptr, *ln_rstd = nullptr;  // [B]
    S* d_pooled = nullptr;                  // [B, C]
    S* d_x = nullptr;                       // [B, T, C]

    Acts(Arena& arena, int64_t capacity_, bool training_, bool recompute = false)
        : capacity(capacity_), training(training_) {
      const int64_t b = capacity;
      stack = typename Stack::Acts(arena, b, training, recompute);
      pooled = arena.take<S>(b * C);
      pooled_ln = arena.take<S>(b * C);
      if (training) {
        ln_mean = arena.take<float>(b); ln_rstd = arena.take<float>(b);
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

  // features [B, E] of device ids [B, T] (valid ids: TextBatch::from_host checks them), their
  // pool positions [B] and positions = max(pool) + 1. Training keeps ids/pool pointers: they
  // must stay valid until backward.
  static void forward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, const int32_t* ids,
                      const int32_t* pool, int64_t positions, S* features, int64_t batch, bool training) {
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the text activations hold ", a.capacity, " captions, not ", batch);
    CLIP_CHECK(positions > 0 && positions <= T, "a caption has 1 to ", T, " positions, not ", positions);
    CLIP_CHECK(!training || a.training, "a training forward needs training activations");
    a.batch = batch;
    a.tokens = positions;
    a.ids = ids;
    a.pool = pool;
    if (batch == 0) return;
    const int64_t t = positions;
    token_embedding_forward<C>(ctx, a.stack.input(0), ids, T, t, W.w(p.token_embedding.weight),
                               W.w(p.positional_embedding), batch);                                 // [B, t, C]
    if (training) Stack::forward_train(ctx, W, p.transformer, a.stack, batch, t);
    else Stack::forward(ctx, W, p.transformer, a.stack, batch, t);                                  // [B, t, C]
    gather_rows<C>(ctx, a.pooled, static_cast<const S*>(a.stack.output()), pool, t, batch);        // [B, C]
    // LayerNorm is row-wise: ln_final on the pooled rows only.
    layernorm_forward<C>(ctx, a.pooled_ln, training ? a.ln_mean : nullptr, training ? a.ln_rstd : nullptr, a.pooled,
                         W.w(p.ln_final.weight), W.w(p.ln_final.bias), batch);                      // [B, C]
    projection_forward<C, E>(ctx, features, a.pooled_ln, W.w(p.text_projection), batch);          // [B, E]
  }

  static void backward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, const S* d_features,
                       int64_t batch) {
    CLIP_CHECK(a.training && batch == a.batch, "backward runs on the batch of the last training forward (", a.batch,
               " captions), not ", batch);
    if (batch == 0) return;
    const int64_t t = a.tokens;
    projection_backward<C, E>(ctx, a.d_pooled, W.g(p.text_projection), d_features, a.pooled_ln,
                              W.w(p.text_projection), batch);                                       // [B, C]
    layernorm_backward<C>(ctx, a.d_pooled, W.g(p.ln_final.weight), W.g(p.ln_final.bias), a.d_pooled, a.pooled,
                          a.ln_mean, a.ln_rstd, W.w(p.ln_final.weight), batch);                     // [B, C]
    scatter_rows<C>(ctx, a.d_x, static_cast<const S*>(a.d_pooled), a.pool, t, batch);             // [B, t, C]
    Stack::backward(ctx, W, p.transformer, a.stack, a.d_x, batch, t);                               // [B, t, C]
    token_embedding_backward<C>(ctx, W.g(p.token_embedding.weight), W.g(p.positional_embedding),
                                static_cast<const S*>(a.d_x), a.ids, T, t, batch);                  // [V, C], [T, C]
  }
};

}  // namespace clip::cuda
