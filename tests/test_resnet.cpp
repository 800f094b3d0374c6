// The modified ResNet: its ops against direct loops, its parameter names against OpenAI's
// state_dicts, and the tiny model against OpenAI's own float32 run (golden rn_tiny).
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/blocks/attention_pool.hpp"
#include "clip/blocks/bottleneck.hpp"
#include "clip/config/variants.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/modified_resnet.hpp"
#include "clip/ops/batchnorm.hpp"
#include "clip/ops/conv2d.hpp"
#include "clip/ops/pool.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"

#if __has_include("clip/models/clip_model.hpp")
#include "clip/models/clip_model.hpp"
#define CLIP_TEST_HAS_CLIP_MODEL 1
#endif

using namespace clip;

namespace {

// The tiny ResNet CLIP of the golden files (MANIFEST section B), from golden_variants.hpp.
using test::RNTiny;

std::vector<float> random_values(int64_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// ||got - ref|| / ||ref||
double relative_error(const float* got, const float* ref, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

// max|got - ref| / max|ref| (the metric of the golden MANIFEST)
double max_relative_error(const float* got, const float* ref, int64_t n) {
  double diff = 0, top = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double(got[i]) - ref[i]));
    top = std::max(top, std::abs(double(ref[i])));
  }
  return diff / top;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(double(a[i]) - b[i]));
  return d;
}

// Converts NCHW to channel-major CNHW.
std::vector<float> to_cnhw(const std::vector<float>& x, int64_t batch, int64_t channels, int64_t hw) {
  std::vector<float> y(x.size());
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < hw; ++i) y[(c * batch + n) * hw + i] = x[(n * channels + c) * hw + i];
  return y;
}

// Runs Conv2d on random data in NCHW -> NCHW, NCHW -> CNHW and CNHW -> CNHW and compares each
// with the direct loop.
template <int Cin, int Cout, int K, int Stride, int Pad>
void check_conv(int64_t batch, int h, int w) {
  using C = Conv2d<Cin, Cout, K, Stride, Pad>;
  const int ho = C::out_size(h), wo = C::out_size(w);
  const int64_t in_hw = int64_t{h} * w, out_hw = int64_t{ho} * wo;
  std::vector<float> x = random_values(batch * Cin * in_hw, 1 + Cin + 7 * h);
  std::vector<float> weight = random_values(int64_t{Cout} * Cin * K * K, 2 + Cout + 3 * w);
  std::vector<float> ref(batch * Cout * out_hw), got(ref.size()), col;
  conv2d_reference<Cin, Cout, K, Stride, Pad>(x.data(), Planes::nchw(Cin, h, w), weight.data(), ref.data(),
                                              Planes::nchw(Cout, ho, wo), batch, h, w);
  std::ostringstream what;
  what << "conv " << Cin << "->" << Cout << " k" << K << " s" << Stride << " p" << Pad << " on " << batch << "x" << h
       << "x" << w;

  C::forward(x.data(), Planes::nchw(Cin, h, w), weight.data(), got.data(), Planes::nchw(Cout, ho, wo), batch, h, w, col);
  BOOST_TEST(max_abs_diff(got, ref) < 1e-4, what.str() << " NCHW->NCHW: " << max_abs_diff(got, ref));

  const std::vector<float> ref_cnhw = to_cnhw(ref, batch, Cout, out_hw);
  C::forward(x.data(), Planes::nchw(Cin, h, w), weight.data(), got.data(), Planes::cnhw(batch, ho, wo), batch, h, w, col);
  BOOST_TEST(max_abs_diff(got, ref_cnhw) < 1e-4, what.str() << " NCHW->CNHW: " << max_abs_diff(got, ref_cnhw));

  const std::vector<float> x_cnhw = to_cnhw(x, batch, Cin, in_hw);
  std::fill(got.begin(), got.end(), 0.0f);
  C::forward(x_cnhw.data(), Planes::cnhw(batch, h, w), weight.data(), got.data(), Planes::cnhw(batch, ho, wo), batch, h,
             w, col);
  BOOST_TEST(max_abs_diff(got, ref_cnhw) < 1e-4, what.str() << " CNHW->CNHW: " << max_abs_diff(got, ref_cnhw));
}

// Compares every name and shape `visit` gives under "visual." with the variant's visual entries
// in variants.json, in order, and checks the parameter and buffer counts.
template <class Cfg>
void check_visual_names(const json::Value& variants) {
  using Model = ModifiedResNet<Cfg>;
  const json::Value& v = variants["variants"][Cfg::name];
  std::vector<std::tuple<std::string, Shape, std::string>> expected;
  for (const json::Value& e : v["state_dict"].as_array()) {
    const json::Array& entry = e.as_array();
    const std::string& name = entry[0].as_string();
    if (name.rfind("visual.", 0) != 0) continue;
    Shape shape;
    for (const json::Value& d : entry[1].as_array()) shape.push_back(d.as_int());
    expected.emplace_back(name, shape, entry[3].as_string());
  }
  auto params = std::make_unique<typename Model::Params>();
  std::vector<std::tuple<std::string, Shape, std::string>> got;
  int64_t parameters = 0, buffers = 0;
  for_each_tensor(
      *params,
      [&](const std::string& name, const auto& t, Role role) {
        using T = std::remove_cvref_t<decltype(t)>;
        got.emplace_back(name, Shape(T::shape.begin(), T::shape.end()), role == Role::parameter ? "parameter" : "buffer");
        (role == Role::parameter ? parameters : buffers) += T::numel;
        if (is_counter_v<T>) BOOST_TEST((role == Role::buffer));
      },
      "visual.");
  BOOST_TEST_INFO(Cfg::name);
  BOOST_TEST(got.size() == expected.size());
  for (size_t i = 0; i < std::min(got.size(), expected.size()); ++i) {
    BOOST_TEST_INFO(Cfg::name << " entry " << i << ": " << std::get<0>(expected[i]));
    BOOST_TEST(std::get<0>(got[i]) == std::get<0>(expected[i]));
    BOOST_TEST(std::get<1>(got[i]) == std::get<1>(expected[i]), shape_string(std::get<1>(got[i])) << " vs "
                                                                     << shape_string(std::get<1>(expected[i])));
    BOOST_TEST(std::get<2>(got[i]) == std::get<2>(expected[i]));
  }
  BOOST_TEST(parameters == v["num_parameters_visual"].as_int());
  BOOST_TEST(parameters == vision_dims<Cfg>::parameters);
  BOOST_TEST(buffers == v["num_buffer_elements"].as_int());
  BOOST_TEST(buffers == vision_dims<Cfg>::buffer_elements);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(resnet)

BOOST_AUTO_TEST_CASE(conv2d_matches_a_direct_loop) {
  check_conv<3, 5, 3, 2, 1>(2, 9, 11);   // the stem's strided conv, odd sizes
  check_conv<3, 5, 3, 2, 1>(1, 8, 8);
  check_conv<4, 6, 3, 1, 1>(3, 7, 5);    // bottleneck conv2
  check_conv<4, 6, 1, 1, 0>(3, 6, 5);    // direct 1x1 (no im2col)
  check_conv<2, 3, 5, 3, 2>(2, 10, 13);  // kernel 5, stride 3, padding 2
  check_conv<2, 3, 3, 2, 1>(2, 1, 1);    // one-pixel input: only the centre tap lands
  check_conv<3, 2, 1, 2, 0>(2, 7, 6);    // strided 1x1 goes through im2col
  check_conv<2, 4, 3, 1, 1>(3, 64, 50);  // 9600 columns: more than one im2col block
}

BOOST_AUTO_TEST_CASE(batchnorm_eval_is_the_affine_of_the_running_statistics) {
  constexpr int C = 5;
  const int64_t batch = 2, hw = 6;
  BatchNorm2d<C>::Params p;
  for (int c = 0; c < C; ++c) {
    p.weight[c] = 0.5f + 0.25f * c;
    p.bias[c] = 0.1f * c - 0.2f;
    p.running_mean[c] = 0.3f - 0.1f * c;
    p.running_var[c] = 0.5f + c;
  }
  const std::vector<float> x = random_values(batch * C * hw, 11, -3, 3), r = random_values(batch * C * hw, 12);
  auto expect = [&](int64_t n, int c, int64_t i, bool relu, bool residual) {
    const int64_t k = (n * C + c) * hw + i;
    double v = (x[k] - double(p.running_mean[c])) / std::sqrt(double(p.running_var[c]) + 1e-5) * p.weight[c] + p.bias[c];
    if (residual) v += r[k];
    return relu ? std::max(v, 0.0) : v;
  };
  for (bool relu : {false, true})
    for (bool residual : {false, true}) {
      std::vector<float> y(x.size());
      const Planes l = Planes::nchw(C, 2, 3);
      BatchNorm2d<C>::forward_eval(p, x.data(), l, y.data(), l, batch, hw, relu ? Activation::relu : Activation::none,
                                   residual ? r.data() : nullptr, l);
      double err = 0;
      for (int64_t n = 0; n < batch; ++n)
        for (int c = 0; c < C; ++c)
          for (int64_t i = 0; i < hw; ++i) err = std::max(err, std::abs(y[(n * C + c) * hw + i] - expect(n, c, i, relu, residual)));
      BOOST_TEST(err < 1e-5, "relu " << relu << " residual " << residual << ": " << err);
    }
  // In place and channel-major give the same values.
  std::vector<float> y = to_cnhw(x, batch, C, hw);
  const Planes l = Planes::cnhw(batch, 2, 3);
  BatchNorm2d<C>::forward_eval(p, y.data(), l, y.data(), l, batch, hw, Activation::relu);
  double err = 0;
  for (int64_t n = 0; n < batch; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t i = 0; i < hw; ++i) err = std::max(err, std::abs(y[(c * batch + n) * hw + i] - expect(n, c, i, true, false)));
  BOOST_TEST(err < 1e-5);
}

BOOST_AUTO_TEST_CASE(batchnorm_train_normalises_with_batch_statistics_and_updates_running_ones) {
  constexpr int C = 3;
  const int64_t batch = 4, hw = 5, count = batch * hw;
  BatchNorm2d<C>::Params p;
  for (int c = 0; c < C; ++c) {
    p.weight[c] = 1.0f + 0.5f * c;
    p.bias[c] = -0.25f * c;
    p.running_mean[c] = 0.1f * c;
    p.running_var[c] = 1.0f + c;
  }
  p.num_batches_tracked.value = 7;
  const std::vector<float> x = random_values(batch * C * hw, 21, -2, 4);
  std::vector<float> y(x.size());
  BatchNorm2d<C>::Saved saved;
  const BatchNorm2d<C>::Params before = p;
  const Planes l = Planes::nchw(C, 1, 5);
  BatchNorm2d<C>::forward_train(p, x.data(), l, y.data(), l, batch, hw, Activation::none, nullptr, l, &saved);
  BOOST_TEST(p.num_batches_tracked.value == 8);
  for (int c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) sum += x[(n * C + c) * hw + i];
    const double mean = sum / count;
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) sq += std::pow(x[(n * C + c) * hw + i] - mean, 2);
    const double var = sq / count, unbiased = sq / (count - 1);
    BOOST_TEST(std::abs(saved.mean[c] - mean) < 1e-6);
    BOOST_TEST(std::abs(saved.invstd[c] - 1 / std::sqrt(var + 1e-5)) < 1e-5);
    BOOST_TEST(std::abs(p.running_mean[c] - (0.9 * before.running_mean[c] + 0.1 * mean)) < 1e-6);
    BOOST_TEST(std::abs(p.running_var[c] - (0.9 * before.running_var[c] + 0.1 * unbiased)) < 1e-5);
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t k = (n * C + c) * hw + i;
        BOOST_TEST(std::abs(y[k] - ((x[k] - mean) / std::sqrt(var + 1e-5) * p.weight[c] + p.bias[c])) < 1e-5);
      }
  }
}

BOOST_AUTO_TEST_CASE(avgpool_averages_disjoint_windows) {
  const int64_t batch = 2, channels = 3;
  const int h = 7, w = 9;  // floor mode: the last row and column of a 2x2 pool are dropped
  const std::vector<float> x = random_values(batch * channels * h * w, 31);
  for (int k : {1, 2, 3}) {
    const int ho = h / k, wo = w / k;
    std::vector<float> y(batch * channels * ho * wo);
    const Planes xl = Planes::nchw(channels, h, w), yl = Planes::nchw(channels, ho, wo);
    if (k == 1) AvgPool2d<1>::forward(x.data(), xl, y.data(), yl, batch, channels, h, w);
    if (k == 2) AvgPool2d<2>::forward(x.data(), xl, y.data(), yl, batch, channels, h, w);
    if (k == 3) AvgPool2d<3>::forward(x.data(), xl, y.data(), yl, batch, channels, h, w);
    double err = 0;
    for (int64_t p = 0; p < batch * channels; ++p)
      for (int oy = 0; oy < ho; ++oy)
        for (int ox = 0; ox < wo; ++ox) {
          double s = 0;
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) s += x[p * h * w + (oy * k + ky) * w + ox * k + kx];
          err = std::max(err, std::abs(y[p * ho * wo + oy * wo + ox] - s / (k * k)));
        }
    BOOST_TEST(err < 1e-6, "AvgPool2d(" << k << "): " << err);
  }
}

BOOST_AUTO_TEST_CASE(visual_names_and_shapes_match_openai_state_dicts) {
  auto path = test::golden_file("variants.json");
  if (!path) return;
  std::ifstream in(*path);
  std::stringstream text;
  text << in.rdbuf();
  const json::Value variants = json::parse(text.str());
  check_visual_names<variants::RN50>(variants);
  check_visual_names<variants::RN101>(variants);
  check_visual_names<variants::RN50x4>(variants);
  check_visual_names<variants::RN50x16>(variants);
  check_visual_names<variants::RN50x64>(variants);
}

BOOST_AUTO_TEST_CASE(rn_tiny_matches_openai_traces_and_features) {
  auto path = test::golden_file("rn_tiny.safetensors");
  if (!path) return;
  using Model = ModifiedResNet<RNTiny>;
  const SafeTensors file = SafeTensors::open(*path);
  auto params = std::make_unique<Model::Params>();
  load_state_dict(*params, file, Extra::allow, "visual.");
  BOOST_TEST(params->layer1.first.bn1.num_batches_tracked.value == 1);

  const Tensor image = file.tensor("input.image");  // [2, 3, 64, 64]
  const int64_t batch = image.shape[0];
  BOOST_REQUIRE(image.shape == (Shape{batch, 3, 64, 64}));
  std::vector<float> features(batch * RNTiny::embed_dim);
  Trace trace;
  Model::forward(*params, image.data(), features.data(), batch, &trace);

  auto compare = [&](const std::string& key, const Tensor& got) {
    const Tensor ref = file.tensor(key);
    BOOST_TEST_INFO(key);
    BOOST_REQUIRE(got.shape == ref.shape);
    const double rel = relative_error(got.data(), ref.data(), ref.numel());
    BOOST_TEST_MESSAGE(key << " " << shape_string(ref.shape) << ": ||d||/||ref|| = " << rel
                           << ", max|d|/max|ref| = " << max_relative_error(got.data(), ref.data(), ref.numel()));
    BOOST_TEST(rel <= 1e-5);
  };
  for (const char* name : {"visual.stem", "visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4",
                           "visual.attnpool"}) {
    BOOST_REQUIRE(trace.count(name));
    compare(std::string("trace.") + name, trace.at(name));
  }
  compare("output.image_features", Tensor({batch, RNTiny::embed_dim}, features.data()));

  // One image alone gives what it gave in the batch (per-image and batched GEMMs agree).
  std::vector<float> single(RNTiny::embed_dim);
  Model::forward(*params, image.data() + 3 * 64 * 64, single.data(), 1);
  BOOST_TEST(relative_error(single.data(), features.data() + RNTiny::embed_dim, RNTiny::embed_dim) <= 1e-6);
}


#ifdef CLIP_TEST_HAS_CLIP_MODEL
BOOST_AUTO_TEST_CASE(rn_tiny_clip_model_matches_openai_features_and_logits) {
  auto path = test::golden_file("rn_tiny.safetensors");
  if (!path) return;
  using Net = Clip<RNTiny>;
  static_assert(std::is_same_v<Net::Visual, ModifiedResNet<RNTiny>>, "a ResNet variant must get the modified ResNet");
  const SafeTensors file = SafeTensors::open(*path);
  auto params = std::make_unique<Net::Params>();
  load_state_dict(*params, file, Extra::allow);

  const Tensor image = file.tensor("input.image");
  const std::vector<int64_t> text = file.integers("input.text");
  const int64_t images = image.shape[0], texts = static_cast<int64_t>(text.size()) / RNTiny::context_length;
  Tensor image_features({images, RNTiny::embed_dim}), text_features({texts, RNTiny::embed_dim});
  Tensor per_image({images, texts}), per_text({texts, images});
  Net::encode_image(*params, image.data(), image_features.data(), images);
  Net::encode_text(*params, text.data(), text_features.data(), texts);
  Net::logits(*params, image_features.data(), images, text_features.data(), texts, per_image.data(), per_text.data());

  for (const auto& [key, got] : {std::pair<const char*, const Tensor*>{"output.image_features", &image_features},
                                 {"output.text_features", &text_features},
                                 {"output.logits_per_image", &per_image},
                                 {"output.logits_per_text", &per_text}}) {
    const Tensor ref = file.tensor(key);
    BOOST_TEST_INFO(key);
    BOOST_REQUIRE(got->shape == ref.shape);
    const double rel = relative_error(got->data(), ref.data(), ref.numel());
    BOOST_TEST_MESSAGE("Clip<RN-tiny> " << key << " " << shape_string(ref.shape) << ": ||d||/||ref|| = " << rel
                                        << ", max|d|/max|ref| = " << max_relative_error(got->data(), ref.data(), ref.numel()));
    BOOST_TEST(rel <= 1e-5);
  }
}
#endif

BOOST_AUTO_TEST_SUITE_END()
