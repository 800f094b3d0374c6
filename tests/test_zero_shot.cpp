// Zero-shot classification (clip/eval/zero_shot.hpp): prompt ensembling and the class
// probabilities against a hand computation on 2-dimensional features, through a stand-in model
// and tokenizer so every prompt's embedding is known.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "clip/eval/zero_shot.hpp"

namespace {

// Each prompt becomes one token id; the model maps that id to a fixed feature row.
struct FakeTokenizer {
  std::map<std::string, int> ids;
  mutable std::vector<std::string> seen;
  std::vector<int> tokenize(const std::string& text, int context_length) const {
    seen.push_back(text);
    std::vector<int> row(context_length, 0);
    row[1] = ids.at(text);
    return row;
  }
};

struct FakeModel {
  static constexpr int context_length = 4;
  struct Params {
    float logit_scale[1] = {std::log(100.0f)};
  } p;
  std::map<int, std::vector<float>> features;
  const Params& params() const { return p; }
  clip::Tensor encode_text(const std::vector<int>& ids) const {
    const int64_t rows = static_cast<int64_t>(ids.size()) / context_length;
    clip::Tensor out({rows, 2});
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float>& f = features.at(ids[r * context_length + 1]);
      out.values[r * 2] = f[0];
      out.values[r * 2 + 1] = f[1];
    }
    return out;
  }
};

// cat's prompts: (3, 4) and (0, 2), normalised (0.6, 0.8) and (0, 1); their mean direction
// (0.6, 1.8) normalised is (1, 3) / sqrt(10). dog's: (1, 0) and (-1, 1), at 0 and 135 degrees;
// the normalised mean bisects them, at 67.5 degrees. The raw mean of cat's prompts, (1.5, 3),
// would point elsewhere: ensembling must normalise before averaging.
const double kCat[2] = {1 / std::sqrt(10.0), 3 / std::sqrt(10.0)};
const double kDog[2] = {0.38268343236508984, 0.9238795325112867};  // cos, sin 67.5 degrees

FakeModel model() {
  FakeModel m;
  m.features = {{1, {3, 4}}, {2, {0, 2}}, {3, {1, 0}}, {4, {-1, 1}}};
  return m;
}

FakeTokenizer tokenizer() { return FakeTokenizer{{{"a cat.", 1}, {"the cat!", 2}, {"a dog.", 3}, {"the dog!", 4}}, {}}; }

}  // namespace

BOOST_AUTO_TEST_SUITE(zero_shot)

BOOST_AUTO_TEST_CASE(fill_template_replaces_every_placeholder) {
  BOOST_TEST(clip::fill_template("a photo of a {}.", "cat") == "a photo of a cat.");
  BOOST_TEST(clip::fill_template("{} and {}", "dog") == "dog and dog");
  BOOST_TEST(clip::fill_template("no placeholder", "dog") == "no placeholder");
}

BOOST_AUTO_TEST_CASE(class_embeddings_are_renormalised_means_of_normalised_prompts) {
  const FakeModel m = model();
  const FakeTokenizer tok = tokenizer();
  const std::vector<std::string> classes{"cat", "dog"}, templates{"a {}.", "the {}!"};
  std::vector<int64_t> progress;
  const clip::ZeroShotClassifier zs =
      clip::ZeroShotClassifier::build(m, tok, classes, templates, [&](int64_t c) { progress.push_back(c); });

  BOOST_TEST(tok.seen == (std::vector<std::string>{"a cat.", "the cat!", "a dog.", "the dog!"}),
             boost::test_tools::per_element());
  BOOST_TEST(progress == (std::vector<int64_t>{0, 1}), boost::test_tools::per_element());
  BOOST_TEST(zs.classes() == 2);
  BOOST_TEST(std::abs(zs.scale() - 100.0) < 1e-4);
  const clip::Tensor& w = zs.weights();
  BOOST_TEST_REQUIRE((w.shape == clip::Shape{2, 2}));
  BOOST_TEST(std::abs(w.values[0] - kCat[0]) < 1e-6);
  BOOST_TEST(std::abs(w.values[1] - kCat[1]) < 1e-6);
  BOOST_TEST(std::abs(w.values[2] - kDog[0]) < 1e-6);
  BOOST_TEST(std::abs(w.values[3] - kDog[1]) < 1e-6);

  // The same classifier from the prompts' features directly (class-major rows).
  const clip::Tensor prompts({4, 2}, std::vector<float>{3, 4, 0, 2, 1, 0, -1, 1}.data());
  const clip::ZeroShotClassifier direct(prompts, 2, 100.0f);
  for (int i = 0; i < 4; ++i) BOOST_TEST(direct.weights().values[i] == w.values[i]);
}

BOOST_AUTO_TEST_CASE(probabilities_are_softmax_of_scaled_cosines) {
  const FakeModel m = model();
  const clip::ZeroShotClassifier zs = clip::ZeroShotClassifier::build(
      m, tokenizer(), std::vector<std::string>{"cat", "dog"}, std::vector<std::string>{"a {}.", "the {}!"});
  // Image features (1, 0) and (0, 5): the length does not matter, only the direction.
  const clip::Tensor images({2, 2}, std::vector<float>{1, 0, 0, 5}.data());

  const clip::Tensor logits = zs.logits(images);
  BOOST_TEST(std::abs(logits.values[0] - 100 * kCat[0]) < 1e-4);
  BOOST_TEST(std::abs(logits.values[1] - 100 * kDog[0]) < 1e-4);
  BOOST_TEST(std::abs(logits.values[2] - 100 * kCat[1]) < 1e-4);
  BOOST_TEST(std::abs(logits.values[3] - 100 * kDog[1]) < 1e-4);

  // softmax(31.6228, 38.2683) and softmax(94.8683, 92.3880), by hand.
  const clip::Tensor p = zs.probabilities(images);
  BOOST_TEST(std::abs(p.values[0] - 0.0012980845) < 1e-6);
  BOOST_TEST(std::abs(p.values[1] - 0.9987019155) < 1e-6);
  BOOST_TEST(std::abs(p.values[2] - 0.9227546423) < 1e-5);
  BOOST_TEST(std::abs(p.values[3] - 0.0772453577) < 1e-5);
}

BOOST_AUTO_TEST_CASE(top_k_is_best_first_and_clamped) {
  const std::vector<float> p{0.1f, 0.4f, 0.1f, 0.3f, 0.1f};
  const std::vector<clip::ClassScore> top = clip::top_k(p, 3);
  BOOST_TEST_REQUIRE(top.size() == 3u);
  BOOST_TEST(top[0].label == 1);
  BOOST_TEST(top[1].label == 3);
  BOOST_TEST(top[2].label == 0);  // ties keep class order
  BOOST_TEST(top[0].probability == 0.4f);
  BOOST_TEST(clip::top_k(p, 10).size() == 5u);
}

BOOST_AUTO_TEST_CASE(templates_without_a_placeholder_are_refused) {
  const FakeModel m = model();
  BOOST_CHECK_THROW(clip::ZeroShotClassifier::build(m, tokenizer(), std::vector<std::string>{"cat"},
                                                    std::vector<std::string>{"a photo"}),
                    clip::Error);
  BOOST_CHECK_THROW(clip::ZeroShotClassifier::build(m, tokenizer(), std::vector<std::string>{},
                                                    std::vector<std::string>{"a {}."}),
                    clip::Error);
}

BOOST_AUTO_TEST_CASE(l2_normalize_rows_gives_unit_rows) {
  clip::Tensor t({2, 2}, std::vector<float>{3, 4, 0, -2}.data());
  clip::l2_normalize_rows(t);
  BOOST_TEST(t.values == (std::vector<float>{0.6f, 0.8f, 0.0f, -1.0f}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_SUITE_END()
