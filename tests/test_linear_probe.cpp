// The linear probe (clip/eval/linear_probe.hpp) against scikit-learn's optima in
// eval_probe.safetensors (MANIFEST section F): the four fits' coefficients, centred intercepts,
// objective values and test predictions, the C sweep's evaluated points and choice, and the refit
// on train + validation; and the few-shot curve's SVG (log axis, zero-shot line).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "clip/eval/fewshot.hpp"
#include "clip/eval/linear_probe.hpp"
#include "clip/io/json.hpp"
#include "clip/io/safetensors.hpp"
#include "golden.hpp"
#include "messages.hpp"

namespace {

clip::LabeledFeatures split(const clip::SafeTensors& f, const std::string& name) {
  return {f.tensor(name + ".features"), f.integers(name + ".labels")};
}

// max |got - ref| / max |ref|.
double relative(const std::vector<double>& got, const std::vector<float>& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(got[i] - ref[i]));
    scale = std::max(scale, std::abs(double(ref[i])));
  }
  return diff / scale;
}

std::vector<float> centred(std::vector<float> b) {
  double mean = 0;
  for (float v : b) mean += v;
  mean /= double(b.size());
  for (float& v : b) v = static_cast<float>(v - mean);
  return b;
}

// The reference classifier's logits on the test split, to excuse near-ties.
clip::LinearClassifier reference(const clip::SafeTensors& f, const std::string& prefix) {
  const clip::Tensor w = f.tensor(prefix + ".coef"), b = f.tensor(prefix + ".intercept");
  return {w.shape[0], w.shape[1], std::vector<double>(w.values.begin(), w.values.end()),
          std::vector<double>(b.values.begin(), b.values.end())};
}

void check_fit(const clip::SafeTensors& f, const std::string& prefix, const clip::ProbeFit& fit,
               const clip::LabeledFeatures* test, double reference_objective) {
  const clip::Tensor w = f.tensor(prefix + ".coef"), b = f.tensor(prefix + ".intercept");
  const double dw = relative(fit.classifier.weight, w.values);
  const double db = relative(fit.classifier.centred_bias(), centred(b.values));
  BOOST_TEST_MESSAGE(prefix << " C " << fit.C << ": max|dW|/max|W| " << dw << ", intercepts " << db << ", objective "
                            << fit.objective << " (reference " << reference_objective << "), " << fit.solver.iterations
                            << " iterations, stop: " << clip::lbfgs_stop_name(fit.solver.stop) << ", max|g| " << fit.solver.gradient_max);
  BOOST_TEST(dw <= 1e-3);
  BOOST_TEST(db <= 1e-3);
  if (reference_objective > 0) BOOST_TEST(fit.objective <= reference_objective * (1 + 1e-6));
  if (!test) return;
  const std::vector<int64_t> want = f.integers(prefix + ".test_predictions");
  const std::vector<int64_t> got = fit.classifier.predict(*test);
  const std::vector<double> z = reference(f, prefix).logits(*test);
  const int64_t K = w.shape[0];
  int mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] == want[i]) continue;
    std::vector<double> row(z.begin() + i * K, z.begin() + (i + 1) * K);
    std::sort(row.rbegin(), row.rend());
    BOOST_TEST(row[0] - row[1] <= 1e-3, prefix << " test row " << i << ": predicted " << got[i] << ", reference "
                                               << want[i] << " with a margin of " << row[0] - row[1]);
    ++mismatches;
  }
  BOOST_TEST_MESSAGE(prefix << ": " << mismatches << " test predictions differ (near-ties)");
}

}  // namespace

BOOST_AUTO_TEST_CASE(four_fits_match_scikit_learn) {
  const auto path = clip::test::golden_file("eval_probe.safetensors");
  if (!path) return;
  const clip::SafeTensors f = clip::SafeTensors::open(*path);
  const clip::LabeledFeatures train = split(f, "train"), test = split(f, "test");
  const clip::json::Value fits = clip::json::parse(f.metadata().at("fits"));
  const clip::Tensor Cs = f.tensor("fit.C");
  const clip::LogisticRegression problem(train, 5);
  // Double products (what a problem this small gets) converge to the tolerance; the float32 GEMM
  // path of large problems stops at its rounding (~1e-6 here) but still meets MANIFEST F's bounds.
  for (clip::ProbePrecision precision : {clip::ProbePrecision::fp64, clip::ProbePrecision::fp32}) {
    clip::ProbeOptions options;
    options.precision = precision;
    BOOST_TEST_MESSAGE((precision == clip::ProbePrecision::fp64 ? "double products" : "float32 GEMMs"));
    for (int i = 0; i < 4; ++i) {
      const double C = fits.as_array()[i]["C"].as_number();
      BOOST_TEST(std::abs(C - Cs.values[i]) <= 1e-6 * C);
      const clip::ProbeFit fit = problem.fit(C, options);
      if (precision == clip::ProbePrecision::fp64) BOOST_TEST(fit.solver.converged());
      check_fit(f, "fit" + std::to_string(i), fit, &test, fits.as_array()[i]["objective"].as_number());
      // A warm start from another C's optimum reaches the same point.
      if (i > 0) {
        const clip::ProbeFit previous = problem.fit(fits.as_array()[i - 1]["C"].as_number(), options);
        const clip::ProbeFit warm = problem.fit(C, options, &previous.classifier);
        if (precision == clip::ProbePrecision::fp64) BOOST_TEST(warm.solver.converged());
        check_fit(f, "fit" + std::to_string(i), warm, &test, fits.as_array()[i]["objective"].as_number());
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(objective_and_gradient_agree) {
  const auto path = clip::test::golden_file("eval_probe.safetensors");
  if (!path) return;
  const clip::SafeTensors f = clip::SafeTensors::open(*path);
  const clip::LabeledFeatures train = split(f, "train");
  const clip::LogisticRegression problem(train, 5);
  // At the reference optimum (centred coordinates: b_c = b + W mean) the gradient vanishes, and
  // the objective is the stored one.
  const clip::json::Value fits = clip::json::parse(f.metadata().at("fits"));
  const clip::LinearClassifier ref = reference(f, "fit1");
  const double C = fits.as_array()[1]["C"].as_number();
  std::vector<double> mean(24, 0.0);
  for (int64_t i = 0; i < train.rows(); ++i)
    for (int j = 0; j < 24; ++j) mean[j] += train.row(i)[j] / double(train.rows());
  std::vector<double> p = ref.weight, g(5 * 24 + 5);
  for (int c = 0; c < 5; ++c) {
    double s = ref.bias[c];
    for (int j = 0; j < 24; ++j) s += ref.weight[c * 24 + j] * mean[j];
    p.push_back(s);
  }
  const double value = problem.mean_objective(p, g, C, clip::ProbePrecision::fp64) * train.rows();
  const double reference_objective = fits.as_array()[1]["objective"].as_number();
  BOOST_TEST(std::abs(value - reference_objective) <= 1e-5 * reference_objective);
  double gmax = 0;
  for (double v : g) gmax = std::max(gmax, std::abs(v));
  BOOST_TEST(gmax <= 1e-4);  // the reference is float32-rounded
  // Finite differences along the gradient's own coordinates.
  for (int j : {0, 37, 121, 124}) {
    std::vector<double> plus = p, minus = p, scratch(g.size());
    plus[j] += 1e-3, minus[j] -= 1e-3;
    p[j] += 0.5;  // away from the optimum, where the gradient is not ~0
    plus[j] += 0.5, minus[j] += 0.5;
    problem.mean_objective(p, g, C, clip::ProbePrecision::fp64);
    const auto fp64 = clip::ProbePrecision::fp64;
    const double fd =
        (problem.mean_objective(plus, scratch, C, fp64) - problem.mean_objective(minus, scratch, C, fp64)) / 2e-3;
    BOOST_TEST(std::abs(fd - g[j]) <= 1e-5 * std::max(1.0, std::abs(g[j])), "coordinate " << j << ": " << fd << " vs "
                                                                                          << g[j]);
    p[j] -= 0.5;
  }
}

BOOST_AUTO_TEST_CASE(sweep_and_refit_match_scikit_learn) {
  const auto path = clip::test::golden_file("eval_probe.safetensors");
  if (!path) return;
  const clip::SafeTensors f = clip::SafeTensors::open(*path);
  const clip::LabeledFeatures train = split(f, "train"), val = split(f, "val"), test = split(f, "test");
  const clip::json::Value sweep = clip::json::parse(f.metadata().at("sweep"));
  const std::vector<int64_t> want_k = f.integers("sweep.k");
  const clip::Tensor want_acc = f.tensor("sweep.val_accuracy");
  const int64_t want_best = f.integers("sweep.best_k")[0];

  const clip::LinearProbeResult r = clip::linear_probe(train, val, test, 5, std::nullopt);
  BOOST_REQUIRE(r.sweep);
  std::vector<int64_t> got_k;
  for (const clip::SweepPoint& p : r.sweep->points) got_k.push_back(p.k);
  std::sort(got_k.begin(), got_k.end());
  BOOST_TEST(got_k == want_k, boost::test_tools::per_element());
  for (const clip::SweepPoint& p : r.sweep->points) {
    const size_t i = std::find(want_k.begin(), want_k.end(), p.k) - want_k.begin();
    if (i == want_k.size()) continue;
    BOOST_TEST(std::abs(p.val_accuracy - want_acc.values[i]) <= 1.0 / val.rows() + 1e-6, "k " << p.k);
  }
  const auto best_acc = [&](int64_t k) {
    return want_acc.values[std::find(want_k.begin(), want_k.end(), k) - want_k.begin()];
  };
  BOOST_TEST_MESSAGE("chosen k " << r.sweep->best_k << ", reference " << want_best);
  BOOST_TEST((r.sweep->best_k == want_best || best_acc(r.sweep->best_k) >= best_acc(want_best) - 1.0 / val.rows()));
  BOOST_TEST(sweep["best_k"].as_int() == want_best);
  BOOST_TEST(std::abs(r.final_fit.C - sweep["best_C"].as_number()) <= 1e-12 * r.final_fit.C);
  check_fit(f, "sweep.final", r.final_fit, nullptr, 0);
  const std::vector<int64_t> predicted = r.final_fit.classifier.predict(test);
  int64_t hits = 0;
  for (size_t i = 0; i < predicted.size(); ++i) hits += predicted[i] == test.labels[i];
  BOOST_TEST(std::abs(double(hits) / test.rows() - sweep["final_test_accuracy"].as_number()) <= 1.0 / test.rows());
}

BOOST_AUTO_TEST_CASE(bad_input_is_named) {
  clip::LabeledFeatures train{clip::Tensor({4, 2}), {0, 1, 0, 1}}, other{clip::Tensor({2, 3}), {0, 1}};
  train.features.values = {1, 0, 0, 1, 2, 0, 0, 2};
  const std::string dims = clip::test::message_of([&] { clip::linear_probe(train, train, other, 2, std::nullopt); });
  BOOST_TEST(dims.find("dimensions disagree") != std::string::npos, dims);
  BOOST_TEST(dims.find("test has 3") != std::string::npos, dims);
  const std::string empty = clip::test::message_of([&] { clip::LogisticRegression(train, 3); });
  BOOST_TEST(empty.find("class 2 has no training example") != std::string::npos, empty);
  clip::LabeledFeatures bad = train;
  bad.labels[2] = 7;
  const std::string label = clip::test::message_of([&] { clip::LogisticRegression(bad, 2); });
  BOOST_TEST(label.find("row 2 has label 7") != std::string::npos, label);
}

BOOST_AUTO_TEST_CASE(stratified_split_keeps_class_shares) {
  clip::LabeledFeatures data{clip::Tensor({100, 1}), {}};
  for (int i = 0; i < 100; ++i) data.labels.push_back(i < 70 ? 0 : 1), data.features.values[i] = float(i);
  const auto [train, val] = clip::stratified_split(data, 2, 0.2, 7);
  BOOST_TEST(val.rows() == 20);
  BOOST_TEST(std::count(val.labels.begin(), val.labels.end(), 0) == 14);
  BOOST_TEST(std::count(train.labels.begin(), train.labels.end(), 1) == 24);
  const auto again = clip::stratified_split(data, 2, 0.2, 7);
  BOOST_TEST(again.second.features.values == val.features.values, boost::test_tools::per_element());
  const auto other = clip::stratified_split(data, 2, 0.2, 8);
  BOOST_TEST(other.second.features.values != val.features.values);
}

// The paper's figure 6: shots 1..16 on a log axis, equal steps between the ticks (the axis runs a
// quarter doubling past either end: log2 x from -0.25 to 4.25 over pixels 80 to 870), the
// zero-shot accuracy a horizontal line across the whole plot, a k without metrics left out.
BOOST_AUTO_TEST_CASE(fewshot_svg_has_a_log_axis_and_the_zero_shot_line) {
  std::vector<clip::FewShotPoint> points;
  for (int k : {1, 2, 4, 8, 16}) {
    clip::FewShotPoint p;
    p.shots = k;
    for (double a : {0.5, 0.6}) {
      clip::ClassificationMetrics m;
      m.acc1 = a + 0.02 * std::log2(k);
      p.per_seed.push_back(m);
    }
    points.push_back(p);
  }
  points.push_back({32, {}, {}, "a class has fewer than 32 examples"});
  const std::string svg = clip::fewshot_svg("probe", points, 0.7);
  auto has = [&](const std::string& part) { return svg.find(part) != std::string::npos; };
  const char* xs[] = {"123.9", "299.4", "475.0", "650.6", "826.1"};
  for (int i = 0; i < 5; ++i)
    BOOST_TEST(has("<text x=\"" + std::string(xs[i]) + "\" y=\"412\" text-anchor=\"middle\">" + std::to_string(1 << i) +
                   "</text>"), xs[i]);
  BOOST_TEST(!has(">32<"));
  BOOST_TEST(has("labeled training examples per class (log scale)"));
  // The zero-shot line: 70% from the left edge to the right edge, at one height.
  const size_t line = svg.find("stroke=\"#d62728\"");
  BOOST_TEST_REQUIRE(line != std::string::npos);
  const size_t at = svg.find("points=\"", line) + 8;
  const std::string pts = svg.substr(at, svg.find('"', at) - at);
  const size_t space = pts.find(' ');
  BOOST_TEST_REQUIRE(space != std::string::npos);
  const std::string a = pts.substr(0, space), b = pts.substr(space + 1);
  BOOST_TEST(a.substr(0, a.find(',')) == "80.0");
  BOOST_TEST(b.substr(0, b.find(',')) == "870.0");
  BOOST_TEST(a.substr(a.find(',')) == b.substr(b.find(',')));
  // The mean over seeds at 4 shots (0.55 + 0.04 = 59%) sits on the 4-shot tick.
  BOOST_TEST(has("<circle cx=\"475.0\""));
}
