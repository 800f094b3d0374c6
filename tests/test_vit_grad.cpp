// One training step's gradients of the tiny vision-transformer CLIP against OpenAI's float32
// run (golden/vit_tiny_grad, MANIFEST section C): train-mode features, the contrastive loss,
// and d loss / d param for every parameter through both towers' backward passes.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clip/clip.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"
#include "numeric.hpp"

namespace {

using clip::test::ViTTiny;
using Model = clip::Clip<ViTTiny>;

// MANIFEST's suggested tolerances: forward outputs 1e-5, gradients 1e-4 (max |got - ref| /
// max |ref| per tensor); key biases have an analytically zero gradient (float32 noise in the
// reference), compared with an absolute bound.
constexpr double forward_tolerance = 1e-5;
constexpr double grad_tolerance = 1e-4;
constexpr double key_bias_bound = 1e-6;

using clip::test::max_relative;  // max |got - ref| / max |ref|

}  // namespace

BOOST_AUTO_TEST_CASE(vit_tiny_gradients_match_openai_training_step) {
  auto weights_path = clip::test::golden_file("vit_tiny.safetensors");
  auto grad_path = clip::test::golden_file("vit_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  const clip::SafeTensors golden = clip::SafeTensors::open(*grad_path);

  auto params = std::make_unique<Model::Params>();
  auto grads = std::make_unique<Model::Params>();
  clip::load_state_dict(*params, clip::SafeTensors::open(*weights_path), clip::Extra::allow);
  clip::zero(*grads);
  constexpr int E = Model::E;

  const clip::Tensor images = golden.tensor("input.image");            // [4, 3, 32, 32]
  const std::vector<int64_t> tokens = golden.integers("input.text");   // [4, 77]
  const int64_t batch = images.shape[0];
  BOOST_REQUIRE_EQUAL(static_cast<int64_t>(tokens.size()), batch * Model::T);

  // Train-mode forward of both towers.
  Model::Visual::TrainActs image_acts(batch);
  Model::Text::TrainActs text_acts(batch);
  std::vector<float> image_features(batch * E), text_features(batch * E);
  Model::Visual::forward_train(params->visual, image_acts, images.data(), image_features.data(), batch);
  Model::Text::forward_train(*params, text_acts, tokens.data(), text_features.data(), batch);
  BOOST_TEST_MESSAGE("text positions run: " << text_acts.tokens << " of " << Model::T);

  const clip::Tensor ref_image = golden.tensor("output.image_features");
  const clip::Tensor ref_text = golden.tensor("output.text_features");
  const double image_err = max_relative(image_features.data(), ref_image.data(), batch * E);
  const double text_err = max_relative(text_features.data(), ref_text.data(), batch * E);
  BOOST_TEST_MESSAGE("output.image_features: " << image_err << ", output.text_features: " << text_err);
  BOOST_TEST(image_err <= forward_tolerance);
  BOOST_TEST(text_err <= forward_tolerance);

  // The loss and its feature gradients, then both backward passes.
  std::vector<float> d_image(batch * E), d_text(batch * E);
  const clip::ContrastiveLoss loss = clip::contrastive_loss<E>(image_features.data(), text_features.data(), batch,
                                                               params->logit_scale[0], d_image.data(), d_text.data());
  const double ref_loss = golden.tensor("output.loss").values[0];
  BOOST_TEST_MESSAGE("loss " << loss.loss << ", reference " << ref_loss);
  BOOST_TEST(std::abs(loss.loss - ref_loss) <= 1e-5 * std::abs(ref_loss));
  Model::Visual::backward(params->visual, image_acts, d_image.data(), grads->visual, batch);
  Model::Text::backward(*params, text_acts, d_text.data(), *grads, batch);
  grads->logit_scale[0] += loss.d_logit_scale;

  // Every gradient, by name.
  int compared = 0;
  double worst = 0;
  clip::for_each_tensor(*grads, [&](const std::string& name, const auto& g, clip::Role) {
    const clip::Tensor ref = golden.tensor("grad." + name);
    BOOST_TEST_REQUIRE(ref.numel() == g.numel, name);
    const float* got = g.data();
    ++compared;
    if (name.ends_with("in_proj_bias")) {  // q | k | v: the key third is zero up to rounding
      const int64_t third = g.numel / 3;
      double key = 0;
      for (int64_t i = third; i < 2 * third; ++i) key = std::max(key, std::abs(double(got[i]) - ref.values[i]));
      const double q = max_relative(got, ref.data(), third);
      const double v = max_relative(got + 2 * third, ref.data() + 2 * third, third);
      BOOST_TEST_MESSAGE("  grad." << name << ": q " << q << ", v " << v << ", k max |got - ref| " << key);
      BOOST_TEST(std::max(q, v) <= grad_tolerance, name);
      BOOST_TEST(key <= key_bias_bound, name);
      worst = std::max({worst, q, v});
      return;
    }
    const double err = max_relative(got, ref.data(), g.numel);
    BOOST_TEST_MESSAGE("  grad." << name << ": " << err);
    BOOST_TEST(err <= grad_tolerance, name);
    worst = std::max(worst, err);
  });
  BOOST_TEST(compared == 62);
  BOOST_TEST_MESSAGE("largest gradient error: " << worst);
}
