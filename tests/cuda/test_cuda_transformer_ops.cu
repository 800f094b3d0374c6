// The CUDA transformer ops (kernels/layernorm.cuh, activation.cuh, embedding.cuh) against clip's
// CPU ops on fresh random inputs, batch sizes including 1 and odd ones.
// fp32: max|got - ref| / max|ref| <= 1e-5. bf16: S outputs within twice the error of the CPU
// computation (inputs, weights and stored outputs rounded to bf16 with round_to_bf16) rounded to
// bf16; float outputs (statistics, parameter gradients, accumulated in fp32 from the same rounded
// inputs) at 1e-5 as in fp32.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/core/bf16.hpp"
#include "clip/models/vision_transformer.hpp"
#include "clip/ops/activation.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/ops/layernorm.hpp"
#include "cuda/gpu.hpp"
#include "numeric.hpp"
#include "kernels/activation.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/embedding.cuh"
#include "kernels/layernorm.cuh"

// Small vision transformers (outside the anonymous namespace: their unused members are part of
// the variant concept, not dead code).
namespace transformer_ops_test {
struct PatchA {  // 3 x 3 patches of 8 pixels, C 64
  static constexpr const char* name = "patch-a";
  static constexpr int embed_dim = 16, image_resolution = 24, vision_layers = 1, vision_width = 64,
                       vision_patch_size = 8, context_length = 8, vocab_size = 50, transformer_width = 32,
                       transformer_heads = 2, transformer_layers = 1;
};
struct PatchB {  // 7 x 7 patches of 4 pixels, C 128
  static constexpr const char* name = "patch-b";
  static constexpr int embed_dim = 16, image_resolution = 28, vision_layers = 1, vision_width = 128,
                       vision_patch_size = 4, context_length = 8, vocab_size = 50, transformer_width = 32,
                       transformer_heads = 2, transformer_layers = 1;
};

}  // namespace transformer_ops_test

namespace {

using clip::cuda::bf16;
using transformer_ops_test::PatchA;
using transformer_ops_test::PatchB;
using clip::cuda::Context;
using clip::cuda::DeviceBuffer;

template <class S>
constexpr bool is_bf16 = std::is_same_v<S, bf16>;

using clip::test::random_vector;

// The values the GPU sees in storage type S.
template <class S>
std::vector<float> stored(std::vector<float> v) {
  if constexpr (is_bf16<S>)
    for (float& x : v) x = clip::round_to_bf16(x);
  return v;
}

template <class S>
DeviceBuffer<S> to_device(Context& ctx, const std::vector<float>& v) {
  std::vector<S> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = clip::cuda::from_float<S>(v[i]);
  DeviceBuffer<S> d(static_cast<int64_t>(v.size()));
  d.upload(h.data(), d.size(), ctx.stream());
  ctx.synchronize();
  return d;
}

template <class S>
std::vector<float> to_host(Context& ctx, const DeviceBuffer<S>& d, int64_t n = -1) {
  if (n < 0) n = d.size();
  std::vector<S> h(static_cast<size_t>(n));
  d.download(h.data(), n, ctx.stream());
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = clip::cuda::to_float(h[i]);
  return v;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  BOOST_REQUIRE_EQUAL(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, std::fabs(double(x)));
  return m;
}

// A float output (statistics, parameter gradients): rel 1e-5 in both modes.
void check_float(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref) {
  const double err = max_abs_diff(got, ref), scale = std::max(max_abs(ref), 1e-30);
  BOOST_TEST_INFO(what << ": max|got - ref| / max|ref| = " << err / scale);
  BOOST_TEST(err / scale <= 1e-5);
}

// An output stored in S: fp32 as check_float; bf16 within twice the error of rounding the fp32
// reference to bf16.
template <class S>
void check_stored(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref) {
  if constexpr (!is_bf16<S>) {
    check_float(what, got, ref);
  } else {
    const double err = max_abs_diff(got, ref), allowed = 2.0 * max_abs_diff(stored<bf16>(ref), ref);
    BOOST_TEST_INFO(what << " (bf16): max|got - ref| = " << err << ", allowed " << allowed);
    BOOST_TEST(err <= allowed);
  }
}

template <class S>
std::string tag(const char* op, int64_t rows) {
  return std::string(op) + (is_bf16<S> ? " bf16" : " fp32") + " rows=" + std::to_string(rows);
}

// ---- LayerNorm ----------------------------------------------------------------------------------

template <int C, class S>
void check_layernorm(Context& ctx, int64_t rows, uint32_t seed) {
  const auto in = stored<S>(random_vector(rows * C, seed, 2.0f, 0.5f));
  const auto w = stored<S>(random_vector(C, seed + 1, 0.2f, 1.0f));
  const auto b = stored<S>(random_vector(C, seed + 2, 0.2f));
  const auto dy = stored<S>(random_vector(rows * C, seed + 3));
  const auto res = stored<S>(random_vector(rows * C, seed + 4));
  const auto dw0 = random_vector(C, seed + 5), db0 = random_vector(C, seed + 6);

  std::vector<float> out(rows * C), mean(rows), rstd(rows);
  clip::layernorm_forward<C>(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), rows);

  auto d_in = to_device<S>(ctx, in), d_w = to_device<S>(ctx, w), d_b = to_device<S>(ctx, b);
  DeviceBuffer<S> d_out(rows * C);
  DeviceBuffer<float> d_mean(rows), d_rstd(rows);
  clip::cuda::layernorm_forward<C>(ctx, d_out.data(), d_mean.data(), d_rstd.data(), d_in.data(), d_w.data(),
                                   d_b.data(), rows);
  check_stored<S>(tag<S>("layernorm_forward out", rows), to_host(ctx, d_out), out);
  check_float(tag<S>("layernorm_forward mean", rows), to_host(ctx, d_mean), mean);
  check_float(tag<S>("layernorm_forward rstd", rows), to_host(ctx, d_rstd), rstd);
  // In place (out == in), statistics not kept.
  {
    auto d_x = to_device<S>(ctx, in);
    clip::cuda::layernorm_forward<C>(ctx, d_x.data(), nullptr, nullptr, d_x.data(), d_w.data(), d_b.data(), rows);
    check_stored<S>(tag<S>("layernorm_forward in place", rows), to_host(ctx, d_x), out);
  }

  // Backward with the CPU's statistics on both sides; three aliasings of d_in.
  for (int mode = 0; mode < 3; ++mode) {  // 0: separate, no residual; 1: d_in == d_out; 2: d_in == d_residual
    std::vector<float> dx(rows * C), dw = dw0, db = db0;
    clip::layernorm_backward<C>(dx.data(), dw.data(), db.data(), dy.data(), in.data(), mean.data(), rstd.data(),
                                w.data(), rows, mode == 0 ? nullptr : res.data());
    auto g_dy = to_device<S>(ctx, dy), g_res = to_device<S>(ctx, res);
    auto g_mean = to_device<float>(ctx, mean), g_rstd = to_device<float>(ctx, rstd);
    auto g_dw = to_device<float>(ctx, dw0), g_db = to_device<float>(ctx, db0);
    DeviceBuffer<S> g_dx(rows * C);
    S* target = mode == 0 ? g_dx.data() : mode == 1 ? g_dy.data() : g_res.data();
    clip::cuda::layernorm_backward<C>(ctx, target, g_dw.data(), g_db.data(), g_dy.data(), d_in.data(), g_mean.data(),
                                      g_rstd.data(), d_w.data(), rows, mode == 0 ? nullptr : g_res.data());
    const DeviceBuffer<S>& result = mode == 0 ? g_dx : mode == 1 ? g_dy : g_res;
    const std::string m = " (mode " + std::to_string(mode) + ")";
    check_stored<S>(tag<S>("layernorm_backward d_in", rows) + m, to_host(ctx, result), dx);
    check_float(tag<S>("layernorm_backward d_weight", rows) + m, to_host(ctx, g_dw), dw);
    check_float(tag<S>("layernorm_backward d_bias", rows) + m, to_host(ctx, g_db), db);
  }
}

template <class S>
void layernorm_all(Context& ctx) {
  for (int64_t rows : {1, 7, 64, 2501}) {
    check_layernorm<768, S>(ctx, rows, 100 + rows);  // vectorised
    check_layernorm<36, S>(ctx, rows, 200 + rows);   // float4 for fp32, scalar for bf16; C < 32 lanes... + tail
    check_layernorm<50, S>(ctx, rows, 300 + rows);   // scalar, lanes partly idle
  }
  check_layernorm<1024, S>(ctx, 5, 400);
}

BOOST_AUTO_TEST_CASE(layernorm_fp32) {
  Context ctx;
  layernorm_all<float>(ctx);
}
BOOST_AUTO_TEST_CASE(layernorm_bf16) {
  Context ctx;
  layernorm_all<bf16>(ctx);
}

// ---- QuickGELU ----------------------------------------------------------------------------------

template <int F, class S>
void check_quick_gelu(Context& ctx, int64_t rows, uint32_t seed) {
  const auto pre0 = stored<S>(random_vector(rows * F, seed, 2.0f));
  const auto bias = stored<S>(random_vector(F, seed + 1, 0.5f));
  const auto d_act = stored<S>(random_vector(rows * F, seed + 2));
  const auto db0 = random_vector(F, seed + 3);

  // Forward reference: pre + bias (stored, so rounded in bf16), then QuickGELU of the stored pre.
  std::vector<float> pre(rows * F), act(rows * F);
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < F; ++j) pre[r * F + j] = pre0[r * F + j] + bias[j];
  const auto pre_stored = stored<S>(pre);
  clip::quick_gelu_forward(act.data(), pre_stored.data(), rows * F);

  auto g_pre = to_device<S>(ctx, pre0), g_bias = to_device<S>(ctx, bias);
  DeviceBuffer<S> g_act(rows * F);
  clip::cuda::bias_quick_gelu_forward<F>(ctx, g_act.data(), g_pre.data(), g_bias.data(), rows);
  check_stored<S>(tag<S>("bias_quick_gelu_forward pre", rows), to_host(ctx, g_pre), pre);
  check_stored<S>(tag<S>("bias_quick_gelu_forward act", rows), to_host(ctx, g_act), act);

  // Backward from the stored pre; in place (d_pre == d_act) and separate, with and without d_bias.
  std::vector<float> d_pre(rows * F), db = db0;
  clip::quick_gelu_backward<F>(d_pre.data(), db.data(), d_act.data(), pre_stored.data(), rows);
  for (int mode = 0; mode < 3; ++mode) {  // 0: separate; 1: in place; 2: separate, no d_bias
    auto g_dact = to_device<S>(ctx, d_act), g_pre_s = to_device<S>(ctx, pre_stored);
    auto g_db = to_device<float>(ctx, db0);
    DeviceBuffer<S> g_dpre(rows * F);
    S* target = mode == 1 ? g_dact.data() : g_dpre.data();
    clip::cuda::quick_gelu_backward<F>(ctx, target, mode == 2 ? nullptr : g_db.data(), g_dact.data(), g_pre_s.data(),
                                       rows);
    const std::string m = " (mode " + std::to_string(mode) + ")";
    check_stored<S>(tag<S>("quick_gelu_backward d_pre", rows) + m, to_host(ctx, mode == 1 ? g_dact : g_dpre), d_pre);
    check_float(tag<S>("quick_gelu_backward d_bias", rows) + m, to_host(ctx, g_db), mode == 2 ? db0 : db);
  }
}

template <class S>
void quick_gelu_all(Context& ctx) {
  for (int64_t rows : {1, 5, 300, 4097}) {
    check_quick_gelu<3072, S>(ctx, rows, 500 + rows);  // vectorised
    check_quick_gelu<36, S>(ctx, rows, 600 + rows);
    check_quick_gelu<50, S>(ctx, rows, 700 + rows);    // scalar
  }
}

BOOST_AUTO_TEST_CASE(quick_gelu_fp32) {
  Context ctx;
  quick_gelu_all<float>(ctx);
}
BOOST_AUTO_TEST_CASE(quick_gelu_bf16) {
  Context ctx;
  quick_gelu_all<bf16>(ctx);
}

// ---- Text embedding and pooling -----------------------------------------------------------------

template <class S>
void check_token_embedding(Context& ctx, int64_t batch, int64_t tokens, uint32_t seed) {
  constexpr int C = 64, V = 50, context = 16;
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> pick(0, V - 1);
  std::vector<int32_t> ids(batch * context);
  for (auto& i : ids) i = gen() % 4 == 0 ? 0 : pick(gen);  // many repeats (padding-like zeros)
  const auto wte = stored<S>(random_vector(V * C, seed + 1)), wpe = stored<S>(random_vector(context * C, seed + 2));
  const auto d_x = stored<S>(random_vector(batch * tokens * C, seed + 3));
  const auto dwte0 = random_vector(V * C, seed + 4), dwpe0 = random_vector(context * C, seed + 5);

  DeviceBuffer<int32_t> g_ids(batch * context);
  g_ids.upload(ids.data(), g_ids.size(), ctx.stream());
  ctx.synchronize();

  std::vector<float> x(batch * tokens * C);
  clip::embedding_forward<C>(x.data(), ids.data(), wte.data(), wpe.data(), batch, context, tokens);
  auto g_wte = to_device<S>(ctx, wte), g_wpe = to_device<S>(ctx, wpe);
  DeviceBuffer<S> g_x(batch * tokens * C);
  clip::cuda::token_embedding_forward<C>(ctx, g_x.data(), g_ids.data(), context, tokens, g_wte.data(), g_wpe.data(),
                                         batch);
  check_stored<S>(tag<S>("token_embedding_forward", batch * tokens), to_host(ctx, g_x), x);

  for (bool with_wpe : {true, false}) {
    std::vector<float> dwte = dwte0, dwpe = dwpe0;
    clip::embedding_backward<C>(dwte.data(), with_wpe ? dwpe.data() : nullptr, d_x.data(), ids.data(), batch, context,
                                tokens);
    auto g_dx = to_device<S>(ctx, d_x);
    auto g_dwte = to_device<float>(ctx, dwte0), g_dwpe = to_device<float>(ctx, dwpe0);
    clip::cuda::token_embedding_backward<C>(ctx, g_dwte.data(), with_wpe ? g_dwpe.data() : nullptr, g_dx.data(),
                                            g_ids.data(), context, tokens, batch);
    const auto got_wte = to_host(ctx, g_dwte), got_wpe = to_host(ctx, g_dwpe);
    check_float(tag<S>("token_embedding_backward d_wte", batch * tokens), got_wte, dwte);
    check_float(tag<S>("token_embedding_backward d_wpe", batch * tokens), got_wpe, dwpe);
    // Same order of additions as the CPU: the same bits.
    BOOST_TEST(max_abs_diff(got_wte, dwte) == 0.0);
    BOOST_TEST(max_abs_diff(got_wpe, dwpe) == 0.0);
  }
}

template <class S>
void check_pooling(Context& ctx, int64_t batch, int64_t t, uint32_t seed) {
  constexpr int C = 64;
  std::mt19937 gen(seed);
  std::vector<int32_t> pos(batch);
  for (auto& p : pos) p = static_cast<int32_t>(gen() % t);
  const auto x = stored<S>(random_vector(batch * t * C, seed + 1));
  const auto d_out = stored<S>(random_vector(batch * C, seed + 2));
  std::vector<float> out(batch * C), d_x(batch * t * C, 0.0f);
  for (int64_t b = 0; b < batch; ++b)
    for (int j = 0; j < C; ++j) {
      out[b * C + j] = x[(b * t + pos[b]) * C + j];
      d_x[(b * t + pos[b]) * C + j] = d_out[b * C + j];
    }
  DeviceBuffer<int32_t> g_pos(batch);
  g_pos.upload(pos.data(), batch, ctx.stream());
  auto g_x = to_device<S>(ctx, x), g_dout = to_device<S>(ctx, d_out);
  auto g_dx = to_device<S>(ctx, random_vector(batch * t * C, seed + 3));  // garbage: scatter zeroes it
  DeviceBuffer<S> g_out(batch * C);
  clip::cuda::gather_rows<C>(ctx, g_out.data(), g_x.data(), g_pos.data(), t, batch);
  clip::cuda::scatter_rows<C>(ctx, g_dx.data(), g_dout.data(), g_pos.data(), t, batch);
  BOOST_TEST(max_abs_diff(to_host(ctx, g_out), out) == 0.0);  // copies: exact
  BOOST_TEST(max_abs_diff(to_host(ctx, g_dx), d_x) == 0.0);
}

template <class S>
void text_all(Context& ctx) {
  for (auto [batch, tokens] : {std::array<int64_t, 2>{1, 16}, {3, 9}, {8, 16}, {5, 1}}) {
    check_token_embedding<S>(ctx, batch, tokens, static_cast<uint32_t>(800 + batch * 17 + tokens));
    check_pooling<S>(ctx, batch, tokens, static_cast<uint32_t>(900 + batch * 17 + tokens));
  }
}

BOOST_AUTO_TEST_CASE(text_embedding_and_pooling_fp32) {
  Context ctx;
  text_all<float>(ctx);
}
BOOST_AUTO_TEST_CASE(text_embedding_and_pooling_bf16) {
  Context ctx;
  text_all<bf16>(ctx);
}

// ---- Vision transformer input -------------------------------------------------------------------

template <class Cfg, class S>
void check_vision_input(Context& ctx, int64_t batch, uint32_t seed) {
  using VT = clip::VisionTransformer<Cfg>;
  constexpr int R = VT::R, Patch = VT::patch, N = VT::N, P = VT::P, C = VT::C, T = VT::T;
  const auto images = random_vector(batch * 3 * R * R, seed);
  std::vector<float> patches(batch * N * P);
  VT::im2col(patches.data(), images.data(), batch);
  auto g_images = to_device<float>(ctx, images);
  DeviceBuffer<S> g_patches(batch * N * P);
  clip::cuda::patch_im2col<R, Patch>(ctx, g_patches.data(), g_images.data(), batch);
  BOOST_TEST(max_abs_diff(to_host(ctx, g_patches), stored<S>(patches)) == 0.0);  // a rounded copy

  typename VT::Params p;
  const auto cls = stored<S>(random_vector(C, seed + 1)), pos = stored<S>(random_vector(T * C, seed + 2));
  std::copy(cls.begin(), cls.end(), p.class_embedding.data());
  std::copy(pos.begin(), pos.end(), p.positional_embedding.data());
  const auto embedded = stored<S>(random_vector(batch * N * C, seed + 3));
  std::vector<float> x(batch * T * C);
  VT::add_tokens(x.data(), p, embedded.data(), batch);
  auto g_emb = to_device<S>(ctx, embedded), g_cls = to_device<S>(ctx, cls), g_pos = to_device<S>(ctx, pos);
  DeviceBuffer<S> g_x(batch * T * C);
  clip::cuda::add_class_and_positions<N, C>(ctx, g_x.data(), g_emb.data(), g_cls.data(), g_pos.data(), batch);
  check_stored<S>(tag<S>("add_class_and_positions", batch), to_host(ctx, g_x), x);

  // Backward as the end of VisionTransformer::backward: column sums into d_pos, the class rows
  // into d_cls (b in order), the patch rows copied out.
  const auto d_x = stored<S>(random_vector(batch * T * C, seed + 4));
  const auto dcls0 = random_vector(C, seed + 5), dpos0 = random_vector(T * C, seed + 6);
  std::vector<float> dcls = dcls0, dpos = dpos0, d_emb(batch * N * C);
  clip::column_sums_accumulate(dpos.data(), d_x.data(), batch, int64_t{T} * C);
  for (int64_t b = 0; b < batch; ++b)
    for (int j = 0; j < C; ++j) dcls[j] += d_x[b * T * C + j];
  for (int64_t b = 0; b < batch; ++b)
    std::copy(d_x.begin() + (b * T + 1) * C, d_x.begin() + (b * T + T) * C, d_emb.begin() + b * N * C);
  auto g_dx = to_device<S>(ctx, d_x);
  auto g_dcls = to_device<float>(ctx, dcls0), g_dpos = to_device<float>(ctx, dpos0);
  DeviceBuffer<S> g_demb(batch * N * C);
  clip::cuda::class_and_positions_backward<N, C>(ctx, g_demb.data(), g_dcls.data(), g_dpos.data(), g_dx.data(),
                                                 batch);
  BOOST_TEST(max_abs_diff(to_host(ctx, g_demb), d_emb) == 0.0);
  check_float(tag<S>("class_and_positions_backward d_cls", batch), to_host(ctx, g_dcls), dcls);
  check_float(tag<S>("class_and_positions_backward d_pos", batch), to_host(ctx, g_dpos), dpos);
}

template <class S>
void vision_all(Context& ctx) {
  for (int64_t batch : {1, 3, 8}) {
    check_vision_input<PatchA, S>(ctx, batch, static_cast<uint32_t>(1000 + batch));
    check_vision_input<PatchB, S>(ctx, batch, static_cast<uint32_t>(1100 + batch));
  }
}

BOOST_AUTO_TEST_CASE(vision_input_fp32) {
  Context ctx;
  vision_all<float>(ctx);
}
BOOST_AUTO_TEST_CASE(vision_input_bf16) {
  Context ctx;
  vision_all<bf16>(ctx);
}

}  // namespace
