// A stack of residual attention blocks ("resblocks.{i}."), OpenAI's Transformer module: the
// inference forward (one set of block activations reused layer after layer) and the training
// path (each block's input and activations kept for the backward pass, or only its input with
// the block re-run during backward: activation checkpointing).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/blocks/residual_attention_block.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

template <int Width, int Heads, int Layers, int Tokens, bool Causal>
struct Transformer {
  static_assert(Layers > 0, "a transformer needs at least one layer");
  using Block = ResidualAttentionBlock<Width, Heads, Tokens, Causal>;
  static constexpr int C = Width;
  static constexpr int layers = Layers;

  struct Params {
    std::array<typename Block::Params, Layers> resblocks;

    template <class F>
    void visit(F&& f, const std::string& prefix) {
      for (int i = 0; i < Layers; ++i) resblocks[i].visit(f, prefix + "resblocks." + std::to_string(i) + ".");
    }
  };

  // One block's activations; for inference the stack reuses them layer after layer.
  using Acts = typename Block::Acts;

  // x = resblocks[L-1](... resblocks[0](x)), in place over [B, tokens, C]. With a trace, the
  // output of block i is recorded as "<trace_name>.resblocks.<i>" [B, tokens, C].
  static void forward(const Params& p, Acts& acts,
                      float* x,  // [B, t, C]
                      int64_t batch, int64_t tokens = Tokens, Trace* trace = nullptr,
                      const std::string& trace_name = "transformer") {
    for (int i = 0; i < Layers; ++i) {
      Block::forward(p.resblocks[i], acts, x, x, batch, tokens);
      if (trace) record(trace, trace_name + ".resblocks." + std::to_string(i), {batch, tokens, C}, x);
    }
  }

  // What the backward pass reads, for up to `capacity` samples of up to Tokens tokens: the input
  // of every block and the stack's output (input(Layers)), and the activations of every block, or
  // with `recompute` of one block, re-run from its saved input during backward (one more forward
  // pass of compute for ~1/Layers of the activation memory). Allocated once, reused every step.
  struct TrainActs {
    static constexpr int64_t floats_per_sample(bool recompute = false) {
      return int64_t{Layers + 1} * Tokens * C + (recompute ? 1 : Layers) * Block::Acts::floats_per_sample;
    }

    int64_t capacity = 0;
    bool recompute = false;
    std::vector<float> inputs;                // [Layers + 1, B, t, C]
    std::vector<typename Block::Acts> blocks;  // Layers, or 1 when recomputing

    explicit TrainActs(int64_t capacity_, bool recompute_ = false) : capacity(capacity_), recompute(recompute_) {
      CLIP_CHECK(capacity >= 0, "a batch size cannot be negative (got ", capacity, ")");
      inputs.resize(static_cast<size_t>((Layers + 1) * capacity * Tokens * C));
      for (int i = 0; i < (recompute ? 1 : Layers); ++i) blocks.emplace_back(capacity);
    }

    float* input(int i) { return inputs.data() + int64_t{i} * capacity * Tokens * C; }  // [B, t, C]
    float* output() { return input(Layers); }                                          // [B, t, C]
    typename Block::Acts& acts(int i) { return blocks[recompute ? 0 : i]; }
  };

  // a.output() = the stack applied to a.input(0) (which the caller fills, [B, t, C]), keeping
  // what backward reads. With `pool` ([B] positions), the caller needs the output only at
  // position pool[b] of each sample: the last block runs forward_pooled and a.output() holds
  // those rows, [B, C].
  static void forward_train(const Params& p, TrainActs& a, int64_t batch, int64_t tokens = Tokens,
                            const int64_t* pool = nullptr) {
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the training activations hold ", a.capacity, " samples, not ",
               batch);
    for (int i = 0; i < Layers; ++i) {
      if (pool && i == Layers - 1)
        Block::forward_pooled(p.resblocks[i], a.acts(i), a.input(i), a.output(), pool, batch, tokens);
      else
        Block::forward(p.resblocks[i], a.acts(i), a.input(i), a.input(i + 1), batch, tokens);
    }
  }

  // Backward of forward_train (with the same `pool`): on entry d_x holds d loss / d output
  // ([B, t, C], or [B, C] with pool), on return d loss / d input(0) [B, t, C] (in place);
  // grads += the parameter gradients. Overwrites the saved activations.
  static void backward(const Params& p, TrainActs& a,
                       float* d_x,  // [B, t, C]
                       Params& grads, int64_t batch, int64_t tokens = Tokens, const int64_t* pool = nullptr) {
    CLIP_CHECK(batch >= 0 && batch <= a.capacity, "the training activations hold ", a.capacity, " samples, not ",
               batch);
    for (int i = Layers - 1; i >= 0; --i) {
      // Recomputing: the last block's activations are still there from forward_train; the others
      // are re-run from their saved inputs (rewriting input(i + 1) with the same values).
      if (a.recompute && i < Layers - 1)
        Block::forward(p.resblocks[i], a.acts(i), a.input(i), a.input(i + 1), batch, tokens);
      if (pool && i == Layers - 1)
        Block::backward_pooled(p.resblocks[i], a.acts(i), a.input(i), d_x, d_x, grads.resblocks[i], pool, batch,
                               tokens);
      else
        Block::backward(p.resblocks[i], a.acts(i), a.input(i), d_x, d_x, grads.resblocks[i], batch, tokens);
    }
  }
};

}  // namespace clip
