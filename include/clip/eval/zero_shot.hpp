// Zero-shot classification as the CLIP paper evaluates it (section 3.1.4) and OpenAI's
// Prompt_Engineering_for_ImageNet notebook computes it:
//
//   class embedding  = normalize(mean over templates t of normalize(encode_text(t.format(class))))
//   probabilities    = softmax(scale * normalize(image_features) . class_embeddings^T)
//
// The mean of the *normalised* prompt embeddings, renormalised, is the paper's prompt
// ensembling. `scale` is the model's own exp(logit_scale), the temperature its forward uses:
// 100 for OpenAI's released weights, the fixed 100 the notebook writes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

// Divides each row of a [N, E] tensor by its L2 norm, without an epsilon, as OpenAI's
// `x / x.norm(dim=-1, keepdim=True)` (a zero row becomes NaN there too).
inline void l2_normalize_rows(float* rows, int64_t n, int64_t dim) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = rows + i * dim;
    double sq = 0.0;
    for (int64_t j = 0; j < dim; ++j) sq += double(row[j]) * row[j];
    const float norm = static_cast<float>(std::sqrt(sq));
    for (int64_t j = 0; j < dim; ++j) row[j] /= norm;
  }
}
inline void l2_normalize_rows(Tensor& t) {
  CLIP_CHECK(t.shape.size() == 2, "l2_normalize_rows needs a [N, E] tensor, not ", shape_string(t.shape));
  l2_normalize_rows(t.data(), t.shape[0], t.shape[1]);
}

// The template with every "{}" replaced by the class name: Python's template.format(name) for
// the CLIP templates, which hold no other braces.
inline std::string fill_template(std::string_view prompt_template, std::string_view class_name) {
  std::string out;
  for (size_t i = 0; i < prompt_template.size(); ++i) {
    if (prompt_template.compare(i, 2, "{}") == 0) {
      out += class_name;
      ++i;
    } else {
      out += prompt_template[i];
    }
  }
  return out;
}

struct ClassScore {
  int64_t label;       // index into the class list
  float probability;
};

// The k most probable classes of one row, best first; equal probabilities keep class order.
inline std::vector<ClassScore> top_k(std::span<const float> probabilities, int64_t k) {
  std::vector<int64_t> order(probabilities.size());
  std::iota(order.begin(), order.end(), 0);
  k = std::clamp<int64_t>(k, 0, static_cast<int64_t>(order.size()));
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return probabilities[a] > probabilities[b] || (probabilities[a] == probabilities[b] && a < b);
  });
  std::vector<ClassScore> out;
  for (int64_t i = 0; i < k; ++i) out.push_back({order[i], probabilities[order[i]]});
  return out;
}

class ZeroShotClassifier {
 public:
  // From the text features of every prompt, class-major: rows [c*T, (c+1)*T) of the [C*T, E]
  // tensor are class c's T templates.
  ZeroShotClassifier(const Tensor& prompt_features, int64_t templates, float scale) : scale_(scale) {
    CLIP_CHECK(templates > 0 && prompt_features.shape.size() == 2 && prompt_features.shape[0] > 0 &&
                   prompt_features.shape[0] % templates == 0,
               "prompt features must be [classes * ", templates, ", E], not ", shape_string(prompt_features.shape));
    const int64_t classes = prompt_features.shape[0] / templates, dim = prompt_features.shape[1];
    weights_ = Tensor({classes, dim});
    for (int64_t c = 0; c < classes; ++c)
      ensemble(prompt_features.data() + c * templates * dim, templates, dim, weights_.data() + c * dim);
  }

  // Encodes every class name in every template with `model` (a clip::Model: encode_text of token
  // rows, params().logit_scale) and `tokenizer` (tokenize(text, context_length) -> ids), one
  // class at a time so memory stays at one class's prompts. `progress(c)` is told after class c.
  template <class Model, class Tokenizer>
  static ZeroShotClassifier build(const Model& model, const Tokenizer& tokenizer,
                                  std::span<const std::string> class_names,
                                  std::span<const std::string> templates,
                                  const std::function<void(int64_t)>& progress = {}) {
    CLIP_CHECK(!class_names.empty(), "zero-shot classification needs at least one class");
    CLIP_CHECK(!templates.empty(), "zero-shot classification needs at least one prompt template");
    for (const std::string& t : templates)
      CLIP_CHECK(t.find("{}") != std::string::npos, "the prompt template '", t, "' has no {} for the class name");
    const int64_t classes = static_cast<int64_t>(class_names.size()), count = static_cast<int64_t>(templates.size());
    ZeroShotClassifier out;
    out.scale_ = std::exp(model.params().logit_scale[0]);
    for (int64_t c = 0; c < classes; ++c) {
      std::vector<int> ids;
      for (const std::string& t : templates) {
        const std::vector<int> row = tokenizer.tokenize(fill_template(t, class_names[c]), Model::context_length);
        ids.insert(ids.end(), row.begin(), row.end());
      }
      const Tensor features = model.encode_text(ids);  // [T, E]
      if (c == 0) out.weights_ = Tensor({classes, features.shape[1]});
      ensemble(features.data(), count, features.shape[1], out.weights_.data() + c * features.shape[1]);
      if (progress) progress(c);
    }
    return out;
  }

  int64_t classes() const { return weights_.shape[0]; }
  const Tensor& weights() const { return weights_; }  // [C, E], unit rows
  float scale() const { return scale_; }

  // [B, C]: scale * cos(image b, class c).
  Tensor logits(const Tensor& image_features) const {
    const int64_t dim = weights_.shape[1];
    CLIP_CHECK(image_features.shape.size() == 2 && image_features.shape[1] == dim,
               "image features must have shape [B, ", dim, "], not ", shape_string(image_features.shape));
    Tensor images = image_features;
    l2_normalize_rows(images);
    const int64_t batch = images.shape[0];
    Tensor out({batch, classes()});
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t c = 0; c < classes(); ++c) {
        const float* x = images.data() + b * dim;
        const float* w = weights_.data() + c * dim;
        double dot = 0.0;
        for (int64_t j = 0; j < dim; ++j) dot += double(x[j]) * w[j];
        out.values[b * classes() + c] = static_cast<float>(scale_ * dot);
      }
    return out;
  }

  // [B, C]: the softmax of each row of logits().
  Tensor probabilities(const Tensor& image_features) const {
    Tensor p = logits(image_features);
    for (int64_t b = 0; b < p.shape[0]; ++b) {
      float* row = p.data() + b * classes();
      const float top = *std::max_element(row, row + classes());  // subtracted so exp cannot overflow
      double sum = 0.0;
      for (int64_t c = 0; c < classes(); ++c) sum += std::exp(double(row[c]) - top);
      for (int64_t c = 0; c < classes(); ++c) row[c] = static_cast<float>(std::exp(double(row[c]) - top) / sum);
    }
    return p;
  }

  // One class's embedding from its prompts' features [T, E]: the renormalised mean of the
  // normalised rows (in double, so the order of the templates does not matter).
  static void ensemble(const float* prompts, int64_t templates, int64_t dim, float* out) {
    std::vector<double> mean(dim, 0.0);
    for (int64_t t = 0; t < templates; ++t) {
      const float* row = prompts + t * dim;
      double sq = 0.0;
      for (int64_t j = 0; j < dim; ++j) sq += double(row[j]) * row[j];
      const double norm = std::sqrt(sq);
      for (int64_t j = 0; j < dim; ++j) mean[j] += row[j] / norm;
    }
    double sq = 0.0;
    for (double v : mean) sq += v * v;  // the 1/T of the mean cancels in the renormalisation
    const double norm = std::sqrt(sq);
    for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<float>(mean[j] / norm);
  }

 private:
  ZeroShotClassifier() = default;
  Tensor weights_;
  float scale_ = 1.0f;
};

}  // namespace clip
