// The CUDA ResNet ops (kernels/conv2d.cuh, batchnorm.cuh, pool.cuh) against clip's CPU ops on
// fresh random inputs, channel-major [C, B, H, W].
// fp32: max|got - ref| / max|ref| <= 1e-5. bf16: within twice the error of the CPU computation
// with its inputs (activations, weights) and S outputs rounded to bf16 (round_to_bf16).
// Synchronised BatchNorm (kernels/batchnorm_sync.cuh) in one process: a scope of one process
// computes exactly what no scope computes, and a scope of two whose other rank holds the same
// batch (its table parts filled in by the test's sum) normalises as the batch doubled.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "clip/core/bf16.hpp"
#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/pool.hpp"
#include "cuda/gpu.hpp"
#include "numeric.hpp"
#include "kernels/batchnorm.cuh"
#include "kernels/batchnorm_sync.cuh"
#include "kernels/context.cuh"
#include "kernels/conv2d.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/linear.cuh"
#include "kernels/pool.cuh"

namespace {

using Tensors = std::vector<std::vector<float>>;

using clip::test::random_vector;
using clip::test::rel_err;

clip::cuda::Context& context() {
  static clip::cuda::Context ctx;
  return ctx;
}

// Device copy of host floats in storage type S.
template <class S>
clip::cuda::DeviceBuffer<S> to_device(const std::vector<float>& v) {
  auto& ctx = context();
  const int64_t n = static_cast<int64_t>(v.size());
  clip::cuda::DeviceBuffer<S> out(n);
  if constexpr (std::is_same_v<S, float>) {
    out.upload(v.data(), n, ctx.stream());
  } else {
    clip::cuda::DeviceBuffer<float> tmp(n);
    tmp.upload(v.data(), n, ctx.stream());
    clip::cuda::convert(ctx, out.data(), tmp.data(), n);
  }
  ctx.synchronize();
  return out;
}

template <class S>
std::vector<float> to_host(const clip::cuda::DeviceBuffer<S>& b) {
  auto& ctx = context();
  std::vector<float> v(static_cast<size_t>(b.size()));
  if constexpr (std::is_same_v<S, float>) {
    b.download(v.data(), b.size(), ctx.stream());
  } else {
    clip::cuda::DeviceBuffer<float> tmp(b.size());
    clip::cuda::convert(ctx, tmp.data(), b.data(), b.size());
    tmp.download(v.data(), b.size(), ctx.stream());
  }
  ctx.synchronize();
  return v;
}

// Runs `gpu` in storage S on the inputs (those flagged in `round_in` rounded to bf16 first for
// bf16) and checks each output against `cpu` on the exact inputs, as the file's header says.
// `s_out[i]`: output i is stored in S (rounded in the bf16 emulation); else it is fp32.
template <class S>
void compare(const std::string& name, const Tensors& inputs, const std::vector<bool>& round_in,
             const std::vector<bool>& s_out, const std::function<Tensors(const Tensors&)>& cpu,
             const std::function<Tensors(const Tensors&)>& gpu) {
  constexpr bool bf16 = !std::is_same_v<S, float>;
  const Tensors ref = cpu(inputs);
  Tensors in = inputs;
  if (bf16)
    for (size_t i = 0; i < in.size(); ++i)
      if (round_in[i])
        for (float& x : in[i]) x = clip::round_to_bf16(x);
  Tensors emu;
  if (bf16) {
    emu = cpu(in);
    for (size_t i = 0; i < emu.size(); ++i)
      if (s_out[i])
        for (float& x : emu[i]) x = clip::round_to_bf16(x);
  }
  const Tensors got = gpu(in);
  BOOST_REQUIRE_EQUAL(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = rel_err(got[i], ref[i]);
    const double tol = bf16 ? std::max(2 * rel_err(emu[i], ref[i]), 1e-6) : 1e-5;
    std::cout << name << (bf16 ? " bf16" : " fp32") << " output " << i << ": rel err " << e << " (tol " << tol
              << ")\n";
    BOOST_TEST(e <= tol, name << " output " << i << ": rel err " << e << " > " << tol);
  }
}

// Conv2d forward and backward (d_w accumulated onto a random start, d_x assigned or accumulated).
template <int Cin, int Cout, int K, int Stride, int Pad, class S>
void check_conv(int64_t batch, int h, int w, bool images, bool accumulate, uint32_t seed) {
  using Cpu = clip::Conv2d<Cin, Cout, K, Stride, Pad>;
  using Gpu = clip::cuda::Conv2d<Cin, Cout, K, Stride, Pad, S>;
  const int ho = Cpu::out_size(h), wo = Cpu::out_size(w);
  const int64_t in_n = int64_t{Cin} * batch * h * w, out_n = int64_t{Cout} * batch * ho * wo;
  const int64_t w_n = int64_t{Cout} * Cin * K * K;
  const clip::Planes xl = images ? clip::Planes::nchw(Cin, h, w) : clip::Planes::cnhw(batch, h, w);
  const clip::Planes yl = clip::Planes::cnhw(batch, ho, wo);
  const Tensors inputs = {random_vector(in_n, seed), random_vector(w_n, seed + 1, 0.3f),
                          random_vector(out_n, seed + 2), random_vector(w_n, seed + 3),
                          random_vector(in_n, seed + 4)};  // x, weight, dy, d_w start, d_x start
  // Everything but the fp32 gradient's start is S (float images are rounded to S by im2col).
  const std::vector<bool> round_in = {true, true, true, false, true};
  const std::string name = "conv " + std::to_string(Cin) + "->" + std::to_string(Cout) + " k" + std::to_string(K) +
                           " s" + std::to_string(Stride) + " p" + std::to_string(Pad) + " B" + std::to_string(batch) +
                           " " + std::to_string(h) + "x" + std::to_string(w) + (images ? " images" : "") +
                           (accumulate ? " accumulate" : "");
  auto cpu = [&](const Tensors& t) {
    std::vector<float> y(out_n), col, dw = t[3], dx = t[4];
    Cpu::forward(t[0].data(), xl, t[1].data(), y.data(), yl, batch, h, w, col);
    Cpu::backward(t[0].data(), xl, t[1].data(), t[2].data(), yl, dw.data(), images ? nullptr : dx.data(), xl, batch,
                  h, w, col, accumulate);
    return images ? Tensors{y, dw} : Tensors{y, dw, dx};
  };
  auto gpu = [&](const Tensors& t) {
    auto& ctx = context();
    auto weight = to_device<S>(t[1]), dy = to_device<S>(t[2]);
    auto dw = to_device<float>(t[3]);
    clip::cuda::DeviceBuffer<S> y(out_n);
    clip::cuda::DeviceBuffer<S> scratch(images ? Gpu::image_scratch_elements(batch, h, w)
                                               : Gpu::scratch_elements(batch, h, w));
    if (images) {
      auto x = to_device<float>(t[0]);
      Gpu::forward_images(ctx, y.data(), x.data(), weight.data(), batch, h, w, scratch.data());
      Gpu::backward_images(ctx, dw.data(), dy.data(), x.data(), batch, h, w, scratch.data());
      ctx.synchronize();
      return Tensors{to_host(y), to_host(dw)};
    }
    auto x = to_device<S>(t[0]), dx = to_device<S>(t[4]);
    Gpu::forward(ctx, y.data(), x.data(), weight.data(), batch, h, w, scratch.data());
    Gpu::backward(ctx, dx.data(), dw.data(), dy.data(), x.data(), weight.data(), batch, h, w, scratch.data(),
                  accumulate);
    ctx.synchronize();
    return Tensors{to_host(y), to_host(dw), to_host(dx)};
  };
  compare<S>(name, inputs, round_in, images ? std::vector<bool>{true, false} : std::vector<bool>{true, false, true},
             cpu, gpu);
}

template <class S>
void conv_suite() {
  for (int64_t batch : {1, 3}) {
    check_conv<3, 8, 3, 2, 1, S>(batch, 16, 16, /*images=*/true, false, 10 + batch);  // the stem's first conv
    check_conv<3, 8, 3, 2, 1, S>(batch, 15, 15, false, false, 20 + batch);
    check_conv<4, 6, 3, 1, 1, S>(batch, 7, 7, false, false, 30 + batch);   // 3x3 (CPU backward: Winograd)
    check_conv<5, 7, 1, 1, 0, S>(batch, 6, 6, false, false, 40 + batch);   // 1x1: one gemm
    check_conv<5, 7, 1, 1, 0, S>(batch, 5, 5, false, true, 50 + batch);    // accumulate into d_x
    check_conv<6, 4, 3, 2, 0, S>(batch, 9, 9, false, true, 60 + batch);
    check_conv<16, 32, 3, 1, 1, S>(batch, 14, 14, false, false, 70 + batch);
  }
}

// BatchNorm2d eval / train / backward with none, ReLU, and ReLU + residual.
template <int C, class S>
void check_batchnorm(int64_t batch, int64_t hw, uint32_t seed) {
  using Cpu = clip::BatchNorm2d<C>;
  using Gpu = clip::cuda::BatchNorm2d<C, S>;
  const int64_t n = C * batch * hw;
  const clip::Planes l = clip::Planes::cnhw(batch, hw, 1);
  for (int variant = 0; variant < 3; ++variant) {
    const clip::Activation act = variant == 0 ? clip::Activation::none : clip::Activation::relu;
    const bool with_res = variant == 2;
    const bool mask_from_y = variant == 2 || (variant == 1 && seed % 2);
    // x, residual, dy, gamma, beta, running mean, running var, d_gamma start, d_beta start
    const Tensors inputs = {random_vector(n, seed, 2.0f, 0.7f), random_vector(n, seed + 1), random_vector(n, seed + 2),
                            random_vector(C, seed + 3, 0.5f, 1.0f), random_vector(C, seed + 4, 0.5f),
                            random_vector(C, seed + 5, 0.5f), random_vector(C, seed + 6, 0.2f, 1.5f),
                            random_vector(C, seed + 7), random_vector(C, seed + 8)};
    const std::vector<bool> round_in = {true, true, true, true, true, false, false, false, false};
    const std::string name = "batchnorm C" + std::to_string(C) + " B" + std::to_string(batch) + " hw" +
                             std::to_string(hw) + (variant == 0 ? " none" : variant == 1 ? " relu" : " relu+res") +
                             (mask_from_y ? " mask(y)" : "");
    auto cpu = [&](const Tensors& t) {
      typename Cpu::Params p;
      std::copy(t[3].begin(), t[3].end(), p.weight.data());
      std::copy(t[4].begin(), t[4].end(), p.bias.data());
      std::copy(t[5].begin(), t[5].end(), p.running_mean.data());
      std::copy(t[6].begin(), t[6].end(), p.running_var.data());
      const float* res = with_res ? t[1].data() : nullptr;
      std::vector<float> y_eval(n), y(n), dx(n), dr(n), dg = t[7], db = t[8];
      Cpu::forward_eval(p, t[0].data(), l, y_eval.data(), l, batch, hw, act, res, l);
      typename Cpu::Saved saved;
      Cpu::forward_train(p, t[0].data(), l, y.data(), l, batch, hw, act, res, l, &saved);
      // backward's mask comes from y as the GPU stores it (rounded in bf16)
      std::vector<float> y_mask = y;
      if constexpr (!std::is_same_v<S, float>)
        for (float& v : y_mask) v = clip::round_to_bf16(v);
      Cpu::backward(p, saved, t[0].data(), l, mask_from_y ? y_mask.data() : nullptr, l, t[2].data(), l, dx.data(), l,
                    dg.data(), db.data(), batch, hw, act, with_res ? dr.data() : nullptr, l);
      Tensors out = {y_eval,
                     y,
                     saved.mean,
                     saved.invstd,
                     std::vector<float>(p.running_mean.data(), p.running_mean.data() + C),
                     std::vector<float>(p.running_var.data(), p.running_var.data() + C),
                     dx,
                     dg,
                     db};
      if (with_res) out.push_back(dr);
      return out;
    };
    auto gpu = [&](const Tensors& t) {
      auto& ctx = context();
      auto x = to_device<S>(t[0]), r = to_device<S>(t[1]), dy = to_device<S>(t[2]);
      auto gamma = to_device<S>(t[3]), beta = to_device<S>(t[4]);
      auto rm = to_device<float>(t[5]), rv = to_device<float>(t[6]), dg = to_device<float>(t[7]),
           db = to_device<float>(t[8]);
      clip::cuda::DeviceBuffer<S> y_eval(n), y(n), dx(n), dr(n);
      clip::cuda::DeviceBuffer<float> mean(C), rstd(C);
      const S* res = with_res ? r.data() : nullptr;
      Gpu::forward_eval(ctx, y_eval.data(), x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), batch, hw, act,
                        res);
      Gpu::forward_train(ctx, y.data(), mean.data(), rstd.data(), x.data(), gamma.data(), beta.data(), rm.data(),
                         rv.data(), batch, hw, act, res);
      Gpu::backward(ctx, dx.data(), dg.data(), db.data(), dy.data(), x.data(), mask_from_y ? y.data() : nullptr,
                    mean.data(), rstd.data(), gamma.data(), beta.data(), batch, hw, act,
                    with_res ? dr.data() : nullptr);
      ctx.synchronize();
      Tensors out = {to_host(y_eval), to_host(y),  to_host(mean), to_host(rstd), to_host(rm),
                     to_host(rv),     to_host(dx), to_host(dg),   to_host(db)};
      if (with_res) out.push_back(to_host(dr));
      return out;
    };
    std::vector<bool> s_out = {true, true, false, false, false, false, true, false, false, true};
    if (!with_res) s_out.pop_back();
    compare<S>(name, inputs, round_in, s_out, cpu, gpu);
  }
}

template <class S>
void batchnorm_suite() {
  check_batchnorm<8, S>(1, 49, 100);
  check_batchnorm<8, S>(3, 49, 101);
  check_batchnorm<5, S>(2, 1200, 102);  // rows longer than a block
}

// In-place aliasing that the bottleneck relies on: d_x over x, d_residual over d_y.
template <class S>
void check_batchnorm_in_place() {
  constexpr int C = 4;
  const int64_t batch = 3, hw = 25, n = C * batch * hw;
  using Cpu = clip::BatchNorm2d<C>;
  using Gpu = clip::cuda::BatchNorm2d<C, S>;
  const clip::Planes l = clip::Planes::cnhw(batch, hw, 1);
  Tensors t = {random_vector(n, 7), random_vector(n, 8), random_vector(C, 9, 0.5f, 1.0f), random_vector(C, 10)};
  if constexpr (!std::is_same_v<S, float>)
    for (auto& v : t)
      for (float& x : v) x = clip::round_to_bf16(x);
  auto& ctx = context();
  auto x = to_device<S>(t[0]), dy = to_device<S>(t[1]), gamma = to_device<S>(t[2]), beta = to_device<S>(t[3]);
  clip::cuda::DeviceBuffer<float> rm(C), rv(C), mean(C), rstd(C), dg(C), db(C);
  rm.zero(ctx.stream()), rv.zero(ctx.stream()), dg.zero(ctx.stream()), db.zero(ctx.stream());
  clip::cuda::DeviceBuffer<S> y(n), dx_separate(n), dr_separate(n);
  Gpu::forward_train(ctx, y.data(), mean.data(), rstd.data(), x.data(), gamma.data(), beta.data(), rm.data(), rv.data(),
                     batch, hw, clip::Activation::relu);
  Gpu::backward(ctx, dx_separate.data(), dg.data(), db.data(), dy.data(), x.data(), y.data(), mean.data(), rstd.data(),
                gamma.data(), beta.data(), batch, hw, clip::Activation::relu, dr_separate.data());
  Gpu::backward(ctx, x.data(), dg.data(), db.data(), dy.data(), x.data(), y.data(), mean.data(), rstd.data(),
                gamma.data(), beta.data(), batch, hw, clip::Activation::relu, dy.data());
  ctx.synchronize();
  BOOST_TEST(rel_err(to_host(x), to_host(dx_separate)) == 0.0);
  BOOST_TEST(rel_err(to_host(dy), to_host(dr_separate)) == 0.0);
  (void)l;
  (void)sizeof(Cpu);
}

// Train-mode forward and backward (ReLU, residual, mask from y) under an optional sync scope;
// returns y, mean, rstd, running mean, running var, d_x, d_gamma, d_beta, d_residual.
template <int C, class S>
Tensors batchnorm_step(const Tensors& t, int64_t batch, int64_t hw, const clip::cuda::BatchNormSyncScope::Sum* sum,
                       int rank, int world) {
  using Gpu = clip::cuda::BatchNorm2d<C, S>;
  auto& ctx = context();
  const int64_t n = C * batch * hw;
  auto x = to_device<S>(t[0]), r = to_device<S>(t[1]), dy = to_device<S>(t[2]);
  auto gamma = to_device<S>(t[3]), beta = to_device<S>(t[4]);
  auto rm = to_device<float>(t[5]), rv = to_device<float>(t[6]), dg = to_device<float>(t[7]),
       db = to_device<float>(t[8]);
  clip::cuda::DeviceBuffer<S> y(n), dx(n), dr(n);
  clip::cuda::DeviceBuffer<float> mean(C), rstd(C);
  clip::cuda::DeviceBuffer<double> table(clip::cuda::BatchNormSyncScope::capacity_for(world, C));
  std::optional<clip::cuda::BatchNormSyncScope> scope;
  if (sum) scope.emplace(*sum, rank, world, table.data(), table.size());
  Gpu::forward_train(ctx, y.data(), mean.data(), rstd.data(), x.data(), gamma.data(), beta.data(), rm.data(), rv.data(),
                     batch, hw, clip::Activation::relu, r.data());
  Gpu::backward(ctx, dx.data(), dg.data(), db.data(), dy.data(), x.data(), y.data(), mean.data(), rstd.data(),
                gamma.data(), beta.data(), batch, hw, clip::Activation::relu, dr.data());
  ctx.synchronize();
  return {to_host(y), to_host(mean), to_host(rstd), to_host(rm), to_host(rv), to_host(dx), to_host(dg), to_host(db),
          to_host(dr)};
}

template <class S>
void check_batchnorm_sync() {
  constexpr int C = 6;
  const int64_t batch = 3, hw = 700;  // rows longer than a block
  const int64_t n = C * batch * hw;
  const Tensors t = {random_vector(n, 300, 2.0f, 0.7f), random_vector(n, 301), random_vector(n, 302),
                     random_vector(C, 303, 0.5f, 1.0f), random_vector(C, 304, 0.5f), random_vector(C, 305, 0.5f),
                     random_vector(C, 306, 0.2f, 1.5f), random_vector(C, 307), random_vector(C, 308)};
  const Tensors plain = batchnorm_step<C, S>(t, batch, hw, nullptr, 0, 1);
  const char* names[] = {"y", "mean", "rstd", "running mean", "running var", "d_x", "d_gamma", "d_beta", "d_residual"};

  // One process: the sum is the identity; every output bit for bit.
  int calls = 0;
  const clip::cuda::BatchNormSyncScope::Sum alone = [&](double*, int64_t) { ++calls; };
  const Tensors one = batchnorm_step<C, S>(t, batch, hw, &alone, 0, 1);
  BOOST_TEST(calls == 2);  // forward's statistics, backward's sums
  for (size_t i = 0; i < plain.size(); ++i) BOOST_TEST(rel_err(one[i], plain[i]) == 0.0, "world 1: " << names[i]);

  // Two processes holding the same batch, seen from each rank: the other rank's table slot is a
  // copy of this rank's (forward), the sums twice this rank's (backward). Mean and variance are
  // the batch's own (so y, d_x and the shares of d_gamma, d_beta are unchanged, bit for bit); the
  // running variance is the unbiased one of the doubled batch.
  for (int rank : {0, 1}) {
    auto& ctx = context();
    const clip::cuda::BatchNormSyncScope::Sum twin = [&](double* data, int64_t count) {
      std::vector<double> h(static_cast<size_t>(count));
      CLIP_CUDA_CHECK(cudaMemcpyAsync(h.data(), data, sizeof(double) * count, cudaMemcpyDeviceToHost, ctx.stream()));
      ctx.synchronize();
      if (count == 2 * 3 * C) std::copy_n(h.begin() + rank * 3 * C, 3 * C, h.begin() + (1 - rank) * 3 * C);
      else for (double& v : h) v *= 2;
      CLIP_CUDA_CHECK(cudaMemcpyAsync(data, h.data(), sizeof(double) * count, cudaMemcpyHostToDevice, ctx.stream()));
      ctx.synchronize();
    };
    const Tensors two = batchnorm_step<C, S>(t, batch, hw, &twin, rank, 2);
    for (size_t i : {0, 1, 2, 3, 5, 6, 7, 8})
      BOOST_TEST(rel_err(two[i], plain[i]) == 0.0, "world 2, rank " << rank << ": " << names[i]);
    // The CPU's running variance on the doubled batch [C, 2B, hw], from the same (rounded) x.
    std::vector<float> x = t[0];
    if constexpr (!std::is_same_v<S, float>)
      for (float& v : x) v = clip::round_to_bf16(v);
    std::vector<float> doubled(static_cast<size_t>(2 * n)), y(static_cast<size_t>(2 * n));
    for (int c = 0; c < C; ++c)
      for (int copy = 0; copy < 2; ++copy)
        std::copy_n(x.begin() + c * batch * hw, batch * hw, doubled.begin() + (2 * c + copy) * batch * hw);
    typename clip::BatchNorm2d<C>::Params p;
    std::copy(t[5].begin(), t[5].end(), p.running_mean.data());
    std::copy(t[6].begin(), t[6].end(), p.running_var.data());
    std::vector<float> gamma = t[3], beta = t[4];
    if constexpr (!std::is_same_v<S, float>) {
      for (float& v : gamma) v = clip::round_to_bf16(v);
      for (float& v : beta) v = clip::round_to_bf16(v);
    }
    std::copy(gamma.begin(), gamma.end(), p.weight.data());
    std::copy(beta.begin(), beta.end(), p.bias.data());
    typename clip::BatchNorm2d<C>::Saved saved;
    const clip::Planes l = clip::Planes::cnhw(2 * batch, hw, 1);
    clip::BatchNorm2d<C>::forward_train(p, doubled.data(), l, y.data(), l, 2 * batch, hw, clip::Activation::none,
                                        nullptr, l, &saved);
    const std::vector<float> want(p.running_var.data(), p.running_var.data() + C);
    BOOST_TEST(rel_err(two[4], want) <= 1e-6, "world 2, rank " << rank << ": running var");
    BOOST_TEST(rel_err(two[4], plain[4]) > 0.0, "the running variance must see the doubled count");
  }
}

// AvgPool2d forward and backward (assigned and accumulated), odd sizes that floor mode trims.
template <int K, class S>
void check_pool(int64_t channels, int64_t batch, int h, int w, bool accumulate, uint32_t seed) {
  using Cpu = clip::AvgPool2d<K>;
  const int ho = h / K, wo = w / K;
  const int64_t in_n = channels * batch * h * w, out_n = channels * batch * ho * wo;
  const clip::Planes xl = clip::Planes::cnhw(batch, h, w), yl = clip::Planes::cnhw(batch, ho, wo);
  const Tensors inputs = {random_vector(in_n, seed), random_vector(out_n, seed + 1), random_vector(in_n, seed + 2)};
  const std::string name = "avgpool" + std::to_string(K) + " C" + std::to_string(channels) + " B" +
                           std::to_string(batch) + " " + std::to_string(h) + "x" + std::to_string(w) +
                           (accumulate ? " accumulate" : "");
  auto cpu = [&](const Tensors& t) {
    std::vector<float> y(out_n), dx = t[2];
    Cpu::forward(t[0].data(), xl, y.data(), yl, batch, channels, h, w);
    Cpu::backward(t[1].data(), yl, dx.data(), xl, batch, channels, h, w, accumulate);
    return Tensors{y, dx};
  };
  auto gpu = [&](const Tensors& t) {
    auto& ctx = context();
    auto x = to_device<S>(t[0]), dy = to_device<S>(t[1]), dx = to_device<S>(t[2]);
    clip::cuda::DeviceBuffer<S> y(out_n);
    clip::cuda::avg_pool_forward<K>(ctx, y.data(), x.data(), channels, batch, h, w);
    clip::cuda::avg_pool_backward<K>(ctx, dx.data(), dy.data(), channels, batch, h, w, accumulate);
    ctx.synchronize();
    return Tensors{to_host(y), to_host(dx)};
  };
  compare<S>(name, inputs, {true, true, true}, {true, true}, cpu, gpu);
}

template <class S>
void pool_suite() {
  for (int64_t batch : {1, 3}) {
    check_pool<2, S>(4, batch, 8, 8, false, 200 + batch);
    check_pool<2, S>(3, batch, 7, 9, true, 210 + batch);
    check_pool<3, S>(2, batch, 10, 11, false, 220 + batch);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(conv2d_fp32) { conv_suite<float>(); }
BOOST_AUTO_TEST_CASE(conv2d_bf16) { conv_suite<clip::cuda::bf16>(); }
BOOST_AUTO_TEST_CASE(batchnorm_fp32) {
  batchnorm_suite<float>();
  check_batchnorm_in_place<float>();
}
BOOST_AUTO_TEST_CASE(batchnorm_bf16) {
  batchnorm_suite<clip::cuda::bf16>();
  check_batchnorm_in_place<clip::cuda::bf16>();
}
BOOST_AUTO_TEST_CASE(batchnorm_sync_fp32) { check_batchnorm_sync<float>(); }
BOOST_AUTO_TEST_CASE(batchnorm_sync_bf16) { check_batchnorm_sync<clip::cuda::bf16>(); }
BOOST_AUTO_TEST_CASE(avg_pool_fp32) { pool_suite<float>(); }
BOOST_AUTO_TEST_CASE(avg_pool_bf16) { pool_suite<clip::cuda::bf16>(); }
