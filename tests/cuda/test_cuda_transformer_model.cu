// The CUDA vision-transformer CLIP (kernels/models/) against OpenAI's float32 golden files
// (MANIFEST sections A and C) and the CPU path: fp32 forward outputs and per-block intermediates,
// one training step's gradients, one Trainer step (loss, AdamW result), and bf16 with looser
// tolerances (see bf16_tolerance); the Trainer's gradient accumulation against its full batch, and
// its refusal of a non-finite loss.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/gpu.hpp"
#include "clip/clip.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"
#include "numeric.hpp"
#include "kernels/clip_cuda.cuh"
#include "messages.hpp"
#include "clip/train/init.hpp"

namespace {

using clip::test::ViTTiny;
using Net = clip::Clip<ViTTiny>;
using Params = Net::Params;
constexpr int E = Net::E;

constexpr double forward_tolerance = 1e-5;  // as tests/test_vit.cpp (||got - ref|| / ||ref||)
constexpr double grad_tolerance = 1e-4;     // as tests/test_vit_grad.cpp (max |got - ref| / max |ref|)
constexpr double key_bias_bound = 1e-6;
// bf16 keeps 8 significant bits: each stored activation and weight carries a relative rounding
// error up to 2^-9 = 2e-3. Two blocks per tower, each with ~6 rounded intermediates on the path
// (LayerNorm, qkv, attention, residual, MLP twice) and the features' own rounding put the
// end-to-end error at a few 1e-3 typically; 3e-2 leaves a margin of ~5x while still catching any
// real bug (a wrong tensor or a missing term moves features by O(1)). The MANIFEST expects
// "~1e-2" for bf16 paths against these files.
constexpr double bf16_tolerance = 3e-2;

using clip::test::max_relative;
using clip::test::relative_l2;

// Device S [n] -> host float.
template <class S>
std::vector<float> to_host(clip::cuda::Context& ctx, const S* d, int64_t n) {
  clip::cuda::DeviceBuffer<float> f(n);
  clip::cuda::convert(ctx, f.data(), d, n);
  std::vector<float> out(static_cast<size_t>(n));
  f.download(out.data(), n, ctx.stream());
  ctx.synchronize();
  return out;
}

struct Golden {
  clip::SafeTensors file;
  std::unique_ptr<Params> params = std::make_unique<Params>();
  explicit Golden(const std::filesystem::path& path) : file(clip::SafeTensors::open(path)) {
    clip::load_state_dict(*params, file, clip::Extra::allow);
  }
};

// Forward through the public Model, fp32 or bf16, against the file's outputs.
void check_model_outputs(clip::cuda::Precision precision, double tolerance) {
  auto path = clip::test::golden_file("vit_tiny.safetensors");
  if (!path) return;
  const clip::SafeTensors file = clip::SafeTensors::open(*path);
  clip::Model<ViTTiny, clip::Device::cuda> model(precision);
  model.load(file, clip::Extra::allow);
  const clip::Tensor images = file.tensor("input.image");           // [2, 3, 32, 32]
  const std::vector<int64_t> tokens = file.integers("input.text");  // [3, 77]
  const clip::Tensor img = model.encode_image(images);
  const clip::Tensor txt = model.encode_text(tokens);
  const clip::Logits logits = model.logits(img, txt);
  auto check = [&](const std::string& name, const clip::Tensor& got) {
    const clip::Tensor ref = file.tensor(name);
    BOOST_TEST_REQUIRE(got.shape == ref.shape, name);
    const double err = relative_l2(got.data(), ref.data(), ref.numel());
    BOOST_TEST_MESSAGE("  " << name << ": " << err);
    BOOST_TEST(err <= tolerance, name << ": " << err);
  };
  check("output.image_features", img);
  check("output.text_features", txt);
  check("output.logits_per_image", logits.per_image);
  check("output.logits_per_text", logits.per_text);
  // Other id types and the float-tensor form give the same features; batch 1 matches its row.
  const std::vector<int32_t> narrow(tokens.begin(), tokens.end());
  BOOST_TEST(model.encode_text(narrow).values == txt.values);
  BOOST_TEST(model.encode_text(file.tensor("input.text")).values == txt.values);
  const clip::Tensor one = model.encode_text(std::vector<int32_t>(narrow.begin() + 77, narrow.begin() + 154));
  BOOST_TEST(relative_l2(one.data(), txt.data() + E, E) <= tolerance);
}

}  // namespace

BOOST_AUTO_TEST_CASE(cuda_vit_tiny_fp32_outputs_match_openai) {
  check_model_outputs(clip::cuda::Precision::fp32, forward_tolerance);
}

BOOST_AUTO_TEST_CASE(cuda_vit_tiny_bf16_outputs_match_openai_loosely) {
  check_model_outputs(clip::cuda::Precision::bf16, bf16_tolerance);
}

// Per-block intermediates: a training forward keeps every block's input, which the traces give.
template <class S>
void check_intermediates(double tolerance) {
  auto path = clip::test::golden_file("vit_tiny.safetensors");
  if (!path) return;
  Golden g(*path);
  clip::cuda::Context ctx;
  const clip::Tensor images = g.file.tensor("input.image");
  const std::vector<int64_t> ids = g.file.integers("input.text");
  const int64_t bi = images.shape[0], bt = static_cast<int64_t>(ids.size()) / Net::T;
  clip::cuda::ClipNet<ViTTiny, S> net(ctx, *g.params, std::max(bi, bt), /*training=*/true);

  clip::cuda::DeviceBuffer<float> d_images(images.numel());
  d_images.upload(images.data(), images.numel(), ctx.stream());
  clip::cuda::DeviceBuffer<S> feats(std::max(bi, bt) * E);
  net.image_forward_train(d_images.data(), feats.data(), bi);
  auto& ia = net.image_acts();
  constexpr int Tv = clip::VisionTransformer<ViTTiny>::T, Cv = clip::VisionTransformer<ViTTiny>::C;
  auto check = [&](const std::string& name, const std::vector<float>& got) {
    const clip::Tensor ref = g.file.tensor(name);
    BOOST_TEST_REQUIRE(static_cast<int64_t>(got.size()) == ref.numel(), name);
    const double err = relative_l2(got.data(), ref.data(), ref.numel());
    BOOST_TEST_MESSAGE("  " << name << ": " << err);
    BOOST_TEST(err <= tolerance, name << ": " << err);
  };
  check("trace.visual.embed", to_host(ctx, ia.embed, bi * Tv * Cv));
  check("trace.visual.ln_pre", to_host(ctx, ia.stack.input(0), bi * Tv * Cv));
  for (int i = 0; i < 2; ++i)
    check("trace.visual.transformer.resblocks." + std::to_string(i), to_host(ctx, ia.stack.input(i + 1), bi * Tv * Cv));
  check("trace.visual.ln_post", to_host(ctx, ia.pooled_ln, bi * Cv));
  check("output.image_features", to_host(ctx, feats.data(), bi * E));

  // Text: the forward runs only the positions the batch needs; the traces hold all 77 (causal:
  // the first t agree).
  const std::vector<int32_t> narrow(ids.begin(), ids.end());
  const clip::cuda::TextBatch tb = clip::cuda::TextBatch::from_host(narrow.data(), bt, Net::T, ViTTiny::vocab_size);
  BOOST_TEST(tb.positions == clip::TextTransformer<ViTTiny>::positions_needed(narrow.data(), bt));
  clip::cuda::DeviceBuffer<int32_t> d_ids(bt * Net::T), d_pool(bt);
  d_ids.upload(narrow.data(), bt * Net::T, ctx.stream());
  d_pool.upload(tb.pool.data(), bt, ctx.stream());
  net.text_forward_train(d_ids.data(), d_pool.data(), tb.positions, feats.data(), bt);
  auto& ta = net.text_acts();
  constexpr int Ct = clip::TextTransformer<ViTTiny>::C;
  const int64_t t = tb.positions;
  auto check_prefix = [&](const std::string& name, const std::vector<float>& got /* [B, t, C] */) {
    const clip::Tensor ref = g.file.tensor(name);  // [B, 77, C]
    std::vector<float> want;
    for (int64_t b = 0; b < bt; ++b)
      want.insert(want.end(), ref.data() + b * Net::T * Ct, ref.data() + (b * Net::T + t) * Ct);
    const double err = relative_l2(got.data(), want.data(), static_cast<int64_t>(want.size()));
    BOOST_TEST_MESSAGE("  " << name << " (first " << t << " positions): " << err);
    BOOST_TEST(err <= tolerance, name << ": " << err);
  };
  check_prefix("trace.text.embed", to_host(ctx, ta.stack.input(0), bt * t * Ct));
  for (int i = 0; i < 2; ++i)
    check_prefix("trace.text.transformer.resblocks." + std::to_string(i), to_host(ctx, ta.stack.input(i + 1), bt * t * Ct));
  check("output.text_features", to_host(ctx, feats.data(), bt * E));
}

BOOST_AUTO_TEST_CASE(cuda_vit_tiny_fp32_intermediates_match_openai) { check_intermediates<float>(forward_tolerance); }
BOOST_AUTO_TEST_CASE(cuda_vit_tiny_bf16_intermediates_match_openai_loosely) {
  check_intermediates<clip::cuda::bf16>(bf16_tolerance);
}

// One training step's gradients (vit_tiny_grad), fp32: every gradient within 1e-4; bf16: the
// whole gradient's direction (cosine >= 0.99) and the loss within bf16_tolerance.
template <class S>
void check_gradients(bool exact) {
  auto weights_path = clip::test::golden_file("vit_tiny.safetensors");
  auto grad_path = clip::test::golden_file("vit_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  Golden g(*weights_path);
  const clip::SafeTensors ref = clip::SafeTensors::open(*grad_path);
  clip::cuda::Context ctx;
  const clip::Tensor images = ref.tensor("input.image");  // [4, 3, 32, 32]
  const std::vector<int64_t> ids = ref.integers("input.text");
  const int64_t batch = images.shape[0];
  clip::cuda::ClipNet<ViTTiny, S> net(ctx, *g.params, batch, /*training=*/true);

  clip::cuda::DeviceBuffer<float> d_images(images.numel());
  d_images.upload(images.data(), images.numel(), ctx.stream());
  const std::vector<int32_t> narrow(ids.begin(), ids.end());
  const auto tb = clip::cuda::TextBatch::from_host(narrow.data(), batch, Net::T, ViTTiny::vocab_size);
  clip::cuda::DeviceBuffer<int32_t> d_ids(batch * Net::T), d_pool(batch);
  d_ids.upload(narrow.data(), batch * Net::T, ctx.stream());
  d_pool.upload(tb.pool.data(), batch, ctx.stream());
  clip::cuda::DeviceBuffer<S> feats(2 * batch * E), d_feats(2 * batch * E);
  net.image_forward_train(d_images.data(), feats.data(), batch);
  net.text_forward_train(d_ids.data(), d_pool.data(), tb.positions, feats.data() + batch * E, batch);
  const std::vector<float> f = to_host(ctx, feats.data(), 2 * batch * E);
  std::vector<float> df(2 * batch * E);
  const clip::ContrastiveLoss loss = clip::contrastive_loss<E>(f.data(), f.data() + batch * E, batch,
                                                               g.params->logit_scale[0], df.data(), df.data() + batch * E);
  const double ref_loss = ref.tensor("output.loss").values[0];
  BOOST_TEST_MESSAGE("loss " << loss.loss << ", reference " << ref_loss);
  BOOST_TEST(std::abs(loss.loss - ref_loss) <= (exact ? 1e-5 : bf16_tolerance) * ref_loss);
  clip::cuda::DeviceBuffer<float> df32(2 * batch * E);
  df32.upload(df.data(), 2 * batch * E, ctx.stream());
  clip::cuda::convert(ctx, d_feats.data(), static_cast<const float*>(df32.data()), 2 * batch * E);
  net.image_backward(d_feats.data(), batch);
  net.text_backward(d_feats.data() + batch * E, batch);

  auto& W = net.weights();
  std::vector<float> flat(static_cast<size_t>(W.size()));
  CLIP_CUDA_CHECK(cudaMemcpy(flat.data(), W.grad_data(), sizeof(float) * W.size(), cudaMemcpyDeviceToHost));
  flat[W.layout().offset(g.params->logit_scale)] += loss.d_logit_scale;
  auto grads = std::make_unique<Params>();
  W.layout().unpack(flat.data(), *grads);

  int compared = 0;
  double worst = 0, dot = 0, n_got = 0, n_ref = 0;
  clip::for_each_tensor(*grads, [&](const std::string& name, const auto& gt, clip::Role) {
    const clip::Tensor r = ref.tensor("grad." + name);
    BOOST_TEST_REQUIRE(r.numel() == gt.numel, name);
    const float* got = gt.data();
    ++compared;
    for (int64_t i = 0; i < gt.numel; ++i) dot += double(got[i]) * r.values[i], n_got += double(got[i]) * got[i],
                                           n_ref += double(r.values[i]) * r.values[i];
    if (!exact) return;
    if (name.ends_with("in_proj_bias")) {
      const int64_t third = gt.numel / 3;
      double key = 0;
      for (int64_t i = third; i < 2 * third; ++i) key = std::max(key, std::abs(double(got[i]) - r.values[i]));
      const double q = max_relative(got, r.data(), third), v = max_relative(got + 2 * third, r.data() + 2 * third, third);
      BOOST_TEST(std::max(q, v) <= grad_tolerance, name);
      BOOST_TEST(key <= key_bias_bound, name);
      worst = std::max({worst, q, v});
      return;
    }
    const double err = max_relative(got, r.data(), gt.numel);
    BOOST_TEST(err <= grad_tolerance, name << ": " << err);
    worst = std::max(worst, err);
  });
  BOOST_TEST(compared == 62);
  const double cosine = dot / std::sqrt(n_got * n_ref);
  BOOST_TEST_MESSAGE("largest gradient error " << worst << ", cosine with the reference " << cosine);
  BOOST_TEST(cosine >= (exact ? 1 - 1e-8 : 0.99));
}

BOOST_AUTO_TEST_CASE(cuda_vit_tiny_fp32_gradients_match_openai) { check_gradients<float>(true); }
BOOST_AUTO_TEST_CASE(cuda_vit_tiny_bf16_gradients_point_the_same_way) { check_gradients<clip::cuda::bf16>(false); }

// One Trainer step (constant lr 1e-3, as tests/test_trainer.cpp): loss, schedule, temperature,
// the first moments (m = 0.1 g) and the weights after AdamW, through download().
void check_trainer_step(clip::cuda::Precision precision) {
  const bool exact = precision == clip::cuda::Precision::fp32;
  auto weights_path = clip::test::golden_file("vit_tiny.safetensors");
  auto grad_path = clip::test::golden_file("vit_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  Golden g(*weights_path);
  const clip::SafeTensors ref = clip::SafeTensors::open(*grad_path);
  const clip::Tensor images = ref.tensor("input.image");
  const std::vector<int64_t> ids = ref.integers("input.text");
  const std::vector<int32_t> tokens(ids.begin(), ids.end());
  clip::TrainOptions options;
  options.batch = images.shape[0];
  options.adam = {1e-3f, 0.9f, 0.98f, 1e-6f, 0.2f};
  const float logit_scale = g.params->logit_scale[0];
  clip::Trainer<ViTTiny, clip::Device::cuda> trainer(*g.params, options, precision);
  const clip::StepResult r = trainer.step(images.data(), tokens.data());
  const double ref_loss = ref.tensor("output.loss").values[0];
  BOOST_TEST_MESSAGE("trainer loss " << r.loss << " vs " << ref_loss << ", grad norm " << r.grad_norm);
  BOOST_TEST(std::abs(r.loss - ref_loss) <= (exact ? 1e-5 : bf16_tolerance) * ref_loss);
  BOOST_TEST(r.lr == 1e-3f);
  BOOST_TEST(r.temperature == std::exp(logit_scale));
  BOOST_TEST(trainer.steps() == 1);
  BOOST_TEST(trainer.learning_rate(5) == 1e-3f);
  trainer.download();
  BOOST_TEST(trainer.optimizer().steps() == 1);

  double worst_grad = 0, worst_big = 0, worst_small = 0;
  clip::for_each_tensor(trainer.optimizer().m(), [&](const std::string& name, const auto& m, clip::Role role) {
    if constexpr (!clip::is_counter_v<decltype(m)>) {
      if (role != clip::Role::parameter) return;
      const clip::Tensor gr = ref.tensor("grad." + name);
      double err = 0, scale = 0;
      const int64_t n = m.numel;
      const bool in_proj_bias = name.ends_with("in_proj_bias");
      for (int64_t i = 0; i < n; ++i) {
        if (in_proj_bias && i >= n / 3 && i < 2 * n / 3) continue;  // the key biases' noise
        err = std::max(err, std::abs(double(m.data()[i]) / 0.1 - gr.values[i]));
        scale = std::max(scale, std::abs(double(gr.values[i])));
      }
      worst_grad = std::max(worst_grad, err / std::max(scale, 1e-30));
    }
  });
  clip::for_each_tensor(*g.params, [&](const std::string& name, const auto& p, clip::Role role) {
    if constexpr (!clip::is_counter_v<decltype(p)>) {
      if (role != clip::Role::parameter) return;
      const clip::Tensor after = ref.tensor("after." + name), gr = ref.tensor("grad." + name);
      for (int64_t i = 0; i < p.numel; ++i) {
        const double d = std::abs(double(p.data()[i]) - after.values[i]);
        if (std::abs(gr.values[i]) >= 1e-4) worst_big = std::max(worst_big, d);
        else worst_small = std::max(worst_small, d);
      }
    }
  });
  BOOST_TEST_MESSAGE("  gradients (m / 0.1): " << worst_grad << "; weights: " << worst_big << " where |g| >= 1e-4, "
                                               << worst_small << " elsewhere");
  if (exact) {
    BOOST_TEST(worst_grad <= grad_tolerance);
    BOOST_TEST(worst_big <= 1e-6);
    BOOST_TEST(worst_small <= 5e-4);
  } else {
    // bf16: a first AdamW step moves each weight by ~lr sign(g) whatever |g|: a weight whose
    // gradient sign flips under bf16 rounding is off by up to 2 lr.
    BOOST_TEST(worst_big <= 2.1e-3);
  }
  // logit_scale stays within [0, ln 100].
  BOOST_TEST(g.params->logit_scale[0] >= 0.0f);
  BOOST_TEST(g.params->logit_scale[0] <= clip::max_logit_scale);
}

BOOST_AUTO_TEST_CASE(cuda_trainer_fp32_step_reproduces_pytorch) { check_trainer_step(clip::cuda::Precision::fp32); }
BOOST_AUTO_TEST_CASE(cuda_trainer_bf16_step_is_close) { check_trainer_step(clip::cuda::Precision::bf16); }

// ---- Trainer: gradient accumulation, refusals (random weights, no golden file) ----------------

namespace {

using clip::test::random_batch;

using Values = std::map<std::string, std::vector<float>>;
template <class P>
Values parameter_values(const P& params) {
  Values out;
  clip::for_each_tensor(params, [&](const std::string& name, const auto& t, clip::Role role) {
    if constexpr (!clip::is_counter_v<decltype(t)>)
      if (role == clip::Role::parameter) out[name] = std::vector<float>(t.data(), t.data() + t.numel);
  });
  return out;
}

struct TrainRun {
  std::vector<double> losses;
  std::vector<float> norms;
  Values params, m;  // after the first step (download())
};

// `steps` fp32 steps of batch 8 from init_params(42), micro-batch `micro`.
TrainRun train_run(int64_t micro, bool recompute, int steps) {
  auto params = std::make_unique<Params>();
  clip::init_params<ViTTiny>(*params, 42);
  clip::TrainOptions o;
  o.batch = 8;
  o.micro_batch = micro;
  o.recompute = recompute;
  o.adam.lr = 1e-3f;
  clip::Trainer<ViTTiny, clip::Device::cuda> trainer(*params, o, clip::cuda::Precision::fp32);
  TrainRun out;
  std::vector<float> images;
  std::vector<int32_t> tokens;
  for (int s = 0; s < steps; ++s) {
    random_batch<ViTTiny>(images, tokens, o.batch, 100 + s);
    const clip::StepResult r = trainer.step(images.data(), tokens.data());
    out.losses.push_back(r.loss);
    out.norms.push_back(r.grad_norm);
    if (s == 0) {
      trainer.download();
      out.params = parameter_values(*params);
      out.m = parameter_values(trainer.optimizer().m());
    }
  }
  return out;
}

// As tests/test_trainer.cpp's expect_same_step, with fp32 GPU tolerances: the gemms of different
// micro-batch sizes sum in different orders. The key biases' gradient is rounding noise (zero in
// exact arithmetic) and is left out of the moments.
void expect_same_run(const TrainRun& a, const TrainRun& b, const std::string& what) {
  double loss = 0, norm = 0, weights = 0, weights_small = 0, moments = 0;
  for (size_t s = 0; s < a.losses.size(); ++s) {
    loss = std::max(loss, std::abs(a.losses[s] - b.losses[s]) / a.losses[s]);
    norm = std::max(norm, std::abs(double(a.norms[s]) - b.norms[s]) / a.norms[s]);
  }
  for (const auto& [name, x] : a.params) {
    const std::vector<float>& y = b.params.at(name);
    const std::vector<float>& mx = a.m.at(name);
    const std::vector<float>& my = b.m.at(name);
    const bool in_proj_bias = name.ends_with("in_proj_bias");
    const size_t n = x.size();
    double err = 0, scale = 0;
    for (size_t i = 0; i < n; ++i) {
      const double d = std::abs(double(x[i]) - y[i]);
      if (std::abs(mx[i]) / 0.1 >= 1e-4) weights = std::max(weights, d);
      else weights_small = std::max(weights_small, d);
      if (in_proj_bias && i >= n / 3 && i < 2 * n / 3) continue;
      err = std::max(err, std::abs(double(mx[i]) - my[i]));
      scale = std::max(scale, std::abs(double(mx[i])));
    }
    moments = std::max(moments, err / std::max(scale, 1e-30));
  }
  BOOST_TEST_MESSAGE(what << ": loss " << loss << ", grad norm " << norm << ", first moments " << moments
                          << ", weights " << weights << " (" << weights_small << " where |g| < 1e-4)");
  BOOST_TEST(loss <= 1e-5, what << ": loss");
  BOOST_TEST(norm <= 1e-4, what << ": gradient norm");
  BOOST_TEST(moments <= grad_tolerance, what << ": first moments");
  BOOST_TEST(weights <= 1e-6, what << ": weights");
  BOOST_TEST(weights_small <= 5e-4, what << ": weights with tiny gradients");
}

}  // namespace

// Micro-batches (with a remainder) and recomputation reproduce the full-batch steps on the GPU,
// and the full-batch loss is the CPU Trainer's.
BOOST_AUTO_TEST_CASE(cuda_trainer_accumulation_matches_full_batch) {
  const TrainRun full = train_run(8, false, 2);
  expect_same_run(full, train_run(2, false, 2), "micro-batch 2");
  expect_same_run(full, train_run(3, false, 2), "micro-batch 3 (3 + 3 + 2)");
  expect_same_run(full, train_run(1, true, 2), "micro-batch 1 with recompute");

  auto params = std::make_unique<Params>();
  clip::init_params<ViTTiny>(*params, 42);
  clip::TrainOptions o;
  o.batch = 8;
  o.adam.lr = 1e-3f;
  clip::Trainer<ViTTiny> cpu(*params, o);
  std::vector<float> images;
  std::vector<int32_t> tokens;
  random_batch<ViTTiny>(images, tokens, o.batch, 100);
  const clip::StepResult r = cpu.step(images.data(), tokens.data());
  BOOST_TEST_MESSAGE("first loss: CPU " << r.loss << ", GPU " << full.losses[0]);
  BOOST_TEST(std::abs(r.loss - full.losses[0]) <= 2e-5 * r.loss);  // each is within 1e-5 of PyTorch
  BOOST_TEST(std::abs(double(r.grad_norm) - full.norms[0]) <= 1e-4 * r.grad_norm);
}

// A NaN pixel: the step is refused with the CPU's kind of message, the weights do not move, and
// the gradients left by the refused backward are gone (the next good step is a fresh first step,
// up to cuBLASLt's choices).
BOOST_AUTO_TEST_CASE(cuda_trainer_non_finite_loss_stops_before_the_update) {
  for (const int64_t micro : {int64_t{4}, int64_t{2}}) {
    auto params = std::make_unique<Params>();
    clip::init_params<ViTTiny>(*params, 4);
    const Values before = parameter_values(*params);
    clip::TrainOptions o;
    o.batch = 4;
    o.micro_batch = micro;
    o.adam.lr = 1e-3f;
    clip::Trainer<ViTTiny, clip::Device::cuda> trainer(*params, o, clip::cuda::Precision::fp32);
    std::vector<float> images;
    std::vector<int32_t> tokens;
    random_batch<ViTTiny>(images, tokens, o.batch, 3);
    std::vector<float> bad = images;
    bad[5] = NAN;
    const std::string message = clip::test::message_of([&] { trainer.step(bad.data(), tokens.data()); });
    BOOST_TEST_MESSAGE("micro-batch " << micro << ": " << message);
    BOOST_TEST(message.find("the loss is") != std::string::npos, message);
    BOOST_TEST(message.find("not updated") != std::string::npos, message);
    BOOST_TEST(trainer.steps() == 0);
    trainer.download();
    BOOST_TEST((parameter_values(*params) == before));

    const clip::StepResult after = trainer.step(images.data(), tokens.data());
    auto fresh_params = std::make_unique<Params>();
    clip::init_params<ViTTiny>(*fresh_params, 4);
    clip::Trainer<ViTTiny, clip::Device::cuda> fresh(*fresh_params, o, clip::cuda::Precision::fp32);
    const clip::StepResult first = fresh.step(images.data(), tokens.data());
    BOOST_TEST(std::abs(after.loss - first.loss) <= 1e-6 * first.loss);
    BOOST_TEST(std::abs(double(after.grad_norm) - first.grad_norm) <= 1e-5 * first.grad_norm);
    BOOST_TEST(trainer.steps() == 1);
  }
}

BOOST_AUTO_TEST_CASE(cuda_trainer_rejects_bad_micro_batches) {
  auto params = std::make_unique<Params>();
  clip::zero(*params);
  clip::TrainOptions o;
  o.batch = 4;
  for (const int64_t micro : {int64_t{5}, int64_t{-1}}) {
    o.micro_batch = micro;
    const std::string message = clip::test::message_of(
        [&] { clip::Trainer<ViTTiny, clip::Device::cuda>(*params, o, clip::cuda::Precision::fp32); });
    BOOST_TEST(message.find("micro-batch") != std::string::npos, message);
  }
}
