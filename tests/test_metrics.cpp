// Training metrics and their chart: JSON lines that read back exactly, a resumed log that keeps
// each step once, a line cut short by a kill that is dropped (and one broken in the middle that is
// an error naming it), round tick values, and series thinned by averaging.
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "clip/train/metrics.hpp"
#include "clip/train/svg_chart.hpp"
#include "messages.hpp"

namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("clip-metrics-test-" + std::to_string(::getpid()) + "-" +
                                                std::to_string(std::random_device{}()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

clip::StepMetrics step(int64_t n, double loss) {
  clip::StepMetrics m;
  m.step = n;
  m.loss = loss;
  m.lr = 5e-4f;
  m.temperature = 14.285714149475098;
  m.elapsed_s = 0.1 * n;
  return m;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

BOOST_AUTO_TEST_SUITE(metrics)

BOOST_AUTO_TEST_CASE(records_read_back_exactly_and_resume_keeps_each_step_once) {
  const TempDir dir;
  const fs::path path = dir.path / "metrics.jsonl";
  const double awkward = 5.8157028133467370;  // needs all 17 digits
  {
    clip::MetricsLog log(path);
    for (int64_t s = 1; s <= 6; ++s) log.write(step(s, awkward + s));
    clip::ZeroShotMetrics z;
    z.step = 4;
    z.top1 = 0.6875;
    z.top5 = 1;
    z.images = 16;
    log.write(z);
  }
  std::vector<clip::json::Value> records = clip::read_metrics(path);
  BOOST_TEST_REQUIRE(records.size() == 7u);
  BOOST_TEST(records[0]["type"].as_string() == "train");
  BOOST_TEST(records[0]["loss"].as_number() == awkward + 1);
  BOOST_TEST(float(records[0]["lr"].as_number()) == 5e-4f);
  BOOST_TEST(records[6]["type"].as_string() == "zeroshot");
  BOOST_TEST(records[6]["top1"].as_number() == 0.6875);

  // Resuming at step 4 keeps steps 1-4 and the evaluation at step 4, then appends.
  {
    clip::MetricsLog log(path, 4);
    BOOST_TEST(log.curves().loss.size() == 4u);
    BOOST_TEST(log.curves().top1.size() == 1u);
    log.write(step(5, 1.0));
  }
  records = clip::read_metrics(path);
  BOOST_TEST_REQUIRE(records.size() == 6u);
  BOOST_TEST(records[5]["step"].as_number() == 5);
  BOOST_TEST(records[5]["loss"].as_number() == 1.0);

  // A new run starts the file afresh.
  { clip::MetricsLog log(path); }
  BOOST_TEST(clip::read_metrics(path).empty());
}

BOOST_AUTO_TEST_CASE(a_cut_last_line_is_dropped_a_broken_one_is_an_error) {
  const TempDir dir;
  const fs::path path = dir.path / "metrics.jsonl";
  std::ofstream(path) << "{\"type\":\"train\",\"step\":1,\"loss\":2}\n{\"type\":\"train\",\"st";
  BOOST_TEST(clip::read_metrics(path).size() == 1u);
  std::ofstream(path) << "{\"type\":\"train\",\"step\":1,\"loss\":2}\n{\"type\":\n{\"step\":3}\n";
  const std::string msg = clip::test::message_of([&] { clip::read_metrics(path); });
  BOOST_TEST(contains(msg, path.string() + "' line 2 is not a metrics record"), msg);
  std::ofstream(path) << "{\"type\":\"train\",\"step\":1,\"loss\":2}\n[1, 2]\n";
  BOOST_TEST(clip::read_metrics(path).size() == 1u);
}

BOOST_AUTO_TEST_CASE(ticks_are_round_and_cover_the_range) {
  using clip::detail::nice_ticks;
  BOOST_TEST(nice_ticks(0, 100) == (std::vector<double>{0, 20, 40, 60, 80, 100}), boost::test_tools::per_element());
  BOOST_TEST(nice_ticks(0, 40) == (std::vector<double>{0, 10, 20, 30, 40}), boost::test_tools::per_element());
  const std::vector<double> t = nice_ticks(4.71, 5.83);
  BOOST_TEST(t.front() >= 4.71);
  BOOST_TEST(t.back() <= 5.83);
  for (size_t i = 1; i < t.size(); ++i) BOOST_TEST(std::abs(t[i] - t[i - 1] - 0.2) < 1e-12);
  BOOST_TEST(clip::detail::tick_label(20000, 5000) == "20k");
  BOOST_TEST(clip::detail::tick_label(5.2, 0.2) == "5.2");
  BOOST_TEST(clip::detail::tick_label(0.05, 0.05) == "0.05");
}

BOOST_AUTO_TEST_CASE(long_series_are_thinned_by_averaging) {
  std::vector<std::pair<double, double>> points;
  for (int i = 0; i < 1000; ++i) points.emplace_back(i, i % 2 ? 1.0 : 3.0);
  points.emplace_back(1000, std::nan(""));  // skipped
  const auto thin = clip::detail::thin(points, 100);
  BOOST_TEST_REQUIRE(thin.size() == 100u);
  BOOST_TEST(thin[0].first == 4.5);   // the mean of x 0..9
  BOOST_TEST(thin[0].second == 2.0);  // the mean of alternating 3 and 1

  // A chart of 100k steps stays small: one point per pixel.
  clip::TrainingCurves curves;
  for (int i = 1; i <= 100000; ++i) curves.loss.emplace_back(i, 5.0 / std::sqrt(i));
  const std::string svg = curves.svg("long run", 100000);
  BOOST_TEST(svg.size() < 100000u, svg.size());
  BOOST_TEST(contains(svg, "moving average (2001 steps)"));
  BOOST_TEST(contains(svg, "no zero-shot evaluation yet"));
  BOOST_TEST(contains(svg, ">100k<"));
}

BOOST_AUTO_TEST_SUITE_END()
