// A split of frozen features with their class labels: what the probes fit and score, and what
// the feature cache stores (`features` [N, D] F32, `labels` [N] I64).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

struct LabeledFeatures {
  Tensor features;              // [N, D]
  std::vector<int64_t> labels;  // [N], in [0, classes)

  int64_t rows() const { return features.shape.empty() ? 0 : features.shape[0]; }
  int64_t dim() const { return features.shape.size() == 2 ? features.shape[1] : 0; }
  const float* row(int64_t i) const { return features.data() + i * dim(); }

  // The rows `indices`, in that order.
  LabeledFeatures select(std::span<const int64_t> indices) const {
    LabeledFeatures out{Tensor({static_cast<int64_t>(indices.size()), dim()}), {}};
    for (size_t i = 0; i < indices.size(); ++i) {
      std::copy(row(indices[i]), row(indices[i]) + dim(), out.features.data() + i * dim());
      out.labels.push_back(labels[indices[i]]);
    }
    return out;
  }
};

// Checks shapes and labels; `what` names the source (a file, a split) in the message.
inline void check_labeled_features(const LabeledFeatures& f, int64_t classes, const std::string& what) {
  CLIP_CHECK(f.features.shape.size() == 2, what, ": features must be [N, D], not ", shape_string(f.features.shape));
  CLIP_CHECK(static_cast<int64_t>(f.labels.size()) == f.rows(), what, ": ", f.rows(), " feature rows but ",
             f.labels.size(), " labels");
  for (size_t i = 0; i < f.labels.size(); ++i)
    CLIP_CHECK(f.labels[i] >= 0 && f.labels[i] < classes, what, ": row ", i, " has label ", f.labels[i],
               ", outside the ", classes, " classes [0, ", classes, ")");
}

// Train and validation (or train and test) must describe the same feature space.
inline void check_same_dim(const LabeledFeatures& a, const std::string& a_name, const LabeledFeatures& b,
                           const std::string& b_name) {
  CLIP_CHECK(a.dim() == b.dim(), "feature dimensions disagree: ", a_name, " has ", a.dim(), " but ", b_name, " has ",
             b.dim());
}

// Both splits' rows, a's first.
inline LabeledFeatures concatenate(const LabeledFeatures& a, const LabeledFeatures& b) {
  CLIP_CHECK(a.dim() == b.dim(), "cannot join features of dimensions ", a.dim(), " and ", b.dim());
  LabeledFeatures out{Tensor({a.rows() + b.rows(), a.dim()}), a.labels};
  std::copy(a.features.values.begin(), a.features.values.end(), out.features.values.begin());
  std::copy(b.features.values.begin(), b.features.values.end(), out.features.values.begin() + a.features.numel());
  out.labels.insert(out.labels.end(), b.labels.begin(), b.labels.end());
  return out;
}

// The highest label + 1 over the splits (the class count when no class list is given).
inline int64_t class_count(std::initializer_list<const LabeledFeatures*> splits) {
  int64_t classes = 0;
  for (const LabeledFeatures* s : splits)
    if (s)
      for (int64_t l : s->labels) classes = std::max(classes, l + 1);
  return classes;
}

}  // namespace clip
