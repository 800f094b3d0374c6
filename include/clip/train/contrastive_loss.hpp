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
//
// Data parallel (open_clip's --local-loss --gather-with-grad): a rank that owns rows
// [first, first + n) of the global batch computes, from every rank's features, its rows' logits
// against all B columns in both directions ([n, B] each, never [B, B]): image i's CE over the
// texts for its rows i, text j's CE over the images for its rows j. Its share of the loss is the
// sum of those 2n terms / (2B), and its share of G gives gradients for all B rows of both feature
// matrices; summed over ranks (reduce-scatter to the owners), the shares are the one-process
// loss and gradients. The one-process loss is the case n = B of the same code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/ops/gemm.hpp"

namespace clip {

struct ContrastiveLoss {
  double loss = 0;           // the mean of the two cross-entropies (a rank's share: its terms / 2B)
  float d_logit_scale = 0;   // d loss / d logit_scale (a rank's share)
};

// A rank's share of the loss of `batch` matching image-text pairs (row i of each is a pair),
// for its rows [first, first + rows), and its share of the gradients of every row's unnormalised
// features (assigned, [B, E]; zero where its terms do not reach). `logits_per_image` [rows, B]
// receives its rows of L when not null.
template <int E>
ContrastiveLoss contrastive_loss_rows(const float* image_features,  // [B, E] every rank's
                                      const float* text_features,   // [B, E]
                                      int64_t batch, int64_t first, int64_t rows, float logit_scale,
                                      float* d_image,                // [B, E]
                                      float* d_text,                 // [B, E]
                                      float* logits_per_image = nullptr) {  // [rows, B] or null
  static_assert(E > 0, "the embedding needs a positive size");
  CLIP_CHECK(batch > 0, "the contrastive loss needs at least one pair, got ", batch);
  CLIP_CHECK(first >= 0 && rows > 0 && first + rows <= batch, "the rows [", first, ", ", first + rows,
             ") are not a slice of a batch of ", batch);
  const int64_t B = batch, n = rows;
  std::vector<float> a(image_features, image_features + B * E), b(text_features, text_features + B * E);
  std::vector<float> a_norm(B), b_norm(B);
  auto normalize = [](std::vector<float>& unit, std::vector<float>& norms, const char* what) {
    for (size_t i = 0; i < norms.size(); ++i) {
      float* row = unit.data() + i * E;
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
  const float* a_own = a.data() + first * E;  // [n, E]
  const float* b_own = b.data() + first * E;  // [n, E]

  // Lr [n, B] = s A_own B^T: the rows of L this rank owns; Lc [n, B] = s B_own A^T: its columns
  // of L, transposed (Lc[j, i] = L[i, first + j]).
  const float s = std::exp(logit_scale);
  std::vector<float> lr(static_cast<size_t>(n * B)), lc(static_cast<size_t>(n * B));
  gemm_nt(n, B, E, a_own, E, b.data(), E, lr.data(), B, /*accumulate=*/false);
  gemm_nt(n, B, E, b_own, E, a.data(), E, lc.data(), B, /*accumulate=*/false);
  for (float& v : lr) v *= s;
  for (float& v : lc) v *= s;
  if (logits_per_image) std::copy(lr.begin(), lr.end(), logits_per_image);

  // Gr = (softmax of each Lr row - its one-hot) / 2B, Gc the same for Lc, in place; each row's
  // target is the diagonal element L[first + i, first + i].
  const float inv = 1.0f / static_cast<float>(2 * B);
  double loss = 0, d_scale = 0;
  auto cross_entropy = [&](std::vector<float>& logits) {
    for (int64_t i = 0; i < n; ++i) {
      float* row = logits.data() + i * B;
      const double top = *std::max_element(row, row + B);
      double sum = 0;
      for (int64_t j = 0; j < B; ++j) sum += std::exp(double(row[j]) - top);
      loss += top + std::log(sum) - row[first + i];
      for (int64_t j = 0; j < B; ++j) {
        const float l = row[j];
        const float g = (static_cast<float>(std::exp(double(l) - top) / sum) - (j == first + i ? 1.0f : 0.0f)) * inv;
        d_scale += double(g) * l;
        row[j] = g;
      }
    }
  };
  cross_entropy(lr);
  cross_entropy(lc);
  const std::vector<float>& gr = lr;  // [n, B]
  const std::vector<float>& gc = lc;  // [n, B]

  // dA = G B and dB = G^T A (before the factor s), with G = Gr in rows [first, first + n) plus
  // Gc^T in those columns:
  //   dA_own += Gr B,  dA += Gc^T B_own,  dB += Gr^T A_own,  dB_own += Gc A.
  std::vector<float> da(static_cast<size_t>(B * E), 0.0f), db(static_cast<size_t>(B * E), 0.0f);
  gemm_tn(B, E, n, gc.data(), B, b_own, E, da.data(), E, /*accumulate=*/false);
  gemm_nn(n, E, B, gr.data(), B, b.data(), E, da.data() + first * E, E, /*accumulate=*/true);
  gemm_tn(B, E, n, gr.data(), B, a_own, E, db.data(), E, /*accumulate=*/false);
  gemm_nn(n, E, B, gc.data(), B, a.data(), E, db.data() + first * E, E, /*accumulate=*/true);
  // Through the normalisation: d x_i = (s du_i - u_i (u_i . s du_i)) / |x_i|, row by row.
  auto through_norm = [&](const std::vector<float>& unit, const std::vector<float>& norms, const std::vector<float>& d,
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

// Loss of `batch` matching image-text pairs (row i of each is a pair), and the gradients of the
// unnormalised features (assigned). `logits_per_image` [B, B] receives L when not null.
template <int E>
ContrastiveLoss contrastive_loss(const float* image_features,  // [B, E]
                                 const float* text_features,   // [B, E]
                                 int64_t batch, float logit_scale,
                                 float* d_image,                // [B, E]
                                 float* d_text,                 // [B, E]
                                 float* logits_per_image = nullptr) {  // [B, B] or null
  return contrastive_loss_rows<E>(image_features, text_features, batch, 0, batch, logit_scale, d_image, d_text,
                                  logits_per_image);
}

}  // namespace clip
