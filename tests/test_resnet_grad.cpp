// One training step of the tiny ResNet CLIP's image tower against OpenAI's float32 run
// (golden/rn_tiny_grad, MANIFEST section C): train-mode features and traces, the gradient of
// every visual parameter from the contrastive loss, and the BatchNorm running statistics the
// train-mode forward leaves behind.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/modified_resnet.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"
#include "numeric.hpp"

using namespace clip;

namespace {

using test::RNTiny;
using Model = ModifiedResNet<RNTiny>;

// The MANIFEST's tolerances: forward values 1e-5, gradients 1e-4 (max |got - ref| / max |ref|
// per tensor); k_proj.bias has an analytically zero gradient (float32 noise in the reference).
constexpr double forward_tolerance = 1e-5;
constexpr double grad_tolerance = 1e-4;
constexpr double key_bias_bound = 1e-6;
constexpr double running_tolerance = 1e-5;

using clip::test::max_abs;
using clip::test::max_relative;

// Runs the training step on fresh weights (with activation recomputation or not) and compares
// everything against the golden file.
void check_training_step(bool recompute) {
  BOOST_TEST_MESSAGE("recompute: " << recompute);
  auto weights_path = test::golden_file("rn_tiny.safetensors");
  auto grad_path = test::golden_file("rn_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  const SafeTensors weights = SafeTensors::open(*weights_path);
  const SafeTensors golden = SafeTensors::open(*grad_path);

  auto params = std::make_unique<Model::Params>();
  auto grads = std::make_unique<Model::Params>();
  load_state_dict(*params, weights, Extra::allow, "visual.");
  zero(*grads);
  constexpr int E = RNTiny::embed_dim;

  const Tensor images = golden.tensor("input.image");  // [4, 3, 64, 64]
  const int64_t batch = images.shape[0];
  BOOST_REQUIRE(images.shape == (Shape{batch, 3, 64, 64}));

  // Train-mode forward, in acts with room for more images than the batch.
  Model::TrainActs acts(batch + 2, recompute);
  std::vector<float> features(batch * E);
  Trace trace;
  Model::forward_train(*params, acts, images.data(), features.data(), batch, /*update_running_stats=*/true, &trace);
  const Tensor ref_features = golden.tensor("output.image_features");
  const double feature_err = max_relative(features.data(), ref_features.data(), batch * E);
  BOOST_TEST_MESSAGE("output.image_features: max|d|/max|ref| = " << feature_err);
  BOOST_TEST(feature_err <= forward_tolerance);
  for (const char* name : {"visual.stem", "visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4",
                           "visual.attnpool"}) {
    const std::string key = std::string("trace.") + name;
    if (!golden.contains(key)) continue;
    const Tensor ref = golden.tensor(key);
    BOOST_REQUIRE(trace.count(name));
    BOOST_REQUIRE(trace.at(name).shape == ref.shape);
    const double err = max_relative(trace.at(name).data(), ref.data(), ref.numel());
    BOOST_TEST_MESSAGE(key << ": max|d|/max|ref| = " << err);
    BOOST_TEST(err <= forward_tolerance, key << ": " << err);
  }

  // Running statistics after the train-mode forward.
  int compared = 0;
  for_each_tensor(
      *params,
      [&](const std::string& name, const auto& t, Role role) {
        if (role != Role::buffer) return;
        const std::string key = "after." + name;
        BOOST_REQUIRE_MESSAGE(golden.contains(key), key << " is missing from the golden file");
        if constexpr (is_counter_v<decltype(t)>) {
          BOOST_TEST(t.value == golden.integers(key).at(0), key);
        } else {
          const Tensor ref = golden.tensor(key);
          const double err = max_relative(t.data(), ref.data(), ref.numel());
          BOOST_TEST(err <= running_tolerance, key << ": " << err);
        }
        ++compared;
      },
      "visual.");
  BOOST_TEST(compared == 3 * 3 + 3 * (3 * 4 + 4));  // stem 3 BatchNorms, 4 blocks of 4, 3 buffers each

  // The loss's image-feature gradient, from the reference features (so the gradients below are
  // compared through backward alone), then backward.
  const Tensor ref_text = golden.tensor("output.text_features");
  const float logit_scale = weights.tensor("logit_scale").data()[0];
  std::vector<float> d_image(batch * E), d_text(batch * E);
  const ContrastiveLoss loss =
      contrastive_loss<E>(ref_features.data(), ref_text.data(), batch, logit_scale, d_image.data(), d_text.data());
  const double ref_loss = golden.tensor("output.loss").data()[0];
  BOOST_TEST(std::abs(loss.loss - ref_loss) <= 1e-5 * std::abs(ref_loss));
  Model::backward(*params, acts, d_image.data(), *grads, batch);

  int checked = 0;
  double worst = 0;
  std::string worst_name;
  for_each_tensor(
      *grads,
      [&](const std::string& name, const auto& t, Role role) {
        if constexpr (!is_counter_v<decltype(t)>) {
          if (role != Role::parameter) return;
          constexpr int64_t n = std::remove_cvref_t<decltype(t)>::numel;
          const std::string key = "grad." + name;
          BOOST_REQUIRE_MESSAGE(golden.contains(key), key << " is missing from the golden file");
          const Tensor ref = golden.tensor(key);
          BOOST_REQUIRE_EQUAL(ref.numel(), n);
          ++checked;
          if (name.ends_with("attnpool.k_proj.bias")) {
            const double top = max_abs(t.data(), n);
            BOOST_TEST_MESSAGE(key << ": max|got| = " << top << " (analytically zero; reference max "
                                   << max_abs(ref.data(), n) << ")");
            BOOST_TEST(top <= key_bias_bound, key << ": " << top);
            return;
          }
          const double err = max_relative(t.data(), ref.data(), n);
          BOOST_TEST_MESSAGE(key << ": max|d|/max|ref| = " << err);
          BOOST_TEST(err <= grad_tolerance, key << ": " << err);
          if (err > worst) worst = err, worst_name = key;
        }
      },
      "visual.");
  BOOST_TEST(checked == 3 * 3 + 4 * (3 * 3 + 3) + 9);  // stem, 4 blocks with downsample, attnpool
  BOOST_TEST_MESSAGE("worst gradient: " << worst_name << " " << worst);

  // BatchNorm buffers of grads are untouched by backward, and recomputing forward passes left
  // the model's running statistics as the one train-mode forward made them.
  BOOST_TEST(grads->bn1.num_batches_tracked.value == 0);
  BOOST_TEST(max_abs(grads->layer1.first.bn1.running_var.data(), 16) == 0.0);
  const int64_t ref_count = golden.integers("after.visual.layer2.0.bn2.num_batches_tracked").at(0);
  BOOST_TEST(params->layer2.first.bn2.num_batches_tracked.value == ref_count);
  const Tensor ref_var = golden.tensor("after.visual.layer3.0.bn1.running_var");
  const double var_err = max_relative(params->layer3.first.bn1.running_var.data(), ref_var.data(), ref_var.numel());
  BOOST_TEST(var_err <= running_tolerance);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(resnet_grad)

BOOST_AUTO_TEST_CASE(rn_tiny_image_gradients_match_openai_training_step) { check_training_step(false); }

// Activation checkpointing: only block outputs kept, each block's forward re-run before its
// backward; the same gradients.
BOOST_AUTO_TEST_CASE(rn_tiny_image_gradients_with_recomputation_match_openai_training_step) {
  check_training_step(true);
  BOOST_TEST(Model::TrainActs::floats_per_sample(true) < Model::TrainActs::floats_per_sample(false));
  BOOST_TEST_MESSAGE("RN-tiny floats per image: " << Model::TrainActs::floats_per_sample(false) << ", recomputing "
                                                  << Model::TrainActs::floats_per_sample(true));
}

BOOST_AUTO_TEST_CASE(rn_tiny_forward_train_can_leave_running_statistics_alone) {
  auto weights_path = test::golden_file("rn_tiny.safetensors");
  auto grad_path = test::golden_file("rn_tiny_grad.safetensors");
  if (!weights_path || !grad_path) return;
  auto params = std::make_unique<Model::Params>();
  load_state_dict(*params, SafeTensors::open(*weights_path), Extra::allow, "visual.");
  const auto before = std::make_unique<Model::Params>(*params);
  const Tensor images = SafeTensors::open(*grad_path).tensor("input.image");
  const int64_t batch = images.shape[0];

  Model::TrainActs acts(batch);
  std::vector<float> features(batch * RNTiny::embed_dim), again(features.size());
  Model::forward_train(*params, acts, images.data(), features.data(), batch, /*update_running_stats=*/false);
  // Every buffer (and parameter) as it was.
  std::vector<float> now, then;
  std::vector<int64_t> counters_now, counters_then;
  auto gather = [](const Model::Params& p, std::vector<float>& values, std::vector<int64_t>& counters) {
    for_each_tensor(p, [&](const std::string&, const auto& t, Role) {
      if constexpr (is_counter_v<decltype(t)>) counters.push_back(t.value);
      else values.insert(values.end(), t.data(), t.data() + std::remove_cvref_t<decltype(t)>::numel);
    });
  };
  gather(*params, now, counters_now);
  gather(*before, then, counters_then);
  BOOST_TEST((now == then));
  BOOST_TEST((counters_now == counters_then));
  // The same batch twice gives the same features (nothing carried over between steps).
  Model::forward_train(*params, acts, images.data(), again.data(), batch, false);
  BOOST_TEST(max_relative(again.data(), features.data(), again.size()) == 0.0);
  // A batch larger than the acts' capacity is refused.
  BOOST_CHECK_THROW(Model::forward_train(*params, acts, images.data(), again.data(), batch + 1, false), clip::Error);
}

BOOST_AUTO_TEST_SUITE_END()
