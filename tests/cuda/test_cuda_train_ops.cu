// The CUDA training ops against the CPU ones: the fused multi-tensor AdamW (bit for bit against
// clip::AdamW in fp32, quiet blocks and clipping included), the global gradient norm, gradient
// scaling and the temperature clamp, and the contrastive loss (fp32 within 1e-5 of
// clip::contrastive_loss; bf16 within twice the error of the CPU computation on bf16-rounded
// features with bf16-rounded outputs), and the loss by rows (contrastive_loss_rows, the data-parallel
// rank's share) against the CPU's contrastive_loss_rows for several slices, the shares of a
// partition summing to the whole batch's loss and gradients.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/core/bf16.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "clip/train/grad_clip.hpp"
#include "cuda/gpu.hpp"
#include "flat_params.hpp"
#include "kernels/adamw.cuh"
#include "kernels/contrastive_loss.cuh"
#include "kernels/grad_norm.cuh"

namespace {

using clip::Role;
using clip::cuda::bf16;
using clip::cuda::Context;
using clip::cuda::DeviceBuffer;

// A model's worth of tensor shapes: a large sparse embedding (CPU quiet blocks, several 64K
// chunks), a matrix, rank-1 tensors of the no-decay group, a buffer between trained tensors.
struct Net {
  clip::Param<300, 1000> token_embedding;  // decayed, 300,000 floats: 5 chunks
  clip::Param<33, 17> weight;              // decayed
  clip::Param<5> running_mean;             // buffer: never touched
  clip::Param<7> bias;                     // no decay (rank 1)
  clip::Param<1> logit_scale;              // no decay

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "token_embedding.weight", token_embedding, Role::parameter);
    f(prefix + "layer.weight", weight, Role::parameter);
    f(prefix + "layer.bn.running_mean", running_mean, Role::buffer);
    f(prefix + "layer.bias", bias, Role::parameter);
    f(prefix + "logit_scale", logit_scale, Role::parameter);
  }
};

using clip::test::flatten;         // every tensor back to back: the flat device layout
using clip::test::trained_slices;  // the trained tensors' slices of it

template <class T>
DeviceBuffer<T> to_device(const std::vector<T>& host, Context& ctx) {
  DeviceBuffer<T> d(static_cast<int64_t>(host.size()));
  d.upload(host.data(), static_cast<int64_t>(host.size()), ctx.stream());
  ctx.synchronize();
  return d;
}

template <class T>
std::vector<T> to_host(const DeviceBuffer<T>& d, Context& ctx) {
  std::vector<T> out(static_cast<size_t>(d.size()));
  d.download(out.data(), d.size(), ctx.stream());
  return out;
}

template <class T>
T scalar_to_host(const T* device, Context& ctx) {
  T x{};
  CLIP_CUDA_CHECK(cudaMemcpyAsync(&x, device, sizeof(T), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return x;
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, double(std::abs(v)));
  return m;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

// ---- AdamW ----------------------------------------------------------------------------------

template <class S>
void check_adamw_against_cpu() {
  Context ctx;
  auto params = std::make_unique<Net>(), grads = std::make_unique<Net>();
  std::mt19937 rng(21);
  std::normal_distribution<float> normal;
  clip::for_each_tensor(*params, [&](const std::string&, auto& t, Role) {
    for (float& x : t.values) x = normal(rng);
  });
  clip::zero(*grads);
  const std::vector<clip::TensorSlice> slices = trained_slices(*params);
  const std::vector<float> start = flatten(*params);
  const int64_t n = static_cast<int64_t>(start.size());
  clip::cuda::MultiTensorTable table(ctx, slices, n);
  BOOST_TEST(table.elements() == clip::parameter_count(*params));

  const clip::AdamWOptions opt{1e-2f, 0.9f, 0.98f, 1e-6f, 0.1f};
  clip::AdamW<Net> adam(*params, opt);
  DeviceBuffer<float> master = to_device(start, ctx), m(n), v(n), g(n);
  DeviceBuffer<S> compute(n);
  m.zero(ctx.stream());
  v.zero(ctx.stream());
  compute.zero(ctx.stream());
  const int64_t buffer_offset = decltype(Net::token_embedding)::numel + decltype(Net::weight)::numel;

  std::uniform_int_distribution<int64_t> row(0, 299);
  for (int step = 1; step <= 5; ++step) {
    // Sparse embedding gradients (three rows), dense elsewhere; a sentinel in the buffer's slot.
    for (int r = 0; r < 3; ++r) {
      const int64_t first = row(rng) * 1000;
      for (int64_t i = first; i < first + 1000; ++i) grads->token_embedding[i] = normal(rng) * 1e-2f;
    }
    for (float& x : grads->weight.values) x = normal(rng) * (step == 3 ? 1e-5f : 0.3f);
    for (float& x : grads->bias.values) x = normal(rng);
    grads->logit_scale[0] = normal(rng);
    std::vector<float> flat_g = flatten(*grads);
    for (int64_t i = 0; i < 5; ++i) flat_g[buffer_offset + i] = 7.0f;
    g.upload(flat_g.data(), n, ctx.stream());
    ctx.synchronize();

    const float lr = 1e-2f / float(step), grad_scale = step == 4 ? 0.625f : 1.0f;
    adam.step(*params, *grads, lr, grad_scale);
    const clip::AdamWScalars s =
        clip::adamw_scalars(lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, adam.steps(), grad_scale);
    clip::cuda::adamw_step<S>(ctx, table, master.data(), g.data(), m.data(), v.data(), compute.data(), s);

    const std::vector<float> got_p = to_host(master, ctx), got_m = to_host(m, ctx), got_v = to_host(v, ctx),
                             got_g = to_host(g, ctx);
    const std::vector<S> got_s = to_host(compute, ctx);
    const std::vector<float> want_p = flatten(*params), want_m = flatten(std::as_const(adam).m()),
                             want_v = flatten(std::as_const(adam).v());
    int64_t p_diff = 0, m_diff = 0, v_diff = 0, g_left = 0, s_diff = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool buffer = i >= buffer_offset && i < buffer_offset + 5;
      p_diff += bits(got_p[i]) != bits(want_p[i]);
      if (buffer) {  // untouched: the master keeps its value, the grad its sentinel, m/v stay 0
        g_left += got_g[i] != 7.0f || got_m[i] != 0.0f || got_v[i] != 0.0f;
        continue;
      }
      m_diff += bits(got_m[i]) != bits(want_m[i]);
      v_diff += bits(got_v[i]) != bits(want_v[i]);
      g_left += got_g[i] != 0.0f;
      if constexpr (std::is_same_v<S, float>) s_diff += bits(got_s[i]) != bits(got_p[i]);
      else s_diff += __bfloat16_as_ushort(got_s[i]) != clip::float_to_bf16_bits(got_p[i]);
    }
    BOOST_TEST(p_diff == 0, "step " << step << ": " << p_diff << " master weights differ from the CPU AdamW");
    BOOST_TEST(m_diff == 0, "step " << step << ": " << m_diff << " first moments differ");
    BOOST_TEST(v_diff == 0, "step " << step << ": " << v_diff << " second moments differ");
    BOOST_TEST(g_left == 0, "step " << step << ": gradients not consumed or buffer slots touched: " << g_left);
    BOOST_TEST(s_diff == 0, "step " << step << ": " << s_diff << " compute-copy elements are not S(master)");
  }
}

BOOST_AUTO_TEST_CASE(adamw_matches_cpu_bit_for_bit_fp32_copy) { check_adamw_against_cpu<float>(); }
BOOST_AUTO_TEST_CASE(adamw_matches_cpu_bit_for_bit_bf16_copy) { check_adamw_against_cpu<bf16>(); }

// Small chunks (many per tensor, odd sizes) give the same bits as the default ones.
BOOST_AUTO_TEST_CASE(adamw_chunk_size_does_not_change_results) {
  Context ctx;
  const std::vector<clip::TensorSlice> slices{{0, 1, true}, {3, 1000, true}, {1003, 70001, false}, {71010, 5, true}};
  const int64_t n = 71020;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  std::vector<float> p(n), g(n);
  for (float& x : p) x = normal(rng);
  for (float& x : g) x = normal(rng) * 0.1f;
  clip::cuda::MultiTensorTable big(ctx, slices, n), small(ctx, slices, n, 333);
  BOOST_TEST(small.count() > big.count());
  const clip::AdamWScalars s = clip::adamw_scalars(3e-3f, 0.9f, 0.95f, 1e-8f, 0.05f, 1);
  std::vector<float> results[2];
  for (int k = 0; k < 2; ++k) {
    DeviceBuffer<float> dp = to_device(p, ctx), dg = to_device(g, ctx), dm(n), dv(n);
    dm.zero(ctx.stream());
    dv.zero(ctx.stream());
    clip::cuda::adamw_step<float>(ctx, k ? small : big, dp.data(), dg.data(), dm.data(), dv.data(), nullptr, s);
    results[k] = to_host(dp, ctx);
  }
  BOOST_TEST(std::memcmp(results[0].data(), results[1].data(), n * sizeof(float)) == 0);
  BOOST_TEST(results[0][1] == p[1], "a gap between tensors is not touched");
}

// ---- Gradient norm, scaling, clamp ---------------------------------------------------------------

BOOST_AUTO_TEST_CASE(gradient_norm_and_scaling_match_cpu) {
  Context ctx;
  auto grads = std::make_unique<Net>();
  std::mt19937 rng(8);
  std::normal_distribution<float> normal;
  clip::for_each_tensor(*grads, [&](const std::string&, auto& t, Role) {
    for (float& x : t.values) x = normal(rng) * 0.01f;
  });
  grads->running_mean.fill(1e3f);  // a buffer: must not count
  const std::vector<float> flat = flatten(*grads);
  const int64_t n = static_cast<int64_t>(flat.size());
  clip::cuda::MultiTensorTable table(ctx, trained_slices(*grads), n);
  DeviceBuffer<float> g = to_device(flat, ctx);
  DeviceBuffer<double> norm(2);
  clip::cuda::gradient_norm(ctx, table, g.data(), norm.data());
  clip::cuda::gradient_norm(ctx, table, g.data(), norm.data() + 1);
  const std::vector<double> got = to_host(norm, ctx);
  const double want = clip::gradient_norm(*grads);
  BOOST_TEST_MESSAGE("gradient norm: GPU " << got[0] << ", CPU " << want);
  BOOST_TEST(std::abs(got[0] - want) <= 1e-12 * want);
  BOOST_TEST(std::memcmp(&got[0], &got[1], sizeof(double)) == 0, "deterministic");

  const float factor = clip::clip_factor(got[0], 0.5 * want);
  BOOST_TEST(factor < 1.0f);
  clip::cuda::scale_gradients(ctx, table, g.data(), factor);
  clip::scale_gradients(*grads, factor);
  const std::vector<float> scaled = to_host(g, ctx), want_scaled = flatten(*grads);
  BOOST_TEST(std::memcmp(scaled.data(), want_scaled.data(), n * sizeof(float)) == 0);
}

BOOST_AUTO_TEST_CASE(logit_scale_clamp) {
  Context ctx;
  const float max_scale = 4.6051701859880914f;  // clip::max_logit_scale (trainer.hpp)
  for (float x : {-0.5f, 0.0f, 1.25f, 4.6f, max_scale, 4.7f, 100.0f}) {
    DeviceBuffer<float> master = to_device(std::vector<float>{x}, ctx);
    DeviceBuffer<bf16> copy(1);
    clip::cuda::clamp_logit_scale<bf16>(ctx, master.data(), copy.data());
    const float want = std::clamp(x, 0.0f, max_scale);
    BOOST_TEST(to_host(master, ctx)[0] == want);
    BOOST_TEST(__bfloat16_as_ushort(to_host(copy, ctx)[0]) == clip::float_to_bf16_bits(want));
  }
}

// ---- Contrastive loss ------------------------------------------------------------------------

constexpr int E = 64;

struct CpuLoss {
  double loss;
  float d_scale;
  std::vector<float> d_image, d_text, logits;
};

CpuLoss cpu_loss(const std::vector<float>& img, const std::vector<float>& txt, int64_t B, float logit_scale) {
  CpuLoss r;
  r.d_image.resize(B * E);
  r.d_text.resize(B * E);
  r.logits.resize(B * B);
  const clip::ContrastiveLoss l =
      clip::contrastive_loss<E>(img.data(), txt.data(), B, logit_scale, r.d_image.data(), r.d_text.data(), r.logits.data());
  r.loss = l.loss;
  r.d_scale = l.d_logit_scale;
  return r;
}

struct GpuLoss {
  double loss_exact;
  float loss, d_scale;
  std::vector<float> d_image, d_text, logits;
};

template <class S>
GpuLoss gpu_loss(Context& ctx, const std::vector<float>& img, const std::vector<float>& txt, int64_t B,
                 float logit_scale, float d_scale_before = 0.0f) {
  clip::cuda::Arena plan = clip::cuda::Arena::planner();
  clip::cuda::ContrastiveLossScratch<E> sizing(plan, B);
  BOOST_TEST(plan.used() <= clip::cuda::ContrastiveLossScratch<E>::bytes(B));
  clip::cuda::Arena arena(plan.used());
  clip::cuda::ContrastiveLossScratch<E> scratch(arena, B);
  std::vector<S> img_s(img.size()), txt_s(txt.size());
  for (size_t i = 0; i < img.size(); ++i) img_s[i] = clip::cuda::from_float<S>(img[i]), txt_s[i] = clip::cuda::from_float<S>(txt[i]);
  DeviceBuffer<S> di = to_device(img_s, ctx), dt = to_device(txt_s, ctx), gi(B * E), gt(B * E);
  DeviceBuffer<float> scale = to_device(std::vector<float>{logit_scale, 0.0f, d_scale_before}, ctx);
  DeviceBuffer<double> exact(1);
  clip::cuda::contrastive_loss<E, S>(ctx, scratch, di.data(), dt.data(), B, scale.data(), gi.data(), gt.data(),
                                     scale.data() + 1, scale.data() + 2, exact.data());
  GpuLoss r;
  const std::vector<float> out = to_host(scale, ctx);
  r.loss = out[1];
  r.d_scale = out[2];
  r.loss_exact = to_host(exact, ctx)[0];
  std::vector<S> a = to_host(gi, ctx), b = to_host(gt, ctx);
  for (S x : a) r.d_image.push_back(clip::cuda::to_float(x));
  for (S x : b) r.d_text.push_back(clip::cuda::to_float(x));
  r.logits.resize(B * B);
  CLIP_CUDA_CHECK(cudaMemcpy(r.logits.data(), scratch.logits, B * B * sizeof(float), cudaMemcpyDeviceToHost));
  return r;
}

std::vector<float> random_features(std::mt19937& rng, int64_t B) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(B * E);
  for (float& v : x) v = normal(rng);
  return x;
}

const int64_t batches[] = {1, 2, 7, 33, 300};
const float scales[] = {0.0f, 2.6592600f /* ln(1/0.07), CLIP's initial value */, 4.6051701859880914f};

BOOST_AUTO_TEST_CASE(contrastive_loss_fp32_matches_cpu) {
  Context ctx;
  std::mt19937 rng(13);
  for (int64_t B : batches)
    for (float ls : scales) {
      const std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
      const CpuLoss want = cpu_loss(img, txt, B, ls);
      const GpuLoss got = gpu_loss<float>(ctx, img, txt, B, ls, 0.25f);
      const double e_loss = std::abs(got.loss_exact - want.loss) / std::max(1e-3, std::abs(want.loss));
      const double e_scale = std::abs(double(got.d_scale - 0.25f) - want.d_scale) / std::max(1e-3, std::abs(double(want.d_scale)));
      const double e_img = max_diff(got.d_image, want.d_image) / std::max(1e-30, max_abs(want.d_image));
      const double e_txt = max_diff(got.d_text, want.d_text) / std::max(1e-30, max_abs(want.d_text));
      const double e_logits = max_diff(got.logits, want.logits) / max_abs(want.logits);
      BOOST_TEST_MESSAGE("fp32 B=" << B << " logit_scale=" << ls << ": loss " << e_loss << ", d_scale " << e_scale
                                   << ", d_image " << e_img << ", d_text " << e_txt << ", logits " << e_logits);
      BOOST_TEST(e_loss <= 1e-5);
      BOOST_TEST(std::abs(double(got.loss) - want.loss) <= 1e-6 * std::max(1.0, std::abs(want.loss)));
      BOOST_TEST(e_scale <= 1e-5);
      if (B == 1) {  // one pair: G = 0, so every gradient is exactly zero
        BOOST_TEST(max_abs(got.d_image) == 0.0);
        BOOST_TEST(max_abs(got.d_text) == 0.0);
      } else {
        BOOST_TEST(e_img <= 1e-5);
        BOOST_TEST(e_txt <= 1e-5);
      }
      BOOST_TEST(e_logits <= 1e-5);
    }
}

BOOST_AUTO_TEST_CASE(contrastive_loss_bf16_within_twice_rounding_error) {
  Context ctx;
  std::mt19937 rng(17);
  auto rounded = [](std::vector<float> x) {
    for (float& v : x) v = clip::round_to_bf16(v);
    return x;
  };
  for (int64_t B : batches)
    for (float ls : scales) {
      if (B == 1) continue;  // zero gradients, covered in fp32
      const std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
      const CpuLoss ref = cpu_loss(img, txt, B, ls);
      const CpuLoss emu = cpu_loss(rounded(img), rounded(txt), B, ls);
      const GpuLoss got = gpu_loss<bf16>(ctx, img, txt, B, ls);
      auto check = [&](const char* what, const std::vector<float>& g, const std::vector<float>& e, const std::vector<float>& r) {
        const double err = max_diff(g, r), bound = 2 * max_diff(rounded(e), r) + 1e-6 * max_abs(r);
        BOOST_TEST(err <= bound, what << " B=" << B << " logit_scale=" << ls << ": error " << err << " > " << bound);
      };
      check("d_image", got.d_image, emu.d_image, ref.d_image);
      check("d_text", got.d_text, emu.d_text, ref.d_text);
      const double loss_err = std::abs(got.loss_exact - ref.loss), loss_bound = 2 * std::abs(emu.loss - ref.loss) + 1e-6 * std::abs(ref.loss);
      BOOST_TEST(loss_err <= loss_bound, "loss B=" << B << ": " << loss_err << " > " << loss_bound);
      const double ds_err = std::abs(double(got.d_scale) - ref.d_scale);
      const double ds_bound = 2 * std::abs(double(emu.d_scale) - ref.d_scale) + 1e-6 * std::abs(ref.d_scale);
      BOOST_TEST(ds_err <= ds_bound, "d_logit_scale B=" << B << ": " << ds_err << " > " << ds_bound);
    }
}

BOOST_AUTO_TEST_CASE(contrastive_loss_is_deterministic_and_flags_zero_features) {
  Context ctx;
  std::mt19937 rng(19);
  const int64_t B = 33;
  std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
  const GpuLoss a = gpu_loss<float>(ctx, img, txt, B, 2.0f), b = gpu_loss<float>(ctx, img, txt, B, 2.0f);
  BOOST_TEST(std::memcmp(&a.loss_exact, &b.loss_exact, sizeof(double)) == 0);
  BOOST_TEST(std::memcmp(a.d_image.data(), b.d_image.data(), a.d_image.size() * sizeof(float)) == 0);
  BOOST_TEST(std::memcmp(a.d_text.data(), b.d_text.data(), a.d_text.size() * sizeof(float)) == 0);
  BOOST_TEST(bits(a.d_scale) == bits(b.d_scale));

  std::fill(txt.begin() + 5 * E, txt.begin() + 6 * E, 0.0f);  // the CPU refuses this batch
  const GpuLoss bad = gpu_loss<float>(ctx, img, txt, B, 2.0f, 0.5f);
  BOOST_TEST(std::isnan(bad.loss));
  BOOST_TEST(bad.d_scale == 0.5f, "d_logit_scale untouched when a norm is zero");
}

// ---- Contrastive loss by rows (a data-parallel rank's share) -------------------------------------

struct RowsLoss {
  double loss_exact = 0;
  float loss = 0, d_scale = 0;
  std::vector<float> d_image, d_text, logits;  // [B, E], [B, E], [n, B]
};

RowsLoss cpu_rows(const std::vector<float>& img, const std::vector<float>& txt, int64_t B, int64_t first, int64_t n,
                  float logit_scale) {
  RowsLoss r;
  r.d_image.resize(B * E);
  r.d_text.resize(B * E);
  r.logits.resize(n * B);
  const clip::ContrastiveLoss l = clip::contrastive_loss_rows<E>(img.data(), txt.data(), B, first, n, logit_scale,
                                                                 r.d_image.data(), r.d_text.data(), r.logits.data());
  r.loss_exact = l.loss;
  r.d_scale = l.d_logit_scale;
  return r;
}

// Features stored as S (rounded from img/txt), gradients fp32; d logit_scale added to d_scale_before.
template <class S>
RowsLoss gpu_rows(Context& ctx, const std::vector<float>& img, const std::vector<float>& txt, int64_t B, int64_t first,
                  int64_t n, float logit_scale, float d_scale_before = 0.0f) {
  clip::cuda::Arena plan = clip::cuda::Arena::planner();
  clip::cuda::ContrastiveLossRowsScratch<E> sizing(plan, B, n);
  BOOST_TEST(plan.used() <= clip::cuda::ContrastiveLossRowsScratch<E>::bytes(B, n));
  clip::cuda::Arena arena(clip::cuda::ContrastiveLossRowsScratch<E>::bytes(B, n));
  clip::cuda::ContrastiveLossRowsScratch<E> scratch(arena, B, n);
  std::vector<S> img_s(img.size()), txt_s(txt.size());
  for (size_t i = 0; i < img.size(); ++i) img_s[i] = clip::cuda::from_float<S>(img[i]), txt_s[i] = clip::cuda::from_float<S>(txt[i]);
  DeviceBuffer<S> di = to_device(img_s, ctx), dt = to_device(txt_s, ctx);
  DeviceBuffer<float> gi(B * E), gt(B * E), logits(n * B);
  DeviceBuffer<float> scale = to_device(std::vector<float>{logit_scale, 0.0f, d_scale_before}, ctx);
  DeviceBuffer<double> exact(1);
  clip::cuda::contrastive_loss_rows<E, S>(ctx, scratch, di.data(), dt.data(), B, first, n, scale.data(), gi.data(),
                                          gt.data(), scale.data() + 1, scale.data() + 2, exact.data(), logits.data());
  RowsLoss r;
  const std::vector<float> out = to_host(scale, ctx);
  r.loss = out[1];
  r.d_scale = out[2];
  r.loss_exact = to_host(exact, ctx)[0];
  r.d_image = to_host(gi, ctx);
  r.d_text = to_host(gt, ctx);
  r.logits = to_host(logits, ctx);
  return r;
}

// The slices a batch of B is checked with: the whole batch, its first and last row, a middle
// run, and the ranks' slices of W = 2 and 3.
std::vector<clip::dist::Slice> slices_of(int64_t B) {
  std::vector<clip::dist::Slice> out = {{0, B}, {0, 1}, {B - 1, 1}};
  if (B >= 4) out.push_back({B / 4, B / 2});
  for (int world : {2, 3})
    for (int r = 0; r < world; ++r) {
      const clip::dist::Slice s = clip::dist::batch_slice(B, world, r);
      if (s.rows > 0) out.push_back(s);
    }
  return out;
}

double relative(double got, double want) { return std::abs(got - want) / std::max(1e-3, std::abs(want)); }
double relative(const std::vector<float>& got, const std::vector<float>& want) {
  const double scale = max_abs(want);
  return scale > 0 ? max_diff(got, want) / scale : max_abs(got);
}

// fp32 features: each slice's share within 1e-5 of the CPU's (loss, d logit_scale, gradients of
// every row, the slice's logits); bf16 features: the same against the CPU on the bf16-rounded
// features (the gradients are fp32 either way, so the arithmetic after the rounding is the same).
template <class S>
void rows_match_cpu(const char* what, unsigned seed) {
  Context ctx;
  std::mt19937 rng(seed);
  auto stored = [](std::vector<float> x) {
    if constexpr (!std::is_same_v<S, float>)
      for (float& v : x) v = clip::round_to_bf16(v);
    return x;
  };
  double worst = 0;
  for (int64_t B : batches)
    for (float ls : scales) {
      const std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
      for (const clip::dist::Slice& sl : slices_of(B)) {
        const RowsLoss want = cpu_rows(stored(img), stored(txt), B, sl.first, sl.rows, ls);
        const RowsLoss got = gpu_rows<S>(ctx, img, txt, B, sl.first, sl.rows, ls);
        const double e_loss = relative(got.loss_exact, want.loss_exact);
        const double e_scale = relative(double(got.d_scale), double(want.d_scale));
        const double e_img = relative(got.d_image, want.d_image), e_txt = relative(got.d_text, want.d_text);
        const double e_logits = max_diff(got.logits, want.logits) / std::exp(double(ls));  // |L| <= s
        const auto where = [&] {
          return std::string(what) + " B=" + std::to_string(B) + " rows [" + std::to_string(sl.first) + ", " +
                 std::to_string(sl.first + sl.rows) + ") logit_scale=" + std::to_string(ls);
        };
        BOOST_TEST(e_loss <= 1e-5, where() << ": loss " << got.loss_exact << " vs " << want.loss_exact);
        BOOST_TEST(std::abs(double(got.loss) - want.loss_exact) <= 1e-6 * std::max(1.0, std::abs(want.loss_exact)),
                   where() << ": the float loss");
        BOOST_TEST(e_scale <= 1e-5, where() << ": d_logit_scale " << got.d_scale << " vs " << want.d_scale);
        if (B == 1) {  // one pair: G = 0, so every gradient is exactly zero
          BOOST_TEST(max_abs(got.d_image) == 0.0, where());
          BOOST_TEST(max_abs(got.d_text) == 0.0, where());
        } else {
          BOOST_TEST(e_img <= 1e-5, where() << ": d_image");
          BOOST_TEST(e_txt <= 1e-5, where() << ": d_text");
        }
        BOOST_TEST(e_logits <= 1e-5, where() << ": logits");
        worst = std::max({worst, e_loss, e_scale, e_img, e_txt, e_logits});
      }
    }
  BOOST_TEST_MESSAGE(what << ": contrastive_loss_rows, GPU vs CPU, worst relative error " << worst);
}

BOOST_AUTO_TEST_CASE(contrastive_loss_rows_fp32_matches_cpu) { rows_match_cpu<float>("fp32", 23); }

BOOST_AUTO_TEST_CASE(contrastive_loss_rows_bf16_features_match_cpu_on_rounded_features) {
  rows_match_cpu<bf16>("bf16", 29);
}

// What the data-parallel trainer relies on: the shares of the ranks' slices (W = 3, unequal) sum
// to the single-matrix GPU loss and to the CPU's whole-batch loss and gradients.
BOOST_AUTO_TEST_CASE(contrastive_loss_rows_shares_sum_to_the_whole_batch) {
  Context ctx;
  std::mt19937 rng(31);
  const int64_t B = 301;
  const float ls = 2.6592600f;
  const std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
  const CpuLoss want = cpu_loss(img, txt, B, ls);
  const GpuLoss whole = gpu_loss<float>(ctx, img, txt, B, ls);
  double loss = 0, d_scale = 0;
  std::vector<float> d_img(B * E, 0.0f), d_txt(B * E, 0.0f);
  for (int r = 0; r < 3; ++r) {
    const clip::dist::Slice sl = clip::dist::batch_slice(B, 3, r);
    const RowsLoss part = gpu_rows<float>(ctx, img, txt, B, sl.first, sl.rows, ls);
    loss += part.loss_exact;
    d_scale += part.d_scale;
    for (int64_t i = 0; i < B * E; ++i) d_img[i] += part.d_image[i], d_txt[i] += part.d_text[i];
  }
  BOOST_TEST_MESSAGE("W = 3 shares summed vs the CPU's whole batch: loss " << relative(loss, want.loss) << ", d_image "
                     << relative(d_img, want.d_image) << ", d_text " << relative(d_txt, want.d_text));
  BOOST_TEST(relative(loss, want.loss) <= 1e-6);
  BOOST_TEST(relative(loss, whole.loss_exact) <= 1e-6);
  BOOST_TEST(relative(d_scale, double(want.d_scale)) <= 1e-5);
  BOOST_TEST(relative(d_img, want.d_image) <= 1e-5);
  BOOST_TEST(relative(d_txt, want.d_text) <= 1e-5);
  BOOST_TEST(relative(d_img, whole.d_image) <= 1e-5);
  BOOST_TEST(relative(d_txt, whole.d_text) <= 1e-5);
}

BOOST_AUTO_TEST_CASE(contrastive_loss_rows_is_deterministic_and_flags_zero_features) {
  Context ctx;
  std::mt19937 rng(37);
  const int64_t B = 33;
  std::vector<float> img = random_features(rng, B), txt = random_features(rng, B);
  const RowsLoss a = gpu_rows<float>(ctx, img, txt, B, 11, 11, 2.0f), b = gpu_rows<float>(ctx, img, txt, B, 11, 11, 2.0f);
  BOOST_TEST(std::memcmp(&a.loss_exact, &b.loss_exact, sizeof(double)) == 0);
  BOOST_TEST(std::memcmp(a.d_image.data(), b.d_image.data(), a.d_image.size() * sizeof(float)) == 0);
  BOOST_TEST(std::memcmp(a.d_text.data(), b.d_text.data(), a.d_text.size() * sizeof(float)) == 0);
  BOOST_TEST(bits(a.d_scale) == bits(b.d_scale));
  // d logit_scale is added to its slot (the share, rounded to float, plus what was there).
  const RowsLoss added = gpu_rows<float>(ctx, img, txt, B, 11, 11, 2.0f, 0.5f);
  BOOST_TEST(bits(added.d_scale) == bits(0.5f + a.d_scale));

  // A zero row outside the slice still makes the share NaN: every rank sees every row.
  std::fill(txt.begin() + 30 * E, txt.begin() + 31 * E, 0.0f);
  const RowsLoss bad = gpu_rows<float>(ctx, img, txt, B, 0, 11, 2.0f, 0.5f);
  BOOST_TEST(std::isnan(bad.loss));
  BOOST_TEST(std::isnan(bad.loss_exact));
  BOOST_TEST(bad.d_scale == 0.5f, "d_logit_scale untouched when a norm is zero");

  // Bad slices and a scratch too small are refused before any launch.
  clip::cuda::Arena arena(clip::cuda::ContrastiveLossRowsScratch<E>::bytes(B, 4));
  clip::cuda::ContrastiveLossRowsScratch<E> small(arena, B, 4);
  DeviceBuffer<float> f(B * E), g(B * E), scale(1);
  auto call = [&](int64_t batch, int64_t first, int64_t rows) {
    clip::cuda::contrastive_loss_rows<E, float>(ctx, small, f.data(), f.data(), batch, first, rows, scale.data(),
                                                g.data(), g.data(), nullptr, nullptr);
  };
  BOOST_CHECK_THROW(call(B, 0, 5), clip::Error);       // more rows than the scratch holds
  BOOST_CHECK_THROW(call(B, 31, 3), clip::Error);      // past the batch
  BOOST_CHECK_THROW(call(B + 1, 0, 4), clip::Error);   // a batch larger than the scratch's
  BOOST_CHECK_THROW(call(B, -1, 2), clip::Error);      // not a slice
}

}  // namespace
