// Training metrics and their chart: JSON lines that read back exactly, a resumed log that keeps
// each step once, a line cut short by a kill that is dropped (and one broken in the middle that is
// an error naming it), round tick values, a log2 axis, and series thinned by averaging.
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

BOOST_AUTO_TEST_CASE(a_log2_axis_puts_powers_of_two_at_even_steps) {
  using clip::detail::log2_ticks;
  const auto ticks = log2_ticks(std::log2(0.8), std::log2(20));
  BOOST_TEST_REQUIRE(ticks.size() == 5u);
  for (int i = 0; i < 5; ++i) {
    BOOST_TEST(ticks[i].at == double(i));
    BOOST_TEST(ticks[i].label == std::to_string(1 << i));
  }
  const auto fractions = log2_ticks(-1, 1);
  BOOST_TEST_REQUIRE(fractions.size() == 3u);
  BOOST_TEST(fractions[0].label == "0.5");
  // 17 powers of two would crowd the axis: every second one, at most 10 ticks.
  const auto wide = log2_ticks(0, 16);
  BOOST_TEST_REQUIRE(wide.size() == 9u);
  BOOST_TEST(wide[1].label == "4");
  BOOST_TEST(wide.back().label == "65536");

  // In the chart, x = 1..16 spans the plot (x 80 to 870, 790 pixels) in four equal steps, each
  // point drawn at its tick; x = 0 has no logarithm and is left out.
  clip::ChartPanel panel;
  panel.series.push_back({"probe", "#000", {{0, 0.5}, {1, 1}, {2, 2}, {4, 3}, {8, 4}, {16, 5}}, true});
  panel.x_scale = clip::AxisScale::log2;
  const std::string svg = clip::render_svg_chart("log axis", {panel});
  const char* xs[] = {"80.0", "277.5", "475.0", "672.5", "870.0"};
  for (int i = 0; i < 5; ++i) {
    BOOST_TEST(contains(svg, "<text x=\"" + std::string(xs[i]) + "\" y=\"412\" text-anchor=\"middle\">" +
                                 std::to_string(1 << i) + "</text>"), xs[i]);
    BOOST_TEST(contains(svg, "<circle cx=\"" + std::string(xs[i]) + "\""), xs[i]);
  }
  BOOST_TEST(!contains(svg, ">0.5<"));  // the x = 0 point added no tick and no extent
  std::string numbers = svg;  // every attribute but the word "dominant-baseline" that holds "nan"
  for (size_t at; (at = numbers.find("dominant-baseline")) != std::string::npos;) numbers.erase(at, 17);
  BOOST_TEST(!contains(numbers, "nan"));
  BOOST_TEST(!contains(numbers, "inf"));
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
