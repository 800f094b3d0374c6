// The result metrics as LAION's CLIP_benchmark defines them:
//
//   acc1, acc5              the fraction of rows whose label is among the 1 (5) highest scores
//   mean_per_class_recall   balanced accuracy: the mean, over the classes that occur, of the
//                           fraction of that class's rows predicted as it (top-1)
//   image_retrieval_recall@k  each caption queries the images (scores = text . image): a hit
//                           when its own image is among the k highest
//   text_retrieval_recall@k   each image queries the captions: a hit when any of its captions
//                           is among the k highest
//
// "Among the k highest" counts the strictly higher scores (fewer than k), so ties go in the
// query's favour; CLIP_benchmark's topk is the same where there are no ties.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

// Whether the label's score is among the k highest of its row.
template <class T>
bool label_in_top_k(std::span<const T> scores, int64_t label, int64_t k) {
  int64_t higher = 0;
  for (T s : scores) higher += s > scores[label];
  return higher < k;
}

struct ClassificationMetrics {
  double acc1 = 0, acc5 = 0, mean_per_class_recall = 0;
};

// From scores [N, K] (logits or probabilities) and labels [N] in [0, K).
template <class T>
ClassificationMetrics classification_metrics(std::span<const T> scores, std::span<const int64_t> labels,
                                             int64_t classes) {
  const int64_t n = static_cast<int64_t>(labels.size());
  CLIP_CHECK(n > 0, "no rows to score");
  CLIP_CHECK(static_cast<int64_t>(scores.size()) == n * classes, "scores hold ", scores.size(), " values, not ", n,
             " rows x ", classes, " classes");
  std::vector<int64_t> count(classes), correct(classes);
  int64_t top1 = 0, top5 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    CLIP_CHECK(y >= 0 && y < classes, "row ", i, " has label ", y, ", outside the ", classes, " classes");
    const std::span<const T> row = scores.subspan(i * classes, classes);
    const bool hit1 = label_in_top_k(row, y, 1);
    top1 += hit1;
    top5 += label_in_top_k(row, y, 5);
    ++count[y];
    correct[y] += hit1;
  }
  ClassificationMetrics m;
  m.acc1 = double(top1) / double(n);
  m.acc5 = double(top5) / double(n);
  int64_t present = 0;
  for (int64_t c = 0; c < classes; ++c)
    if (count[c]) m.mean_per_class_recall += double(correct[c]) / double(count[c]), ++present;
  m.mean_per_class_recall /= double(present);
  return m;
}

struct RetrievalRecall {
  int64_t k;
  double image_retrieval = 0;  // image_retrieval_recall@k
  double text_retrieval = 0;   // text_retrieval_recall@k
};

// scores [T, I] = text [T, E] . image [I, E]^T (L2-normalised features: cosine similarities),
// one float32 GEMM.
inline std::vector<float> retrieval_scores(const Tensor& texts, const Tensor& images) {
  CLIP_CHECK(texts.shape.size() == 2 && images.shape.size() == 2 && texts.shape[1] == images.shape[1],
             "retrieval needs text [T, E] and image [I, E] features, not ", shape_string(texts.shape), " and ",
             shape_string(images.shape));
  const int64_t T = texts.shape[0], I = images.shape[0], E = texts.shape[1];
  std::vector<float> scores(T * I);
  gemm_nt(T, I, E, texts.data(), E, images.data(), E, scores.data(), I, false);
  return scores;
}

// scores [T, I] = text . image (T captions, I images); caption_image [T] the image of each
// caption. Every image needs at least one caption.
inline std::vector<RetrievalRecall> retrieval_recall(std::span<const float> scores, int64_t texts, int64_t images,
                                                     std::span<const int64_t> caption_image,
                                                     std::span<const int64_t> ks) {
  CLIP_CHECK(texts > 0 && images > 0, "retrieval needs captions and images");
  CLIP_CHECK(static_cast<int64_t>(scores.size()) == texts * images && static_cast<int64_t>(caption_image.size()) == texts,
             "retrieval scores must be [captions, images] with one image index per caption");
  std::vector<char> has_caption(images, 0);
  for (int64_t t = 0; t < texts; ++t) {
    CLIP_CHECK(caption_image[t] >= 0 && caption_image[t] < images, "caption ", t, " names image ", caption_image[t],
               ", not one of the ", images);
    has_caption[caption_image[t]] = 1;
  }
  for (int64_t i = 0; i < images; ++i) CLIP_CHECK(has_caption[i], "image ", i, " has no caption");
  // Rank of the caption's own image among the images (strictly higher scores).
  std::vector<int64_t> image_rank(texts, 0), text_rank(images, 0);
  for (int64_t t = 0; t < texts; ++t) {
    const float* row = scores.data() + t * images;
    for (int64_t i = 0; i < images; ++i) image_rank[t] += row[i] > row[caption_image[t]];
  }
  // Rank of an image's best caption among all captions.
  for (int64_t i = 0; i < images; ++i) {
    float best = -INFINITY;
    for (int64_t t = 0; t < texts; ++t)
      if (caption_image[t] == i) best = std::max(best, scores[t * images + i]);
    for (int64_t t = 0; t < texts; ++t) text_rank[i] += scores[t * images + i] > best;
  }
  std::vector<RetrievalRecall> out;
  for (int64_t k : ks) {
    RetrievalRecall r{k};
    for (int64_t rank : image_rank) r.image_retrieval += rank < k;
    for (int64_t rank : text_rank) r.text_retrieval += rank < k;
    r.image_retrieval /= double(texts);
    r.text_retrieval /= double(images);
    out.push_back(r);
  }
  return out;
}

}  // namespace clip
