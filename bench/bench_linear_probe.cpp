// clip-bench-linear-probe: the linear probe protocol (the C sweep of MANIFEST F on train/val, the
// refit on train + val, the test accuracy) on feature files, timed. bench/linear_probe_vs_sklearn.py
// runs it beside scikit-learn on the same features.
//
//   clip-bench-linear-probe TRAIN VAL TEST [TOLERANCE] [fp32|fp64]
//
// Prints one JSON object: seconds, the evaluated k with validation accuracy and solver iterations,
// the chosen C, the refit's objective and the test accuracy.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "clip/eval/feature_file.hpp"
#include "clip/eval/linear_probe.hpp"
#include "clip/io/json.hpp"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: clip-bench-linear-probe TRAIN VAL TEST [TOLERANCE] [fp32|fp64]\n");
    return 2;
  }
  try {
    const clip::LabeledFeatures train = clip::read_feature_file(argv[1]), val = clip::read_feature_file(argv[2]),
                                test = clip::read_feature_file(argv[3]);
    clip::ProbeOptions options;
    if (argc > 4) options.tolerance = std::strtod(argv[4], nullptr);
    if (argc > 5) options.precision = std::string(argv[5]) == "fp64" ? clip::ProbePrecision::fp64 : clip::ProbePrecision::fp32;
    const int64_t classes = clip::class_count({&train, &val, &test});
    std::string points;
    const auto start = std::chrono::steady_clock::now();
    const clip::LinearProbeResult r =
        clip::linear_probe(train, val, test, classes, std::nullopt, options, [&](const clip::SweepPoint& p) {
          points += std::string(points.empty() ? "" : ",") + "{\"k\":" + std::to_string(p.k) +
                    ",\"val_accuracy\":" + clip::json::number(p.val_accuracy) +
                    ",\"iterations\":" + std::to_string(p.fit.solver.iterations) +
                    ",\"evaluations\":" + std::to_string(p.fit.solver.evaluations) + "}";
        });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    int64_t hits = 0;
    for (int64_t i = 0; i < test.rows(); ++i) {
      const double* z = r.test_logits.data() + i * classes;
      hits += std::max_element(z, z + classes) - z == test.labels[i];
    }
    std::printf("{\"seconds\":%.3f,\"best_k\":%d,\"C\":%s,\"refit_objective\":%s,\"refit_iterations\":%d,"
                "\"test_accuracy\":%s,\"points\":[%s]}\n",
                seconds, r.sweep->best_k, clip::json::number(r.final_fit.C).c_str(),
                clip::json::number(r.final_fit.objective).c_str(), r.final_fit.solver.iterations,
                clip::json::number(double(hits) / test.rows()).c_str(), points.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clip-bench-linear-probe: %s\n", e.what());
    return 1;
  }
}
