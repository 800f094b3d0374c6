// CLIP's training objective (the paper's Figure 3): a symmetric cross-entropy over the batch's
// image-text similarities, with the learned temperature.
//
//   a_i = img_i / |img_i|,  b_j = txt_j / |txt_j|               (no epsilon, as OpenAI's forward)
//   L[i, j] = exp(logit_scale) a_i . b_j                          logits_per_image [B, B]
//   loss = (CE(L rows, diagonal) + CE(L columns, diagonal)) / 2   each CE a mean over B
//
// Backward, with G = dloss/dL = (softmax_rows(L) - I + softmax_cols(L) - I) / (2B):
//   dA = s G B,  dB = s G^T A,  d logit_scale = sum_ij G[i, j] L[i, j],
//   d img_i = (dA_i - a_i (a_i . dA_i)) / |img_i|   (and the same for text).
// Softmax statistics are kept in double: the loss must match the reference to 1e-5 for any batch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/ops/gemm.hpp"

namespace clip {

struct ContrastiveLoss {
  double loss = 0;           // the mean of the two cross-entropies
  float d_logit_scale = 0;   // d loss / d logit_scale
};

// Loss of `batch` matching image-text pairs (row i of each is a pair), and the gradients of the
// unnormalised features (assigned). `logits_per_image` [B, B] receives L when not null.
template <int E>
ContrastiveLoss contrastive_loss(const float* image_features,  // [B, E]
                                 const float* text_features,   // [B, E]
                                 int64_t batch, float logit_scale,
                                 float* d_image,                // [B, E]
                                 float* d_text,                 // [B, E]
                                 float* logits_per_image = nullptr) {  // [B, B] or null
  static_assert(E > 0, "the embedding needs a positive size");
  CLIP_CHECK(batch > 0, "the contrastive loss needs at least one pair, got ", batch);
  const int64_t B = batch;
  std::vector<float> a(image_features, image_features + B * E), b(text_features, text_features + B * E);
  std::vector<float> a_norm(B), b_norm(B);
  auto normalize = [](std::vector<float>& rows, std::vector<float>& norms, const char* what) {
    for (size_t i = 0; i < norms.size(); ++i) {
      float* row = rows.data() + i * E;
      double sq = 0;
      for (int j = 0; j < E; ++j) sq += double(row[j]) * row[j];
      norms[i] = static_cast<float>(std::sqrt(sq));
      CLIP_CHECK(norms[i] > 0 && std::isfinite(norms[i]), "the ", what, " features of pair ", i,
                 " have norm ", norms[i], ": the contrastive loss needs finite non-zero features");
      for (int j = 0; j < E; ++j) row[j] /= norms[i];
    }
  };
  normalize(a, a_norm, "image");
  normalize(b, b_norm, "text");

  const float s = std::exp(logit_scale);
  std::vector<float> logits(static_cast<size_t>(B * B));  // [B, B] = s A B^T
  gemm_nt(B, B, E, a.data(), E, b.data(), E, logits.data(), B, /*accumulate=*/false);
  for (float& v : logits) v *= s;
  if (logits_per_image) std::copy(logits.begin(), logits.end(), logits_per_image);

  // G = (P_rows - I + P_cols - I) / (2B), built in place of a [B, B] buffer.
  std::vector<float> g(static_cast<size_t>(B * B), 0.0f);
  double loss = 0;
  for (int64_t i = 0; i < B; ++i) {  // rows: image i against every text
    const float* row = logits.data() + i * B;
    const double top = *std::max_element(row, row + B);
    double sum = 0;
    for (int64_t j = 0; j < B; ++j) sum += std::exp(double(row[j]) - top);
    loss += top + std::log(sum) - row[i];
    for (int64_t j = 0; j < B; ++j) g[i * B + j] += static_cast<float>(std::exp(double(row[j]) - top) / sum);
  }
  for (int64_t j = 0; j < B; ++j) {  // columns: text j against every image
    double top = -INFINITY;
    for (int64_t i = 0; i < B; ++i) top = std::max(top, double(logits[i * B + j]));
    double sum = 0;
    for (int64_t i = 0; i < B; ++i) sum += std::exp(double(logits[i * B + j]) - top);
    loss += top + std::log(sum) - logits[j * B + j];
    for (int64_t i = 0; i < B; ++i) g[i * B + j] += static_cast<float>(std::exp(double(logits[i * B + j]) - top) / sum);
  }
  const float inv = 1.0f / static_cast<float>(2 * B);
  double d_scale = 0;
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < B; ++j) {
      float& gij = g[i * B + j];
      gij = (gij - (i == j ? 2.0f : 0.0f)) * inv;
      d_scale += double(gij) * logits[i * B + j];
    }

  // dA = s G B, dB = s G^T A, then through the normalisation.
  std::vector<float> da(static_cast<size_t>(B * E)), db(static_cast<size_t>(B * E));
  gemm_nn(B, E, B, g.data(), B, b.data(), E, da.data(), E, /*accumulate=*/false);
  gemm_tn(B, E, B, g.data(), B, a.data(), E, db.data(), E, /*accumulate=*/false);
  auto through_norm = [&](const std::vector<float>& unit, const std::vector<float>& norms, std::vector<float>& d,
                          float* out) {
    for (int64_t i = 0; i < B; ++i) {
      const float* u = unit.data() + i * E;
      const float* du = d.data() + i * E;
      double dot = 0;
      for (int j = 0; j < E; ++j) dot += double(u[j]) * du[j] * s;
      for (int j = 0; j < E; ++j) out[i * E + j] = static_cast<float>((s * du[j] - u[j] * dot) / norms[i]);
    }
  };
  through_norm(a, a_norm, da, d_image);
  through_norm(b, b_norm, db, d_text);
  return {loss / double(2 * B), static_cast<float>(d_scale)};
}

}  // namespace clip
