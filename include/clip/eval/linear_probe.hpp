// The linear probe of the CLIP paper (section 3.2, appendix A.3): multinomial logistic regression
// with L2 regularisation on frozen features, the optimum of scikit-learn's
// LogisticRegression(solver="lbfgs") objective for several classes
//
//   J(W, b) = sum_i CE(softmax(W x_i + b), y_i) + ||W||^2 / (2C)        W [K, D], b [K] unpenalised
//
// found by L-BFGS (lbfgs.hpp) on J / N, as scikit-learn scales it, so `tolerance` means what its
// `tol` means (max |gradient| of the mean objective).
//
// Speed and precision: the features are centred once (x - mean). The optimum W is unchanged (the
// shift moves into b, which is unpenalised: b = b_c - W mean), but logits no longer carry the large
// common offset of encoder features, so float32 products stay accurate and the problem is better
// conditioned. Each evaluation runs over blocks of 256 rows (a block of 512-dim features stays in
// L2 between its two products), split over the OpenMP threads:
//
//   logits^T [K, m] = W [K, D] X_c^T          gemm_nt, float32 (AVX-512)
//   softmax, loss, R = P - Y                  per row in double
//   grad W   [K, D] += R^T X_c                gemm_nn, float32 per block, summed in double
//
// The C sweep (MANIFEST section F, the paper's "parametric binary search" made exact): grid
// C = 10^(k/8), k = -48..48; evaluate k = -48, -32, ..., 48; then for s = 8, 4, 2, 1 evaluate
// best - s and best + s (inside the grid, not yet evaluated), best = the highest validation
// accuracy, ties to the smaller k; refit on train + validation at the chosen C. Each fit starts
// from the solution of the nearest C already fitted (the optimum is unique in W, so this only
// saves iterations).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clip/core/error.hpp"
#include "clip/data/random.hpp"
#include "clip/eval/labeled_features.hpp"
#include "clip/eval/lbfgs.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

// A linear classifier: logits = W x + b.
struct LinearClassifier {
  int64_t classes = 0, dim = 0;
  std::vector<double> weight;  // [K, D]
  std::vector<double> bias;    // [K]

  // [N, K] logits, accumulated in double.
  std::vector<double> logits(const LabeledFeatures& data) const {
    CLIP_CHECK(data.dim() == dim, "the classifier takes ", dim, "-dim features, not ", data.dim());
    std::vector<double> out(data.rows() * classes);
    for (int64_t i = 0; i < data.rows(); ++i)
      for (int64_t c = 0; c < classes; ++c) {
        const float* x = data.row(i);
        const double* w = weight.data() + c * dim;
        double z = bias[c];
        for (int64_t j = 0; j < dim; ++j) z += w[j] * x[j];
        out[i * classes + c] = z;
      }
    return out;
  }

  // The argmax of each row's logits (the first of equal maxima).
  std::vector<int64_t> predict(const LabeledFeatures& data) const {
    const std::vector<double> z = logits(data);
    std::vector<int64_t> out(data.rows());
    for (int64_t i = 0; i < data.rows(); ++i)
      out[i] = std::max_element(z.begin() + i * classes, z.begin() + (i + 1) * classes) - (z.begin() + i * classes);
    return out;
  }

  // b shifted to mean 0: the intercept is unique only up to a common shift.
  std::vector<double> centred_bias() const {
    double mean = 0;
    for (double v : bias) mean += v;
    mean /= static_cast<double>(bias.size());
    std::vector<double> out = bias;
    for (double& v : out) v -= mean;
    return out;
  }
};

// How an evaluation computes its products: float32 GEMMs (fast; on a few hundred rows their
// rounding limits the gradient to ~1e-6 of J / N) or double loops (for exact references).
// `automatic` takes double below 2^24 multiply-adds per product (where it costs little).
enum class ProbePrecision { automatic, fp32, fp64 };

struct ProbeOptions {
  double tolerance = 1e-6;   // max |gradient of J / N|; scikit-learn's default tol is 1e-4
  int max_iterations = 1000;
  ProbePrecision precision = ProbePrecision::automatic;
};

struct ProbeFit {
  LinearClassifier classifier;
  double C = 0;
  double objective = 0;  // J(W, b), unscaled
  LbfgsResult solver;
};

// One training set, centred once, fitted at any C.
class LogisticRegression {
 public:
  static constexpr int64_t kBlockRows = 256;

  LogisticRegression(const LabeledFeatures& train, int64_t classes)
      : rows_(train.rows()), dim_(train.dim()), classes_(classes) {
    check_labeled_features(train, classes, "training features");
    CLIP_CHECK(rows_ > 0, "the training split has no rows");
    CLIP_CHECK(classes >= 2, "logistic regression needs at least 2 classes, not ", classes);
    std::vector<int64_t> count(classes);
    for (int64_t l : train.labels) ++count[l];
    for (int64_t c = 0; c < classes; ++c)
      CLIP_CHECK(count[c] > 0, "class ", c, " has no training example");
    mean_.assign(dim_, 0.0);
    for (int64_t i = 0; i < rows_; ++i)
      for (int64_t j = 0; j < dim_; ++j) mean_[j] += train.row(i)[j];
    for (double& m : mean_) m /= static_cast<double>(rows_);
    centred_ = Tensor({rows_, dim_});
    for (int64_t i = 0; i < rows_; ++i)
      for (int64_t j = 0; j < dim_; ++j)
        centred_.values[i * dim_ + j] = static_cast<float>(train.row(i)[j] - mean_[j]);
    labels_ = train.labels;
  }

  int64_t rows() const { return rows_; }
  int64_t dim() const { return dim_; }
  int64_t classes() const { return classes_; }

  // The optimum at C, from `start` (a solution at another C, or of other data) or from zero.
  ProbeFit fit(double C, const ProbeOptions& options = {}, const LinearClassifier* start = nullptr) const {
    CLIP_CHECK(C > 0 && std::isfinite(C), "C must be positive and finite, not ", C);
    const int64_t nw = classes_ * dim_;
    std::vector<double> params(nw + classes_, 0.0);
    if (start) {
      CLIP_CHECK(start->classes == classes_ && start->dim == dim_, "a warm start must have the problem's shape");
      std::copy(start->weight.begin(), start->weight.end(), params.begin());
      for (int64_t c = 0; c < classes_; ++c) params[nw + c] = start->bias[c] + shift(start->weight, c);
    }
    LbfgsOptions lbfgs;
    lbfgs.gradient_tolerance = options.tolerance;
    lbfgs.max_iterations = options.max_iterations;
    ProbeFit out;
    out.C = C;
    ProbePrecision precision = options.precision;
    if (precision == ProbePrecision::automatic)
      precision = rows_ * dim_ * classes_ < (int64_t{1} << 24) ? ProbePrecision::fp64 : ProbePrecision::fp32;
    out.solver = minimize_lbfgs(
        [&](std::span<const double> p, std::span<double> g) { return mean_objective(p, g, C, precision); },
        std::span<double>(params), lbfgs);
    out.objective = out.solver.value * static_cast<double>(rows_);
    out.classifier.classes = classes_;
    out.classifier.dim = dim_;
    out.classifier.weight.assign(params.begin(), params.begin() + nw);
    out.classifier.bias.resize(classes_);
    for (int64_t c = 0; c < classes_; ++c) out.classifier.bias[c] = params[nw + c] - shift(out.classifier.weight, c);
    return out;
  }

  // J(W, b) / N and its gradient, params = [W (K x D), b_c (K)] in centred coordinates.
  double mean_objective(std::span<const double> params, std::span<double> gradient, double C,
                        ProbePrecision precision = ProbePrecision::fp32) const {
    const int64_t K = classes_, D = dim_, nw = K * D;
    const bool fast = precision == ProbePrecision::fp32;
    std::vector<float> w(fast ? nw : 0);
    if (fast) std::copy(params.begin(), params.begin() + nw, w.begin());
    const double* b = params.data() + nw;
    const int64_t blocks = (rows_ + kBlockRows - 1) / kBlockRows;
    int threads = 1;
#ifdef _OPENMP
    // Waking a second thread costs more than a small problem's whole evaluation.
    if (rows_ * D * K >= (int64_t{1} << 20)) threads = std::max<int>(1, std::min<int64_t>(omp_get_max_threads(), blocks));
#endif
    // Per thread: [gW (K x D), gb (K), loss].
    std::vector<std::vector<double>> partial(threads, std::vector<double>(nw + K + 1, 0.0));
#pragma omp parallel num_threads(threads)
    {
      int t = 0;
#ifdef _OPENMP
      t = omp_get_thread_num();
#endif
      std::vector<double>& acc = partial[t];
      std::vector<float> logits(K * kBlockRows), block_grad(fast ? nw : 0);
      std::vector<double> exact_logits(fast ? 0 : K * kBlockRows);
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r0 = blk * kBlockRows, m = std::min(kBlockRows, rows_ - r0);
        const float* x = centred_.data() + r0 * D;
        // z[c * m + i]: logit of row i, class c (without b).
        auto z = [&](int64_t c, int64_t i) { return fast ? double(logits[c * m + i]) : exact_logits[c * m + i]; };
        if (fast) {
          gemm_nt(K, m, D, w.data(), D, x, D, logits.data(), m, false);  // [K, m]
        } else {
          for (int64_t i = 0; i < m; ++i)
            for (int64_t c = 0; c < K; ++c) {
              double s = 0;
              for (int64_t j = 0; j < D; ++j) s += params[c * D + j] * x[i * D + j];
              exact_logits[c * m + i] = s;
            }
        }
        for (int64_t i = 0; i < m; ++i) {
          double top = -INFINITY;
          for (int64_t c = 0; c < K; ++c) top = std::max(top, z(c, i) + b[c]);
          double sum = 0;
          for (int64_t c = 0; c < K; ++c) sum += std::exp(z(c, i) + b[c] - top);
          const double log_sum = top + std::log(sum);
          const int64_t y = labels_[r0 + i];
          acc[nw + K] += log_sum - (z(y, i) + b[y]);
          for (int64_t c = 0; c < K; ++c) {
            const double r = std::exp(z(c, i) + b[c] - log_sum) - (c == y ? 1.0 : 0.0);
            acc[nw + c] += r;
            if (fast) {
              logits[c * m + i] = static_cast<float>(r);
            } else {
              for (int64_t j = 0; j < D; ++j) acc[c * D + j] += r * x[i * D + j];
            }
          }
        }
        if (fast) {
          gemm_nn(K, D, m, logits.data(), m, x, D, block_grad.data(), D, false);  // R^T X_c
          for (int64_t j = 0; j < nw; ++j) acc[j] += block_grad[j];
        }
      }
    }
    std::vector<double>& total = partial[0];
    for (int t = 1; t < threads; ++t)
      for (size_t j = 0; j < total.size(); ++j) total[j] += partial[t][j];
    const double inv_n = 1.0 / static_cast<double>(rows_);
    double penalty = 0;
    for (int64_t j = 0; j < nw; ++j) {
      penalty += params[j] * params[j];
      gradient[j] = (total[j] + params[j] / C) * inv_n;
    }
    for (int64_t c = 0; c < K; ++c) gradient[nw + c] = total[nw + c] * inv_n;
    return (total[nw + K] + penalty / (2 * C)) * inv_n;
  }

 private:
  // W_c . mean: what moves between the centred and the plain intercept.
  double shift(const std::vector<double>& weight, int64_t c) const {
    double s = 0;
    for (int64_t j = 0; j < dim_; ++j) s += weight[c * dim_ + j] * mean_[j];
    return s;
  }

  int64_t rows_, dim_, classes_;
  std::vector<double> mean_;
  Tensor centred_;
  std::vector<int64_t> labels_;
};

// The number of rows whose prediction equals the label.
inline int64_t count_correct(const LinearClassifier& classifier, const LabeledFeatures& data) {
  const std::vector<int64_t> p = classifier.predict(data);
  int64_t hits = 0;
  for (size_t i = 0; i < p.size(); ++i) hits += p[i] == data.labels[i];
  return hits;
}

// The sweep's grid: C = 10^(k/8), k = -48..48.
inline constexpr int kSweepMinK = -48, kSweepMaxK = 48;
inline double sweep_C(int k) { return std::pow(10.0, k / 8.0); }

struct SweepPoint {
  int k;
  double C;
  int64_t val_correct;
  double val_accuracy;
  ProbeFit fit;
};

struct SweepResult {
  std::vector<SweepPoint> points;  // in the order evaluated
  int best_k = 0;
  const SweepPoint& best() const {
    for (const SweepPoint& p : points)
      if (p.k == best_k) return p;
    CLIP_FAIL("the sweep has no point k = ", best_k);
  }
};

// The parametric search of MANIFEST F. `on_point` is told after each fit (progress, logs).
inline SweepResult sweep_regularization(const LogisticRegression& train, const LabeledFeatures& val,
                                        const ProbeOptions& options = {},
                                        const std::function<void(const SweepPoint&)>& on_point = {}) {
  check_labeled_features(val, train.classes(), "validation features");
  CLIP_CHECK(val.rows() > 0, "the validation split has no rows");
  CLIP_CHECK(val.dim() == train.dim(), "feature dimensions disagree: training has ", train.dim(),
             " but validation has ", val.dim());
  SweepResult out;
  auto evaluated = [&](int k) {
    return std::any_of(out.points.begin(), out.points.end(), [k](const SweepPoint& p) { return p.k == k; });
  };
  auto evaluate = [&](int k) {
    const SweepPoint* nearest = nullptr;
    for (const SweepPoint& p : out.points)
      if (!nearest || std::abs(p.k - k) < std::abs(nearest->k - k)) nearest = &p;
    ProbeFit fit = train.fit(sweep_C(k), options, nearest ? &nearest->fit.classifier : nullptr);
    const int64_t correct = count_correct(fit.classifier, val);
    out.points.push_back({k, sweep_C(k), correct, double(correct) / double(val.rows()), std::move(fit)});
    if (on_point) on_point(out.points.back());
  };
  auto best = [&] {
    const SweepPoint* b = nullptr;
    for (const SweepPoint& p : out.points)
      if (!b || p.val_correct > b->val_correct || (p.val_correct == b->val_correct && p.k < b->k)) b = &p;
    return b->k;
  };
  for (int k = kSweepMinK; k <= kSweepMaxK; k += 16) evaluate(k);
  for (int step : {8, 4, 2, 1}) {
    const int centre = best();
    for (int k : {centre - step, centre + step})
      if (k >= kSweepMinK && k <= kSweepMaxK && !evaluated(k)) evaluate(k);
  }
  out.best_k = best();
  return out;
}

// Per class, a seeded shuffle of its rows; round(proportion * count) of them (at most count - 1,
// so every class keeps a training example) go to validation. Both parts keep the input order.
inline std::pair<LabeledFeatures, LabeledFeatures> stratified_split(const LabeledFeatures& data, int64_t classes,
                                                                    double proportion, uint64_t seed) {
  CLIP_CHECK(proportion > 0 && proportion < 1, "the validation proportion must be in (0, 1), not ", proportion);
  std::vector<std::vector<int64_t>> by_class(classes);
  for (int64_t i = 0; i < data.rows(); ++i) by_class[data.labels[i]].push_back(i);
  std::vector<char> to_val(data.rows(), 0);
  for (int64_t c = 0; c < classes; ++c) {
    std::vector<int64_t>& rows = by_class[c];
    data::Rng rng(data::derive_seed(seed, {0x5e1f, static_cast<uint64_t>(c)}));
    data::shuffle(rows, rng);
    const int64_t n = static_cast<int64_t>(rows.size());
    const int64_t take = std::min<int64_t>(std::llround(proportion * n), std::max<int64_t>(n - 1, 0));
    for (int64_t i = 0; i < take; ++i) to_val[rows[i]] = 1;
  }
  std::vector<int64_t> train_rows, val_rows;
  for (int64_t i = 0; i < data.rows(); ++i) (to_val[i] ? val_rows : train_rows).push_back(i);
  return {data.select(train_rows), data.select(val_rows)};
}

struct LinearProbeResult {
  std::optional<SweepResult> sweep;  // absent when C was given
  ProbeFit final_fit;                // on train + validation at the chosen C (or on train at the given C)
  std::vector<double> test_logits;   // [N_test, K]
};

// The whole protocol: the sweep on (train, val), the refit on both, the test logits. With `C`,
// no sweep: one fit on train + val (val may be empty).
inline LinearProbeResult linear_probe(const LabeledFeatures& train, const LabeledFeatures& val,
                                      const LabeledFeatures& test, int64_t classes, std::optional<double> C,
                                      const ProbeOptions& options = {},
                                      const std::function<void(const SweepPoint&)>& on_point = {}) {
  check_labeled_features(train, classes, "training features");
  check_labeled_features(test, classes, "test features");
  CLIP_CHECK(test.dim() == train.dim(), "feature dimensions disagree: training has ", train.dim(), " but test has ",
             test.dim());
  LinearProbeResult out;
  const LinearClassifier* start = nullptr;
  double chosen = 0;
  if (C) {
    chosen = *C;
  } else {
    const LogisticRegression problem(train, classes);
    out.sweep = sweep_regularization(problem, val, options, on_point);
    chosen = out.sweep->best().C;
    start = &out.sweep->best().fit.classifier;
  }
  const LogisticRegression all(val.rows() > 0 ? concatenate(train, val) : train, classes);
  out.final_fit = all.fit(chosen, options, start);
  out.test_logits = out.final_fit.classifier.logits(test);
  return out;
}

}  // namespace clip
