// OpenAI's ResidualAttentionBlock:
//   x = x + out_proj(attention(ln_1(x)))          (causal in the text transformer)
//   x = x + c_proj(QuickGELU(c_fc(ln_2(x))))
// Parameters carry OpenAI's state_dict names; `Acts` holds what a backward pass will read.
#pragma once

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
                      + F + F);     // fch, fch_gelu

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
    }
    // The pointers point into `storage`: moving keeps them valid, copying would not.
    Acts(Acts&&) noexcept = default;
    Acts& operator=(Acts&&) noexcept = default;
    Acts(const Acts&) = delete;
    Acts& operator=(const Acts&) = delete;
  };

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
    layernorm_forward<C>(a.ln2, a.ln2_mean, a.ln2_rstd, a.res1, p.ln_2.weight.data(), p.ln_2.bias.data(),
                         rows);                                                                    // [B, t, C]
    linear_forward<C, F>(a.fch, a.ln2, p.mlp.c_fc.weight.data(), p.mlp.c_fc.bias.data(), rows);    // [B, t, F]
    quick_gelu_forward(a.fch_gelu, a.fch, rows * F);                                               // [B, t, F]
    linear_residual_forward<F, C>(out, a.fch_gelu, p.mlp.c_proj.weight.data(), p.mlp.c_proj.bias.data(),
                                  a.res1, rows);                                                   // [B, t, C]
  }
};

}  // namespace clip
