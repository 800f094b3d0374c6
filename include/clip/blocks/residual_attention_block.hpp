// OpenAI's ResidualAttentionBlock:
//   x = x + out_proj(attention(ln_1(x)))          (causal in the text transformer)
//   x = x + c_proj(QuickGELU(c_fc(ln_2(x))))
// Parameters carry OpenAI's state_dict names; `Acts` holds what the backward pass reads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/ops/activation.hpp"
#include "clip/ops/attention.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/linear.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

template <int Width, int Heads, int Tokens, bool Causal>
struct ResidualAttentionBlock {
  static constexpr int C = Width;          // C
  static constexpr int H = Heads;          // H
  static constexpr int D = Width / Heads;  // D
  static constexpr int T = Tokens;         // T (the most tokens a forward may run)
  static constexpr int F = 4 * Width;      // MLP width
  static constexpr bool causal = Causal;
  static_assert(Width > 0 && Heads > 0 && Tokens > 0, "a residual attention block needs a positive width, head count and token count");
  static_assert(Width % Heads == 0, "the block width must be a multiple of its head count");

  // nn.MultiheadAttention: q, k, v stacked in one in_proj, then out_proj.
  struct Attention {
    Param<3 * C, C> in_proj_weight;  // [3C, C]
    Param<3 * C> in_proj_bias;       // [3C]
    LinearParams<C, C> out_proj;

    template <class Fn>
    void visit(Fn&& f, const std::string& prefix) {
      f(prefix + "in_proj_weight", in_proj_weight, Role::parameter);
      f(prefix + "in_proj_bias", in_proj_bias, Role::parameter);
      out_proj.visit(f, prefix + "out_proj.");
    }
  };

  struct Mlp {
    LinearParams<C, F> c_fc;
    LinearParams<F, C> c_proj;

    template <class Fn>
    void visit(Fn&& f, const std::string& prefix) {
      c_fc.visit(f, prefix + "c_fc.");
      c_proj.visit(f, prefix + "c_proj.");
    }
  };

  struct Params {
    Attention attn;
    LayerNormParams<C> ln_1;
    Mlp mlp;
    LayerNormParams<C> ln_2;

    // OpenAI's state_dict order: attn.*, ln_1.*, mlp.*, ln_2.*.
    template <class Fn>
    void visit(Fn&& f, const std::string& prefix) {
      attn.visit(f, prefix + "attn.");
      ln_1.visit(f, prefix + "ln_1.");
      mlp.visit(f, prefix + "mlp.");
      ln_2.visit(f, prefix + "ln_2.");
    }
  };

  // Activations of one forward pass over up to `capacity` samples of up to T tokens. A forward
  // with t < T tokens packs its rows [B, t, ...] at the start of each buffer.
  struct Acts {
    static constexpr int64_t floats_per_sample =
        int64_t{T} * (C + 1 + 1     // ln1, ln1_mean, ln1_rstd
                      + 3 * C       // qkv
                      + int64_t{H} * T  // probs
                      + C + C       // atty, res1
                      + C + 1 + 1   // ln2, ln2_mean, ln2_rstd
                      + F + F)      // fch, fch_gelu
        + C;                        // q_pooled

    int64_t capacity = 0;
    std::vector<float> storage;
    float* ln1 = nullptr;       // [B, T, C]    ln_1(x)
    float* ln1_mean = nullptr;  // [B, T]
    float* ln1_rstd = nullptr;  // [B, T]
    float* qkv = nullptr;       // [B, T, 3C]   in_proj output
    float* probs = nullptr;     // [B, H, T, T] attention probabilities
    float* atty = nullptr;      // [B, T, C]    heads side by side, before out_proj
    float* res1 = nullptr;      // [B, T, C]    x + attention branch
    float* ln2 = nullptr;       // [B, T, C]    ln_2(res1)
    float* ln2_mean = nullptr;  // [B, T]
    float* ln2_rstd = nullptr;  // [B, T]
    float* fch = nullptr;       // [B, T, F]    c_fc output
    float* fch_gelu = nullptr;  // [B, T, F]    QuickGELU(fch)
    float* q_pooled = nullptr;  // [B, C]       forward_pooled's queries

    Acts() = default;
    explicit Acts(int64_t batch) : capacity(batch) {
      CLIP_CHECK(batch >= 0, "a batch size cannot be negative (got ", batch, ")");
      storage.resize(static_cast<size_t>(batch * floats_per_sample));
      float* p = storage.data();
      const int64_t bt = batch * T;
      auto take = [&](int64_t n) { float* q = p; p += n; return q; };
      ln1 = take(bt * C); ln1_mean = take(bt); ln1_rstd = take(bt);
      qkv = take(bt * 3 * C);
      probs = take(bt * H * T);
      atty = take(bt * C); res1 = take(bt * C);
      ln2 = take(bt * C); ln2_mean = take(bt); ln2_rstd = take(bt);
      fch = take(bt * F); fch_gelu = take(bt * F);
      q_pooled = take(batch * C);
    }
    // The pointers point into `storage`: moving keeps them valid, copying would not.
    Acts(Acts&&) noexcept = default;
    Acts& operator=(Acts&&) noexcept = default;
    Acts(const Acts&) = delete;
    Acts& operator=(const Acts&) = delete;
  };

  // The MLP half over `rows` rows of a.res1: out = res1 + c_proj(QuickGELU(c_fc(ln_2(res1)))),
  // saving ln2 (with its statistics), fch and fch_gelu. Shared by forward() and forward_pooled().
  static void mlp_forward(const Params& p, Acts& a, float* out, int64_t rows) {
    layernorm_forward<C>(a.ln2, a.ln2_mean, a.ln2_rstd, a.res1, p.ln_2.weight.data(), p.ln_2.bias.data(),
                         rows);                                                                    // [rows, C]
    linear_forward<C, F>(a.fch, a.ln2, p.mlp.c_fc.weight.data(), p.mlp.c_fc.bias.data(), rows);    // [rows, F]
    quick_gelu_forward(a.fch_gelu, a.fch, rows * F);                                               // [rows, F]
    linear_residual_forward<F, C>(out, a.fch_gelu, p.mlp.c_proj.weight.data(), p.mlp.c_proj.bias.data(),
                                  a.res1, rows);                                                   // [rows, C]
  }

  // Backward of mlp_forward: returns d res1 (the skip connection's d_out plus ln_2's gradient),
  // held in a.ln2; grads += the MLP's and ln_2's parameter gradients. Overwrites fch_gelu, fch
  // and ln2 with their gradients.
  static float* mlp_backward(const Params& p, Acts& a, const float* d_out, Params& g, int64_t rows) {
    float* d_gelu = a.fch_gelu;
    linear_backward<F, C>(d_gelu, g.mlp.c_proj.weight.data(), g.mlp.c_proj.bias.data(), d_out, a.fch_gelu,
                          p.mlp.c_proj.weight.data(), rows);                                           // [rows, F]
    float* d_fch = a.fch;  // c_fc's bias gradient is summed in the same pass
    quick_gelu_backward<F>(d_fch, g.mlp.c_fc.bias.data(), d_gelu, a.fch, rows);                         // [rows, F]
    float* d_ln2 = a.ln2;
    linear_backward<C, F>(d_ln2, g.mlp.c_fc.weight.data(), nullptr, d_fch, a.ln2, p.mlp.c_fc.weight.data(),
                          rows);                                                                       // [rows, C]
    float* d_res1 = a.ln2;
    layernorm_backward<C>(d_res1, g.ln_2.weight.data(), g.ln_2.bias.data(), d_ln2, a.res1, a.ln2_mean,
                          a.ln2_rstd, p.ln_2.weight.data(), rows, d_out);                              // [rows, C]
    return d_res1;
  }

  // out = block(in) over `batch` samples of `tokens` tokens (default T); rows are packed
  // [B, tokens, C]. `out` may be the same buffer as `in` (the stack runs in place).
  static void forward(const Params& p, Acts& a,
                      const float* in,  // [B, t, C]
                      float* out,       // [B, t, C]
                      int64_t batch, int64_t tokens = T) {
    CLIP_CHECK(batch <= a.capacity, "the activation buffers hold ", a.capacity, " samples, not ", batch);
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    const int64_t rows = batch * tokens;
    layernorm_forward<C>(a.ln1, a.ln1_mean, a.ln1_rstd, in, p.ln_1.weight.data(), p.ln_1.bias.data(),
                         rows);                                                                    // [B, t, C]
    linear_forward<C, 3 * C>(a.qkv, a.ln1, p.attn.in_proj_weight.data(), p.attn.in_proj_bias.data(),
                             rows);                                                                // [B, t, 3C]
    self_attention_forward<H, D>(a.atty, a.probs, a.qkv, batch, tokens, Causal);                   // [B, t, C]
    linear_residual_forward<C, C>(a.res1, a.atty, p.attn.out_proj.weight.data(),
                                  p.attn.out_proj.bias.data(), in, rows);                          // [B, t, C]
    mlp_forward(p, a, out, rows);                                                                  // [B, t, C]
  }

  // The block's output at one position per sample: out[b] = block(in)[b, pool[b]], the row a
  // tower pools (ViT's class token, a caption's end-of-text token) when this is its last block.
  // Keys and values come from every position; the rest (the query's attention, out_proj, the
  // MLP) runs on B rows instead of B t. Row by row these are forward()'s computations (with
  // Causal, position pool[b] attends positions <= pool[b]). The activations of B-row steps are
  // packed [B, ...]; probs is [B, H, 1, t].
  static void forward_pooled(const Params& p, Acts& a,
                             const float* in,     // [B, t, C]
                             float* out,          // [B, C]
                             const int64_t* pool,  // [B] positions < t
                             int64_t batch, int64_t tokens = T) {
    CLIP_CHECK(batch <= a.capacity, "the activation buffers hold ", a.capacity, " samples, not ", batch);
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    const int64_t rows = batch * tokens;
    layernorm_forward<C>(a.ln1, a.ln1_mean, a.ln1_rstd, in, p.ln_1.weight.data(), p.ln_1.bias.data(),
                         rows);                                                                    // [B, t, C]
    linear_forward<C, 3 * C>(a.qkv, a.ln1, p.attn.in_proj_weight.data(), p.attn.in_proj_bias.data(),
                             rows);                                                                // [B, t, 3C]
    for (int64_t b = 0; b < batch; ++b) {
      CLIP_CHECK(pool[b] >= 0 && pool[b] < tokens, "sample ", b, " pools at position ", pool[b], " of ", tokens);
      const int64_t r = b * tokens + pool[b];
      std::copy_n(a.qkv + r * 3 * C, C, a.q_pooled + b * C);  // the query
      std::copy_n(in + r * C, C, a.res1 + b * C);             // the skip connection
    }
    const RowsView<const float> k{a.qkv + C, 3 * C, tokens * 3 * C}, v{a.qkv + 2 * C, 3 * C, tokens * 3 * C};
    attention_forward<H, D>(RowsView<float>{a.atty, C, C}, a.probs, RowsView<const float>{a.q_pooled, C, C}, k, v,
                            batch, 1, tokens, false, Causal ? pool : nullptr);                     // [B, C]
    linear_residual_forward<C, C>(a.res1, a.atty, p.attn.out_proj.weight.data(), p.attn.out_proj.bias.data(),
                                  a.res1, batch);                                                  // [B, C]
    mlp_forward(p, a, out, batch);                                                                 // [B, C]
  }

  // Backward of forward(p, a, in, ...): d_in from d_out (assigned), grads += the parameter
  // gradients. `in` is the forward's input; `a` holds what that forward saved and is used as
  // scratch (the activations are gone afterwards). d_in may be the same buffer as d_out.
  // Each gradient takes the place of an activation the rest of the pass no longer reads:
  //   d fch_gelu -> fch_gelu, d fch -> fch, d ln2 -> ln2, d res1 -> ln2, d atty -> atty,
  //   d qkv -> fch (3C of its F = 4C columns), d ln1 -> ln1.
  static void backward(const Params& p, Acts& a,
                       const float* in,     // [B, t, C] the forward's input
                       const float* d_out,  // [B, t, C]
                       float* d_in,         // [B, t, C]
                       Params& g, int64_t batch, int64_t tokens = T) {
    CLIP_CHECK(batch <= a.capacity, "the activation buffers hold ", a.capacity, " samples, not ", batch);
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    const int64_t rows = batch * tokens;
    if (rows == 0) return;
    const float* d_res1 = mlp_backward(p, a, d_out, g, rows);                                   // [B, t, C]

    // res1 = x + out_proj(attention(in_proj(ln_1(x))))
    float* d_atty = a.atty;
    linear_backward<C, C>(d_atty, g.attn.out_proj.weight.data(), g.attn.out_proj.bias.data(), d_res1, a.atty,
                          p.attn.out_proj.weight.data(), rows);                                        // [B, t, C]
    float* d_qkv = a.fch;
    self_attention_backward<H, D>(d_qkv, d_atty, a.probs, a.qkv, batch, tokens);                        // [B, t, 3C]
    float* d_ln1 = a.ln1;
    linear_backward<C, 3 * C>(d_ln1, g.attn.in_proj_weight.data(), g.attn.in_proj_bias.data(), d_qkv, a.ln1,
                              p.attn.in_proj_weight.data(), rows);                                     // [B, t, C]
    layernorm_backward<C>(d_in, g.ln_1.weight.data(), g.ln_1.bias.data(), d_ln1, in, a.ln1_mean, a.ln1_rstd,
                          p.ln_1.weight.data(), rows, d_res1);                                         // [B, t, C]
  }

  // Backward of forward_pooled(p, a, in, out, pool, ...): d_in [B, t, C] (assigned) from d_out
  // [B, C], grads += the parameter gradients. d_in may be the buffer d_out is at the start of.
  // Buffers are reused as in backward(); the pooled queries' gradient goes to res1 first.
  static void backward_pooled(const Params& p, Acts& a,
                              const float* in,      // [B, t, C] the forward's input
                              const float* d_out,   // [B, C]
                              float* d_in,          // [B, t, C]
                              Params& g,
                              const int64_t* pool,  // [B]
                              int64_t batch, int64_t tokens = T) {
    CLIP_CHECK(batch <= a.capacity, "the activation buffers hold ", a.capacity, " samples, not ", batch);
    CLIP_CHECK(tokens > 0 && tokens <= T, "a block built for ", T, " tokens cannot run ", tokens);
    const int64_t rows = batch * tokens;
    if (rows == 0) return;
    const float* d_res1 = mlp_backward(p, a, d_out, g, batch);                                  // [B, C]
    float* d_atty = a.atty;
    linear_backward<C, C>(d_atty, g.attn.out_proj.weight.data(), g.attn.out_proj.bias.data(), d_res1, a.atty,
                          p.attn.out_proj.weight.data(), batch);                                       // [B, C]

    // Keys and values of every position get gradients; queries only at the pooled positions.
    float* d_qkv = a.fch;
    float* d_q = a.res1;
    std::fill(d_qkv, d_qkv + rows * 3 * C, 0.0f);
    attention_backward<H, D>(RowsView<float>{d_q, C, C}, RowsView<float>{d_qkv + C, 3 * C, tokens * 3 * C},
                             RowsView<float>{d_qkv + 2 * C, 3 * C, tokens * 3 * C},
                             RowsView<const float>{d_atty, C, C}, a.probs, RowsView<const float>{a.q_pooled, C, C},
                             RowsView<const float>{a.qkv + C, 3 * C, tokens * 3 * C},
                             RowsView<const float>{a.qkv + 2 * C, 3 * C, tokens * 3 * C}, batch, 1, tokens);
    for (int64_t b = 0; b < batch; ++b) std::copy_n(d_q + b * C, C, d_qkv + (b * tokens + pool[b]) * 3 * C);
    float* d_ln1 = a.ln1;
    linear_backward<C, 3 * C>(d_ln1, g.attn.in_proj_weight.data(), g.attn.in_proj_bias.data(), d_qkv, a.ln1,
                              p.attn.in_proj_weight.data(), rows);                                     // [B, t, C]
    // d_in = the skip connection's gradient (d_res1 at the pooled rows, 0 elsewhere) + ln_1's.
    std::fill(d_in, d_in + rows * C, 0.0f);
    for (int64_t b = 0; b < batch; ++b) std::copy_n(d_res1 + b * C, C, d_in + (b * tokens + pool[b]) * C);
    layernorm_backward<C>(d_in, g.ln_1.weight.data(), g.ln_1.bias.data(), d_ln1, in, a.ln1_mean, a.ln1_rstd,
                          p.ln_1.weight.data(), rows, d_in);                                           // [B, t, C]
  }
};

}  // namespace clip
