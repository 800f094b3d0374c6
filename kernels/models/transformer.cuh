// The residual attention block and the block stack on the GPU, mirroring
// include/clip/blocks/residual_attention_block.hpp and include/clip/models/transformer.hpp:
//   x = x + out_proj(attention(ln_1(x)))          (causal in the text transformer)
//   x = x + c_proj(QuickGELU(c_fc(ln_2(x))))
// Activations are S, LayerNorm statistics and the attention logsumexp float. A forward with
// t < T tokens packs its rows [B, t, ...] at the start of every buffer (as the CPU does).
//
// Unlike the CPU, the last block is not run "pooled" (queries only at the pooled row): the plan's
// attention takes one causal offset for the whole batch, not one per caption, so the stack runs
// every row of every block and the tower gathers the pooled rows afterwards (same values).
#pragma once

#include <cstdint>
#include <vector>

#include "clip/blocks/residual_attention_block.hpp"
#include "clip/models/transformer.hpp"
#include "kernels/activation.cuh"
#include "kernels/attention.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/linear.cuh"
#include "kernels/models/device_weights.cuh"

namespace clip::cuda {

template <int Width, int Heads, int Tokens, bool Causal, class S>
struct CudaResidualBlock {
  static constexpr int C = Width;          // C
  static constexpr int H = Heads;          // H
  static constexpr int D = Width / Heads;  // D
  static constexpr int T = Tokens;         // T (the most tokens a forward may run)
  static constexpr int F = 4 * Width;      // MLP width
  using Host = ResidualAttentionBlock<Width, Heads, Tokens, Causal>;
  using Params = typename Host::Params;

  // What one forward keeps for backward, for up to `capacity` samples of up to T tokens.
  // Without `training` the LayerNorm statistics and logsumexp are not kept (null).
  struct Acts {
    S* ln1 = nullptr;         // [B, T, C]  ln_1(x)
    float* ln1_mean = nullptr, *ln1_rstd = nullptr;  // [B, T]
    S* qkv = nullptr;         // [B, T, 3C] in_proj output
    S* atty = nullptr;        // [B, T, C]  heads side by side, before out_proj
    float* lse = nullptr;     // [B, H, T]  attention logsumexp
    S* res1 = nullptr;        // [B, T, C]  x + attention branch
    S* ln2 = nullptr;         // [B, T, C]  ln_2(res1)
    float* ln2_mean = nullptr, *ln2_rstd = nullptr;  // [B, T]
    S* fch = nullptr;         // [B, T, F]  c_fc output + bias (QuickGELU's input)
    S* fch_gelu = nullptr;    // [B, T, F]  QuickGELU(fch)

    Acts() = default;
    Acts(Arena& arena, int64_t capacity, bool training) {
      const int64_t bt = capacity * T;
      ln1 = arena.take<S>(bt * C);
      qkv = arena.take<S>(bt * 3 * C);
      atty = arena.take<S>(bt * C);
      res1 = arena.take<S>(bt * C);
      ln2 = arena.take<S>(bt * C);
      fch = arena.take<S>(bt * F);
      fch_gelu = arena.take<S>(bt * F);
      if (training) {
        ln1_mean = arena.take<float>(bt); ln1_rstd = arena.take<float>(bt);
        ln2_mean = arena.take<float>(bt); ln2_rstd = arena.take<float>(bt);
        lse = arena.take<float>(bt * H);
      }
    }
  };

  // Backward's gradient buffers, shared by every block of a stack (one block runs at a time).
  struct Scratch {
    S* d_f = nullptr;        // [B, T, F]  d QuickGELU output / d fch; then d qkv ([B, T, 3C] <= F)
    S* d_c = nullptr;        // [B, T, C]  d ln2, d atty, d ln1
    float* att = nullptr;    // [B, H, T]  attention backward's row statistics

    Scratch() = default;
    Scratch(Arena& arena, int64_t capacity) {
      d_f = arena.take<S>(capacity * T * F);
      d_c = arena.take<S>(capacity * T * C);
      att = arena.take<float>(capacity * H * T);
    }
  };

  // out = block(in); `out` may be `in` (the inference stack runs in place: `in` is last read by
  // out_proj's residual, before the MLP writes `out`).
  static void forward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a,
                      const S* in,  // [B, t, C]
                      S* out,       // [B, t, C]
                      int64_t batch, int64_t tokens) {
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    const int64_t rows = batch * tokens;
    if (rows == 0) return;
    layernorm_forward<C>(ctx, a.ln1, a.ln1_mean, a.ln1_rstd, in, W.w(p.ln_1.weight), W.w(p.ln_1.bias), rows);
    linear_forward<C, 3 * C>(ctx, a.qkv, a.ln1, W.w(p.attn.in_proj_weight), W.w(p.attn.in_proj_bias), rows);  // [B, t, 3C]
    self_attention_forward<H, D, T, Causal>(ctx, a.atty, a.lse, a.qkv, batch, tokens);                      // [B, t, C]
    linear_forward<C, C>(ctx, a.res1, a.atty, W.w(p.attn.out_proj.weight), W.w(p.attn.out_proj.bias), rows,
                         in);                                                                               // [B, t, C]
    layernorm_forward<C>(ctx, a.ln2, a.ln2_mean, a.ln2_rstd, a.res1, W.w(p.ln_2.weight), W.w(p.ln_2.bias), rows);
    // c_fc without bias: the bias add is fused into QuickGELU, which keeps pre-activation + bias.
    linear_forward<C, F>(ctx, a.fch, a.ln2, W.w(p.mlp.c_fc.weight), static_cast<const S*>(nullptr), rows);  // [B, t, F]
    bias_quick_gelu_forward<F>(ctx, a.fch_gelu, a.fch, W.w(p.mlp.c_fc.bias), rows);                          // [B, t, F]
    linear_forward<F, C>(ctx, out, a.fch_gelu, W.w(p.mlp.c_proj.weight), W.w(p.mlp.c_proj.bias), rows,
                         static_cast<const S*>(a.res1));                                                    // [B, t, C]
  }

  // Backward of forward(in): d_in (assigned) from d_out; W.g(...) += the parameter gradients.
  // d_in may be d_out (d_out is last read by ln_2's backward, before ln_1's writes d_in).
  // Buffer reuse: d res1 -> ln2 (free once c_fc's weight gradient is formed), d ln1 -> atty
  // (free once attention's backward has read it); the rest lives in the shared Scratch.
  static void backward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, Scratch& s,
                       const S* in,     // [B, t, C] the forward's input
                       const S* d_out,  // [B, t, C]
                       S* d_in,         // [B, t, C]
                       int64_t batch, int64_t tokens) {
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    CLIP_CHECK(a.lse != nullptr, "block backward needs activations kept by a training forward");
    const int64_t rows = batch * tokens;
    if (rows == 0) return;
    // MLP: out = res1 + c_proj(QuickGELU(c_fc(ln_2(res1))))
    linear_backward<F, C>(ctx, s.d_f, W.g(p.mlp.c_proj.weight), W.g(p.mlp.c_proj.bias), d_out, a.fch_gelu,
                          W.w(p.mlp.c_proj.weight), rows);                                                  // [B, t, F]
    quick_gelu_backward<F>(ctx, s.d_f, W.g(p.mlp.c_fc.bias), s.d_f, a.fch, rows);                           // [B, t, F]
    linear_backward<C, F>(ctx, s.d_c, W.g(p.mlp.c_fc.weight), static_cast<float*>(nullptr), s.d_f, a.ln2,
                          W.w(p.mlp.c_fc.weight), rows);                                                    // [B, t, C]
    S* d_res1 = a.ln2;
    layernorm_backward<C>(ctx, d_res1, W.g(p.ln_2.weight), W.g(p.ln_2.bias), s.d_c, a.res1, a.ln2_mean, a.ln2_rstd,
                          W.w(p.ln_2.weight), rows, d_out);                                                 // [B, t, C]
    // Attention: res1 = x + out_proj(attention(in_proj(ln_1(x))))
    S* d_atty = s.d_c;
    linear_backward<C, C>(ctx, d_atty, W.g(p.attn.out_proj.weight), W.g(p.attn.out_proj.bias), d_res1, a.atty,
                          W.w(p.attn.out_proj.weight), rows);                                               // [B, t, C]
    S* d_qkv = s.d_f;
    self_attention_backward<H, D, T, Causal>(ctx, d_qkv, d_atty, a.qkv, a.atty, a.lse, s.att, batch, tokens);  // [B, t, 3C]
    S* d_ln1 = a.atty;
    linear_backward<C, 3 * C>(ctx, d_ln1, W.g(p.attn.in_proj_weight), W.g(p.attn.in_proj_bias), d_qkv, a.ln1,
                              W.w(p.attn.in_proj_weight), rows);                                            // [B, t, C]
    layernorm_backward<C>(ctx, d_in, W.g(p.ln_1.weight), W.g(p.ln_1.bias), d_ln1, in, a.ln1_mean, a.ln1_rstd,
                          W.w(p.ln_1.weight), rows, static_cast<const S*>(d_res1));                          // [B, t, C]
  }
};

// The stack ("resblocks.{i}."). Inference runs every block in place on input(0) with one set of
// block activations; training keeps every block's input (input(i), output() = input(Layers)) and
// every block's activations, or with `recompute` one set, the blocks re-run during backward.
template <int Width, int Heads, int Layers, int Tokens, bool Causal, class S>
struct CudaTransformer {
  using Block = CudaResidualBlock<Width, Heads, Tokens, Causal, S>;
  using Host = Transformer<Width, Heads, Layers, Tokens, Causal>;
  using Params = typename Host::Params;
  static constexpr int C = Width;
  static constexpr int T = Tokens;

  struct Acts {
    int64_t capacity = 0;
    bool training = false, recompute = false;
    std::vector<S*> inputs;                     // Layers + 1 (training) or 1 buffers of [B, T, C]
    std::vector<typename Block::Acts> blocks;   // Layers, or 1 (inference, recompute)
    typename Block::Scratch scratch;            // training only

    Acts() = default;
    Acts(Arena& arena, int64_t capacity_, bool training_, bool recompute_ = false)
        : capacity(capacity_), training(training_), recompute(training_ && recompute_) {
      for (int i = 0; i < (training ? Layers + 1 : 1); ++i) inputs.push_back(arena.take<S>(capacity * T * C));
      for (int i = 0; i < (training && !recompute ? Layers : 1); ++i) blocks.emplace_back(arena, capacity, training);
      if (training) scratch = typename Block::Scratch(arena, capacity);
    }
    S* input(int i) { return inputs[i]; }
    S* output() { return training ? inputs[Layers] : inputs[0]; }
    typename Block::Acts& acts(int i) { return blocks.size() == 1 ? blocks[0] : blocks[i]; }
  };

  // Inference: a.input(0) (filled by the caller) = the stack applied to it, in place.
  static void forward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, int64_t batch,
                      int64_t tokens) {
    CLIP_CHECK(batch <= a.capacity, "the activations hold ", a.capacity, " samples, not ", batch);
    for (int i = 0; i < Layers; ++i)
      Block::forward(ctx, W, p.resblocks[i], a.acts(i), a.input(0), a.input(0), batch, tokens);
  }

  // Training: a.output() = the stack applied to a.input(0), keeping what backward reads.
  static void forward_train(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, int64_t batch,
                            int64_t tokens) {
    CLIP_CHECK(a.training, "forward_train needs training activations");
    CLIP_CHECK(batch <= a.capacity, "the activations hold ", a.capacity, " samples, not ", batch);
    for (int i = 0; i < Layers; ++i)
      Block::forward(ctx, W, p.resblocks[i], a.acts(i), a.input(i), a.input(i + 1), batch, tokens);
  }

  // d_x: d loss / d output on entry, d loss / d input(0) on return ([B, t, C], in place).
  static void backward(Context& ctx, const DeviceWeights<S>& W, const Params& p, Acts& a, S* d_x, int64_t batch,
                       int64_t tokens) {
    CLIP_CHECK(a.training, "backward needs training activations");
    for (int i = Layers - 1; i >= 0; --i) {
      if (a.recompute && i < Layers - 1)  // the last block's activations are still there
        Block::forward(ctx, W, p.resblocks[i], a.acts(i), a.input(i), a.input(i + 1), batch, tokens);
      Block::backward(ctx, W, p.resblocks[i], a.acts(i), a.scratch, a.input(i), d_x, d_x, batch, tokens);
    }
  }
};

}  // namespace clip::cuda
