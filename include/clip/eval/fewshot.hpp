// The few-shot linear probe of the CLIP paper (figures 6 and 7): for k examples per class, the
// probe fitted on k training images of each class and scored on the test split, averaged over
// seeds.
//
//   draw        per seed, a seeded permutation of the training rows; each class takes its first
//               k rows in that order (so a seed's k-shot set grows with k)
//   C           --C, or the sweep (linear_probe.hpp) on a stratified half/half split of the
//               k-shot set, then the refit on all of it. One shot per class cannot be split:
//               k = 1 takes the C chosen for the smallest k > 1 of the same seed, or
//               scikit-learn's default C = 1 when no such k is asked for.
//   k too big   a class with fewer than k training rows: that k's metrics are null, with a note
//               (as CLIP_benchmark reports what it cannot compute)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "clip/data/random.hpp"
#include "clip/eval/labeled_features.hpp"
#include "clip/eval/linear_probe.hpp"
#include "clip/eval/metrics.hpp"
#include "clip/train/svg_chart.hpp"

namespace clip {

struct FewShotOptions {
  std::vector<int> shots{1, 2, 4, 8, 16};
  int seeds = 3;
  uint64_t seed = 0;
  std::optional<double> C;
  ProbeOptions probe;
};

struct FewShotPoint {
  int shots = 0;
  std::vector<ClassificationMetrics> per_seed;  // empty when k is too big
  std::vector<double> C_per_seed;
  std::string note;                             // why there are no metrics

  bool available() const { return !per_seed.empty(); }
  double mean(double ClassificationMetrics::*m) const {
    double s = 0;
    for (const ClassificationMetrics& r : per_seed) s += r.*m;
    return s / double(per_seed.size());
  }
  // The sample standard deviation over seeds (0 for one seed).
  double spread(double ClassificationMetrics::*m) const {
    if (per_seed.size() < 2) return 0;
    const double mu = mean(m);
    double s = 0;
    for (const ClassificationMetrics& r : per_seed) s += (r.*m - mu) * (r.*m - mu);
    return std::sqrt(s / double(per_seed.size() - 1));
  }
};

// The rows of the k-shot set of one seed: each class's first k rows in the seed's permutation.
inline std::vector<int64_t> fewshot_rows(const LabeledFeatures& train, int64_t classes, int k, uint64_t seed) {
  std::vector<int64_t> order(train.rows());
  for (int64_t i = 0; i < train.rows(); ++i) order[i] = i;
  data::Rng rng(data::derive_seed(seed, {0xfe5, 0}));
  data::shuffle(order, rng);
  std::vector<int> taken(classes, 0);
  std::vector<int64_t> rows;
  for (int64_t i : order)
    if (taken[train.labels[i]] < k) ++taken[train.labels[i]], rows.push_back(i);
  return rows;
}

inline std::vector<FewShotPoint> fewshot_probe(const LabeledFeatures& train, const LabeledFeatures& test,
                                               int64_t classes, const FewShotOptions& options,
                                               const std::function<void(const std::string&)>& log = {}) {
  check_labeled_features(train, classes, "training features");
  check_labeled_features(test, classes, "test features");
  check_same_dim(train, "training", test, "test");
  CLIP_CHECK(options.seeds > 0, "few-shot needs at least one seed");
  std::vector<int64_t> count(classes);
  for (int64_t l : train.labels) ++count[l];
  const int64_t smallest = *std::min_element(count.begin(), count.end());

  std::vector<int> shots = options.shots;
  std::sort(shots.begin(), shots.end());
  shots.erase(std::unique(shots.begin(), shots.end()), shots.end());
  std::vector<FewShotPoint> out(shots.size());
  // Larger k first, so k = 1 can take the C of the smallest k > 1.
  for (size_t p = shots.size(); p-- > 0;) {
    FewShotPoint& point = out[p];
    point.shots = shots[p];
    const int k = shots[p];
    CLIP_CHECK(k > 0, "the number of shots must be positive, not ", k);
    if (k > smallest) {
      const int64_t c = std::min_element(count.begin(), count.end()) - count.begin();
      point.note = std::to_string(k) + "-shot: class " + std::to_string(c) + " has only " + std::to_string(smallest) +
                   " training examples";
      if (log) log(point.note);
      continue;
    }
    for (int s = 0; s < options.seeds; ++s) {
      const uint64_t seed = data::derive_seed(options.seed, {static_cast<uint64_t>(s)});
      const LabeledFeatures subset = train.select(fewshot_rows(train, classes, k, seed));
      double C = 1.0;
      const LinearClassifier* start = nullptr;
      std::optional<SweepResult> sweep;
      if (options.C) {
        C = *options.C;
      } else if (k > 1) {
        const auto [fit_part, val_part] = stratified_split(subset, classes, 0.5, seed);
        const LogisticRegression problem(fit_part, classes);
        sweep = sweep_regularization(problem, val_part, options.probe);
        C = sweep->best().C;
        start = &sweep->best().fit.classifier;
      } else {
        for (size_t q = p + 1; q < shots.size(); ++q)
          if (out[q].available()) {
            C = out[q].C_per_seed[s];
            break;
          }
      }
      const LogisticRegression problem(subset, classes);
      const ProbeFit fit = problem.fit(C, options.probe, start);
      const std::vector<double> logits = fit.classifier.logits(test);
      point.per_seed.push_back(classification_metrics(std::span<const double>(logits),
                                                      std::span<const int64_t>(test.labels), classes));
      point.C_per_seed.push_back(C);
      if (log) {
        char line[160];
        std::snprintf(line, sizeof line, "%d-shot, seed %d: C %.4g, acc1 %.4f", k, s, C, point.per_seed.back().acc1);
        log(line);
      }
    }
  }
  return out;
}

// The paper's figure 6 for one model: mean top-1 accuracy (with the spread over seeds) against
// shots per class on a log axis (ticks at 1, 2, 4, ...), the zero-shot accuracy as a horizontal
// line across the whole plot.
inline std::string fewshot_svg(const std::string& title, const std::vector<FewShotPoint>& points,
                               std::optional<double> zero_shot_acc1) {
  ChartSeries mean{"linear probe (mean over seeds)", "#1f77b4", {}, true, 2.0};
  ChartSeries low{"mean - sd", "#9ecae1", {}, false, 1.0}, high{"mean + sd", "#9ecae1", {}, false, 1.0};
  double x_lo = 0, x_hi = 0;
  bool any = false;
  for (const FewShotPoint& p : points) {
    if (!p.available()) continue;
    const double x = double(p.shots), m = 100 * p.mean(&ClassificationMetrics::acc1),
                 sd = 100 * p.spread(&ClassificationMetrics::acc1);
    mean.points.emplace_back(x, m);
    low.points.emplace_back(x, m - sd);
    high.points.emplace_back(x, m + sd);
    x_lo = any ? std::min(x_lo, x) : x;
    x_hi = any ? std::max(x_hi, x) : x;
    any = true;
  }
  ChartPanel panel;
  panel.title = "Few-shot linear probe";
  panel.x_label = "labeled training examples per class (log scale)";
  panel.x_scale = AxisScale::log2;
  // A quarter of a doubling of room on either side, so the end points do not sit on the frame.
  if (any) panel.x_min = x_lo / std::exp2(0.25), panel.x_max = x_hi * std::exp2(0.25);
  panel.y_label = "top-1 accuracy (%)";
  panel.legend_bottom = true;
  panel.empty_note = "no k had enough examples in every class";
  if (zero_shot_acc1 && any)
    panel.series.push_back({"zero-shot (" + detail::tick_label(100 * *zero_shot_acc1, 0.1) + "%)", "#d62728",
                            {{*panel.x_min, 100 * *zero_shot_acc1}, {*panel.x_max, 100 * *zero_shot_acc1}}, false, 2.0});
  if (!mean.points.empty()) {
    panel.series.push_back(low);
    panel.series.push_back(high);
  }
  panel.series.push_back(mean);
  return render_svg_chart(title, {panel});
}

}  // namespace clip
