// A stack of residual attention blocks ("resblocks.{i}."), OpenAI's Transformer module.
#pragma once

#include <array>
#include <cstdint>
#include <string>

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
};

}  // namespace clip
