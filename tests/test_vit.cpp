// The tiny vision-transformer CLIP against OpenAI's own float32 outputs (golden/vit_tiny):
// every trace and every output within 1e-5 relative error, weights through the public loader.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "clip/clip.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "golden.hpp"
#include "golden_variants.hpp"

namespace {

// The golden model (MANIFEST section A), defined once for the tests in golden_variants.hpp.
using clip::test::ViTTiny;

constexpr double tolerance = 1e-5;

// ||got - ref|| / ||ref||, in double.
double relative_error(const clip::Tensor& got, const clip::Tensor& ref) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double d = double(got.values[i]) - ref.values[i];
    num += d * d;
    den += double(ref.values[i]) * ref.values[i];
  }
  return std::sqrt(num / den);
}

void check_close(const std::string& name, const clip::Tensor& got, const clip::Tensor& ref) {
  BOOST_TEST_REQUIRE(clip::shape_string(got.shape) == clip::shape_string(ref.shape), name);
  const double err = relative_error(got, ref);
  BOOST_TEST_MESSAGE("  " << name << " " << clip::shape_string(ref.shape) << "  relative error " << err);
  BOOST_TEST(err <= tolerance, name << ": relative error " << err << " exceeds " << tolerance);
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

BOOST_AUTO_TEST_CASE(vit_tiny_matches_openai_reference) {
  auto path = clip::test::golden_file("vit_tiny.safetensors");
  if (!path) return;
  const clip::SafeTensors file = clip::SafeTensors::open(*path);

  clip::Model<ViTTiny> model;
  model.load(file, clip::Extra::allow);  // the file also holds inputs, outputs and traces

  // The model's tensors are exactly the file's 62 state_dict entries, in the file's order.
  std::vector<std::string> model_names, file_names;
  clip::for_each_tensor(model.params(), [&](const std::string& n, const auto&, clip::Role) { model_names.push_back(n); });
  for (const std::string& n : file.names())
    if (!starts_with(n, "input.") && !starts_with(n, "output.") && !starts_with(n, "trace.")) file_names.push_back(n);
  BOOST_TEST(model_names.size() == 62u);
  BOOST_TEST(model_names == file_names, boost::test_tools::per_element());
  BOOST_TEST(clip::parameter_count(model.params()) == clip::dims<ViTTiny>::parameters);

  const clip::Tensor images = file.tensor("input.image");             // [2, 3, 32, 32]
  const std::vector<int64_t> tokens = file.integers("input.text");    // [3, 77]
  clip::Trace trace;
  const clip::Tensor image_features = model.encode_image(images, &trace);
  const clip::Tensor text_features = model.encode_text(tokens, &trace);
  const clip::Logits logits = model.logits(image_features, text_features);

  BOOST_TEST_MESSAGE("vit_tiny, relative error ||out - ref|| / ||ref|| per tensor:");
  std::set<std::string> expected_traces;
  for (const std::string& n : file.names()) {
    if (!starts_with(n, "trace.")) continue;
    const std::string key = n.substr(6);
    expected_traces.insert(key);
    BOOST_TEST_REQUIRE(trace.count(key) == 1u, "the forward did not record " << key);
    check_close(n, trace.at(key), file.tensor(n));
  }
  std::set<std::string> recorded;
  for (const auto& [k, v] : trace) recorded.insert(k);
  BOOST_TEST(recorded == expected_traces, boost::test_tools::per_element());
  BOOST_TEST(expected_traces.size() == 10u);

  check_close("output.image_features", image_features, file.tensor("output.image_features"));
  check_close("output.text_features", text_features, file.tensor("output.text_features"));
  check_close("output.logits_per_image", logits.per_image, file.tensor("output.logits_per_image"));
  check_close("output.logits_per_text", logits.per_text, file.tensor("output.logits_per_text"));

  // The float-tensor form of the token ids gives the same features.
  const clip::Tensor again = model.encode_text(file.tensor("input.text"));
  BOOST_TEST(again.values == model.encode_text(tokens).values);
}

BOOST_AUTO_TEST_CASE(text_forward_runs_only_the_positions_it_needs) {
  auto path = clip::test::golden_file("vit_tiny.safetensors");
  if (!path) return;
  const clip::SafeTensors file = clip::SafeTensors::open(*path);
  clip::Model<ViTTiny> model(*path, clip::Extra::allow);
  using Text = clip::TextTransformer<ViTTiny>;
  constexpr int T = ViTTiny::context_length;

  const std::vector<int64_t> tokens = file.integers("input.text");
  const int64_t batch = static_cast<int64_t>(tokens.size()) / T;
  const int64_t needed = Text::positions_needed(tokens.data(), batch);
  BOOST_TEST_MESSAGE("golden captions need " << needed << " of " << T << " positions");
  BOOST_TEST(needed < T);

  // A trace forces all 77 positions, as the reference runs them; without one, only `needed` run.
  // Equal up to float rounding, not bit for bit: Eigen's GEMM chooses its cache blocking (and so
  // the order of some additions) from the matrix sizes, which the row count changes.
  clip::Trace trace;
  const clip::Tensor full = model.encode_text(tokens, &trace);
  const clip::Tensor truncated = model.encode_text(tokens);
  double max_diff = 0;
  for (int64_t i = 0; i < full.numel(); ++i) max_diff = std::max<double>(max_diff, std::abs(full.values[i] - truncated.values[i]));
  BOOST_TEST_MESSAGE("  all positions vs truncated: max |difference| " << max_diff << ", relative error "
                                                                       << relative_error(truncated, full));
  BOOST_TEST(relative_error(truncated, full) <= 1e-6);
  check_close("output.text_features (truncated run)", truncated, file.tensor("output.text_features"));

  // Each caption alone (each with its own, shorter, truncation) gives its row of the batch.
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> row(tokens.begin() + b * T, tokens.begin() + (b + 1) * T);
    const clip::Tensor one = model.encode_text(row);
    clip::Tensor ref({1, ViTTiny::embed_dim}, full.data() + b * ViTTiny::embed_dim);
    BOOST_TEST(relative_error(one, ref) <= 1e-6);
  }

  // A padding-only caption (all ids 0) pools at position 0 and needs one position.
  std::vector<int32_t> blank(T, 0);
  BOOST_TEST(Text::positions_needed(blank.data(), 1) == 1);
  BOOST_CHECK_NO_THROW(model.encode_text(blank));
}

BOOST_AUTO_TEST_CASE(model_rejects_bad_inputs_with_a_sentence) {
  clip::Model<ViTTiny> model;
  BOOST_CHECK_THROW(model.encode_image(clip::Tensor({1, 3, 16, 16})), clip::Error);
  BOOST_CHECK_THROW(model.encode_text(std::vector<int32_t>(76, 0)), clip::Error);
  std::vector<int32_t> out_of_range(77, 0);
  out_of_range[3] = ViTTiny::vocab_size;
  BOOST_CHECK_EXCEPTION(model.encode_text(out_of_range), clip::Error, [](const clip::Error& e) {
    return std::string(e.what()).find("outside the vocabulary") != std::string::npos;
  });
}
