// CLIP_benchmark's metrics (clip/eval/metrics.hpp) against eval_metrics.safetensors: retrieval
// recall@1/5/10 both ways, acc1, acc5 and mean per-class recall, exact.
#include <boost/test/unit_test.hpp>

#include <string>
#include <vector>

#include "clip/eval/metrics.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "golden.hpp"
#include "messages.hpp"

BOOST_AUTO_TEST_CASE(classification_metrics_match_clip_benchmark) {
  const auto path = clip::test::golden_file("eval_metrics.safetensors");
  if (!path) return;
  const clip::SafeTensors f = clip::SafeTensors::open(*path);
  const clip::json::Value want = clip::json::parse(f.metadata().at("metrics"));
  const clip::Tensor logits = f.tensor("classification.logits");
  const std::vector<int64_t> labels = f.integers("classification.labels");
  const clip::ClassificationMetrics m =
      clip::classification_metrics(std::span<const float>(logits.values), std::span<const int64_t>(labels), 10);
  BOOST_TEST(m.acc1 == want["acc1"].as_number());
  BOOST_TEST(m.acc5 == want["acc5"].as_number());
  BOOST_TEST(std::abs(m.mean_per_class_recall - want["mean_per_class_recall"].as_number()) <= 1e-15);
}

BOOST_AUTO_TEST_CASE(retrieval_recall_matches_clip_benchmark) {
  const auto path = clip::test::golden_file("eval_metrics.safetensors");
  if (!path) return;
  const clip::SafeTensors f = clip::SafeTensors::open(*path);
  const clip::json::Value want = clip::json::parse(f.metadata().at("metrics"));
  const clip::Tensor images = f.tensor("retrieval.image_features"), texts = f.tensor("retrieval.text_features");
  const std::vector<int64_t> index = f.integers("retrieval.text_image_index");
  const int64_t I = images.shape[0], T = texts.shape[0];
  const std::vector<float> scores = clip::retrieval_scores(texts, images);
  const std::vector<int64_t> ks{1, 5, 10};
  const std::vector<clip::RetrievalRecall> r = clip::retrieval_recall(scores, T, I, index, ks);
  BOOST_REQUIRE_EQUAL(r.size(), 3u);
  for (const clip::RetrievalRecall& x : r) {
    const std::string k = std::to_string(x.k);
    // Both are ratios of small integers: exact as doubles when computed the same way.
    BOOST_TEST(std::abs(x.image_retrieval - want["image_retrieval_recall@" + k].as_number()) <= 1e-15, "k " << k);
    BOOST_TEST(std::abs(x.text_retrieval - want["text_retrieval_recall@" + k].as_number()) <= 1e-15, "k " << k);
  }
}

BOOST_AUTO_TEST_CASE(bad_labels_and_captions_are_named) {
  const std::vector<float> scores{1, 0, 0, 1};
  const std::vector<int64_t> labels{0, 2};
  const std::string m = clip::test::message_of(
      [&] { clip::classification_metrics(std::span<const float>(scores), std::span<const int64_t>(labels), 2); });
  BOOST_TEST(m.find("row 1 has label 2") != std::string::npos, m);
  const std::vector<int64_t> index{0, 0}, ks{1};
  const std::string r = clip::test::message_of([&] { clip::retrieval_recall(scores, 2, 2, index, ks); });
  BOOST_TEST(r.find("image 1 has no caption") != std::string::npos, r);
}
