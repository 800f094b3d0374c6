// The tiny golden models with their matrix products in bf16 (Precision::bf16: operands rounded to
// bf16, fp32 sums; LayerNorm, softmax, the loss in fp32) against OpenAI's float32 outputs and
// gradients (golden MANIFEST sections A-C). Meson runs this file twice: on the best path of the
// machine (AMX tiles where the CPU has them) and with CLIP_CPU_ISA=fp32 (the fallback).
//
// Error model. Each product rounds its operands to bf16 (relative error u = 2^-8 each), so a
// layer's output carries a relative error of order u, and the errors of the L layers of a tower
// add up (independent roundings, mostly cancelling): features and gradients are expected a few u
// from float32, not 1e-5 as in fp32. The bounds: per row of features, cosine similarity >= 0.999;
// per gradient tensor, ||g - ref|| / ||ref|| <= 8 u + 3 s, where s is the same tensor's error when
// only the towers' inputs are rounded to bf16 (the model's own sensitivity, see
// check_training_step). The loss sees feature errors through logits 100 times the cosines
// (exp(logit_scale)): within 16 u relative. Inference also checks that bf16 really ran (the
// features are not those of the fp32 path).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "clip/clip.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/ops/cpu_features.hpp"
#include "clip/train/checkpoint.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "clip/train/trainer.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"
#include "numeric.hpp"

namespace {

using clip::test::RNTiny;
using clip::test::ViTTiny;

constexpr double u = 1.0 / 256;  // bf16's unit roundoff
constexpr double min_row_cosine = 0.999;
constexpr double grad_relative_l2 = 8 * u;
constexpr double loss_relative = 16 * u;

double cosine(const float* a, const float* b, int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < n; ++i) ab += double(a[i]) * b[i], aa += double(a[i]) * a[i], bb += double(b[i]) * b[i];
  return ab / std::sqrt(aa * bb);
}

// Every row's cosine with the reference >= min_row_cosine; the smallest one is returned.
double check_rows(const clip::Tensor& got, const clip::Tensor& ref, const std::string& what) {
  BOOST_REQUIRE(got.shape == ref.shape);
  const int64_t rows = got.shape[0], cols = got.numel() / rows;
  double worst = 1;
  for (int64_t r = 0; r < rows; ++r) {
    const double c = cosine(got.data() + r * cols, ref.data() + r * cols, cols);
    BOOST_TEST(c >= min_row_cosine, what << " row " << r << ": cosine " << c);
    worst = std::min(worst, c);
  }
  BOOST_TEST_MESSAGE(what << ": smallest row cosine " << worst << " (1 - cos = " << 1 - worst << ")");
  return worst;
}

template <class Cfg>
void check_inference(const char* file) {
  auto path = clip::test::golden_file(file);
  if (!path) return;
  BOOST_TEST_MESSAGE(file << ": bf16 products on the " << clip::cpu_isa_name(clip::cpu_isa()) << " path");
  const clip::SafeTensors golden = clip::SafeTensors::open(*path);
  const clip::Model<Cfg> bf16(*path, clip::Precision::bf16, clip::Extra::allow);
  const clip::Model<Cfg> fp32(*path, clip::Extra::allow);
  BOOST_TEST((bf16.precision() == clip::Precision::bf16));
  const clip::Tensor images = golden.tensor("input.image");
  const std::vector<int64_t> tokens = golden.integers("input.text");
  const clip::Tensor image = bf16.encode_image(images), text = bf16.encode_text(tokens);
  check_rows(image, golden.tensor("output.image_features"), std::string(file) + " image features");
  check_rows(text, golden.tensor("output.text_features"), std::string(file) + " text features");
  // bf16 really ran: the fp32 model's features differ (by far more than fp32 rounding).
  BOOST_TEST(clip::test::relative_l2(image.data(), fp32.encode_image(images).data(), image.numel()) > 1e-5);
  BOOST_TEST(clip::test::relative_l2(text.data(), fp32.encode_text(tokens).data(), text.numel()) > 1e-5);
}

// One training step's gradients: the towers' products in `precision` (the loss in fp32, as
// Trainer runs Precision::bf16); with `round_inputs`, the inputs of both towers (the images and
// the token embedding table) rounded to bf16 first.
// The feature gradients are taken at the reference features, so the parameter gradients measure
// the towers' forward and backward passes, not the loss's amplification of feature errors
// (logits are exp(logit_scale) = 100 times the cosines).
template <class Cfg>
struct TrainingStep {
  using Net = clip::Clip<Cfg>;
  static constexpr int E = Net::E;
  std::unique_ptr<typename Net::Params> grads = std::make_unique<typename Net::Params>();
  double loss = 0;  // at the step's own features

  TrainingStep(const clip::SafeTensors& weights, const clip::SafeTensors& golden, clip::Precision precision,
               bool round_inputs) {
    auto params = std::make_unique<typename Net::Params>();
    clip::load_state_dict(*params, weights, clip::Extra::allow);
    clip::zero(*grads);
    clip::Tensor images = golden.tensor("input.image");
    if (round_inputs) {
      for (float& v : images.values) v = clip::round_to_bf16(v);
      float* table = params->token_embedding.weight.data();
      for (int64_t i = 0; i < params->token_embedding.weight.numel; ++i) table[i] = clip::round_to_bf16(table[i]);
    }
    const std::vector<int64_t> tokens = golden.integers("input.text");
    const int64_t batch = images.shape[0];
    typename Net::Visual::TrainActs image_acts(batch);
    typename Net::Text::TrainActs text_acts(batch);
    std::vector<float> image_features(batch * E), text_features(batch * E), d_image(batch * E), d_text(batch * E);
    const clip::MatmulPrecisionScope towers(precision);
    if constexpr (clip::dims<Cfg>::is_resnet)
      Net::Visual::forward_train(params->visual, image_acts, images.data(), image_features.data(), batch, true);
    else
      Net::Visual::forward_train(params->visual, image_acts, images.data(), image_features.data(), batch);
    Net::Text::forward_train(*params, text_acts, tokens.data(), text_features.data(), batch);
    float d_logit_scale = 0;
    {
      const clip::MatmulPrecisionScope fp32(clip::Precision::fp32);
      loss = clip::contrastive_loss<E>(image_features.data(), text_features.data(), batch, params->logit_scale[0],
                                       d_image.data(), d_text.data())
                 .loss;
      d_logit_scale = clip::contrastive_loss<E>(golden.tensor("output.image_features").data(),
                                                golden.tensor("output.text_features").data(), batch,
                                                params->logit_scale[0], d_image.data(), d_text.data())
                          .d_logit_scale;
    }
    Net::Visual::backward(params->visual, image_acts, d_image.data(), grads->visual, batch);
    Net::Text::backward(*params, text_acts, d_text.data(), *grads, batch);
    grads->logit_scale[0] += d_logit_scale;
  }
};

// Each gradient tensor (the key-bias parts excepted: analytically zero, float32 noise in the
// reference) as pieces [i0, i1) of its values: the q and v thirds of in_proj_bias, else whole.
template <class Params, class F>
void for_each_gradient(Params& grads, F&& f) {
  clip::for_each_tensor(grads, [&](const std::string& name, const auto& g, clip::Role role) {
    if constexpr (!clip::is_counter_v<decltype(g)>) {
      if (role != clip::Role::parameter || name.ends_with("k_proj.bias")) return;
      if (name.ends_with("in_proj_bias")) {
        f(name + " (q)", g.data(), int64_t{0}, g.numel / 3);
        f(name + " (v)", g.data(), 2 * g.numel / 3, g.numel);
      } else {
        f(name, g.data(), int64_t{0}, g.numel);
      }
    }
  });
}

// The bf16 step's gradients against OpenAI's float32 ones. A gradient's error depends on how
// sensitive it is to perturbations of the forward pass, which differs widely between models:
// train-mode BatchNorm over a batch of 4 (rn_tiny: 16 values per channel in its last stage)
// amplifies them, so that rounding the input images alone to bf16 (everything else fp32) moves
// rn_tiny's stem gradients by ~30%. The bound takes that measured sensitivity s (relative L2 of
// the same tensor with only the towers' inputs rounded: images and token embeddings) into
// account: ||g - ref|| / ||ref|| <= 8 u + 3 s.
template <class Cfg>
void check_training_step(const char* weights_file, const char* grad_file) {
  auto weights_path = clip::test::golden_file(weights_file);
  auto grad_path = clip::test::golden_file(grad_file);
  if (!weights_path || !grad_path) return;
  const clip::SafeTensors weights = clip::SafeTensors::open(*weights_path);
  const clip::SafeTensors golden = clip::SafeTensors::open(*grad_path);
  const TrainingStep<Cfg> bf16(weights, golden, clip::Precision::bf16, false);
  const TrainingStep<Cfg> rounded_inputs(weights, golden, clip::Precision::fp32, true);

  const double ref_loss = golden.tensor("output.loss").values[0];
  BOOST_TEST_MESSAGE(grad_file << ": loss " << bf16.loss << ", reference " << ref_loss);
  BOOST_TEST(std::abs(bf16.loss - ref_loss) <= loss_relative * std::abs(ref_loss));

  std::vector<const float*> sensitivity;
  for_each_gradient(*rounded_inputs.grads, [&](const std::string&, const float* g, int64_t i0, int64_t) {
    sensitivity.push_back(g + i0);
  });
  double worst = 0, worst_s = 0;
  size_t compared = 0;
  for_each_gradient(*bf16.grads, [&](const std::string& name, const float* g, int64_t i0, int64_t i1) {
    const clip::Tensor ref = golden.tensor("grad." + name.substr(0, name.find(' ')));
    BOOST_REQUIRE(compared < sensitivity.size());
    const double l2 = clip::test::relative_l2(g + i0, ref.data() + i0, i1 - i0);
    const double s = clip::test::relative_l2(sensitivity[compared++], ref.data() + i0, i1 - i0);
    BOOST_TEST(l2 <= grad_relative_l2 + 3 * s, name << ": relative L2 " << l2 << ", sensitivity " << s);
    if (l2 > worst) worst = l2, worst_s = s;
  });
  BOOST_TEST(compared == sensitivity.size());
  BOOST_TEST(compared > 20u);
  BOOST_TEST_MESSAGE(grad_file << ": " << compared << " gradients, largest relative L2 " << worst << " ("
                               << worst / u << " u; its sensitivity to rounded inputs " << worst_s << ")");
}

// A bf16 Trainer step: the loss of the golden batch within the loss bound, fp32 checkpoints, and
// an exact resume: two steps in one run equal one step, a checkpoint, a fresh trainer loaded from
// it, and one more step, bit for bit.
void check_trainer_resumes_exactly() {
  auto weights_path = clip::test::golden_file("vit_tiny.safetensors");
  auto grad_path = clip::test::golden_file("vit_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  using Params = clip::Clip<ViTTiny>::Params;
  const clip::SafeTensors golden = clip::SafeTensors::open(*grad_path);
  const clip::Tensor images = golden.tensor("input.image");
  const std::vector<int64_t> ids = golden.integers("input.text");
  const std::vector<int32_t> tokens(ids.begin(), ids.end());
  clip::TrainOptions options;
  options.batch = images.shape[0];
  options.adam = {1e-3f, 0.9f, 0.98f, 1e-6f, 0.2f};
  auto fresh = [&] {
    auto p = std::make_unique<Params>();
    clip::load_state_dict(*p, clip::SafeTensors::open(*weights_path), clip::Extra::allow);
    return p;
  };

  auto straight = fresh();
  clip::Trainer<ViTTiny> a(*straight, options, clip::Precision::bf16);
  BOOST_TEST((a.precision() == clip::Precision::bf16));
  const double first_loss = a.step(images.data(), tokens.data()).loss;
  const double ref_loss = golden.tensor("output.loss").values[0];
  BOOST_TEST_MESSAGE("bf16 Trainer: loss " << first_loss << ", reference " << ref_loss);
  BOOST_TEST(std::abs(first_loss - ref_loss) <= loss_relative * std::abs(ref_loss));
  a.step(images.data(), tokens.data());

  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("clip_bf16_resume_" + std::to_string(::getpid()) + ".safetensors");
  {
    auto first = fresh();
    clip::Trainer<ViTTiny> b(*first, options, clip::Precision::bf16);
    b.step(images.data(), tokens.data());
    clip::CheckpointInfo info;
    info.variant = ViTTiny::name;
    info.step = 1;
    clip::save_checkpoint(path, *first, b.optimizer(), info);
  }
  const clip::SafeTensors file = clip::SafeTensors::open(path);
  for (const auto& e : file.entries()) BOOST_TEST((e.dtype == clip::DType::F32), e.name << " is not stored in fp32");
  auto resumed = std::make_unique<Params>();
  clip::Trainer<ViTTiny> c(*resumed, options, clip::Precision::bf16);
  clip::load_checkpoint(path, *resumed, c.optimizer(), ViTTiny::name);
  std::filesystem::remove(path);
  c.step(images.data(), tokens.data());
  int64_t differing = 0;
  clip::for_each_tensor(*straight, [&](const std::string& name, const auto& t, clip::Role) {
    if constexpr (!clip::is_counter_v<decltype(t)>) {
      const float* other = nullptr;
      clip::for_each_tensor(*resumed, [&](const std::string& n, const auto& u, clip::Role) {
        if constexpr (!clip::is_counter_v<decltype(u)>)
          if (n == name) other = u.data();
      });
      BOOST_REQUIRE(other);
      for (int64_t i = 0; i < t.numel; ++i) differing += t.data()[i] != other[i];
    }
  });
  BOOST_TEST(differing == 0);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(bf16_models)

BOOST_AUTO_TEST_CASE(vit_tiny_bf16_trainer_step_and_exact_resume) { check_trainer_resumes_exactly(); }

BOOST_AUTO_TEST_CASE(vit_tiny_bf16_features_match_openai_fp32) { check_inference<ViTTiny>("vit_tiny.safetensors"); }
BOOST_AUTO_TEST_CASE(rn_tiny_bf16_features_match_openai_fp32) { check_inference<RNTiny>("rn_tiny.safetensors"); }

BOOST_AUTO_TEST_CASE(vit_tiny_bf16_training_step_gradients_match_openai) {
  check_training_step<ViTTiny>("vit_tiny.safetensors", "vit_tiny_grad.safetensors");
}
BOOST_AUTO_TEST_CASE(rn_tiny_bf16_training_step_gradients_match_openai) {
  check_training_step<RNTiny>("rn_tiny.safetensors", "rn_tiny_grad.safetensors");
}

BOOST_AUTO_TEST_SUITE_END()
