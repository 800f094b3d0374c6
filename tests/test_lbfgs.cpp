// L-BFGS (clip/eval/lbfgs.hpp) on problems with known minima: a convex quadratic with a spread of
// curvatures and the Rosenbrock function, each solved to a gradient of 1e-8.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <span>
#include <vector>

#include "clip/eval/lbfgs.hpp"

BOOST_AUTO_TEST_CASE(convex_quadratic_reaches_its_minimum) {
  // f(x) = 1/2 sum_i a_i (x_i - c_i)^2 + 1/2 sum_i (x_i - x_{i+1})^2: curvatures 1..100, coupled.
  const int n = 50;
  std::vector<double> a(n), c(n);
  for (int i = 0; i < n; ++i) a[i] = 1.0 + 99.0 * i / (n - 1), c[i] = std::sin(0.3 * i) + 0.1 * i;
  auto f = [&](std::span<const double> x, std::span<double> g) {
    double v = 0;
    for (int i = 0; i < n; ++i) v += 0.5 * a[i] * (x[i] - c[i]) * (x[i] - c[i]), g[i] = a[i] * (x[i] - c[i]);
    for (int i = 0; i + 1 < n; ++i) {
      const double d = x[i] - x[i + 1];
      v += 0.5 * d * d;
      g[i] += d;
      g[i + 1] -= d;
    }
    return v;
  };
  // The minimiser solves (diag(a) + L) x = a c with L the path Laplacian: a tridiagonal system.
  std::vector<double> lower(n, 0), diag(n), upper(n, 0), rhs(n), exact(n);
  for (int i = 0; i < n; ++i) {
    diag[i] = a[i] + (i > 0) + (i + 1 < n);
    rhs[i] = a[i] * c[i];
    if (i > 0) lower[i] = -1;
    if (i + 1 < n) upper[i] = -1;
  }
  for (int i = 1; i < n; ++i) {  // Thomas algorithm
    const double m = lower[i] / diag[i - 1];
    diag[i] -= m * upper[i - 1];
    rhs[i] -= m * rhs[i - 1];
  }
  exact[n - 1] = rhs[n - 1] / diag[n - 1];
  for (int i = n - 2; i >= 0; --i) exact[i] = (rhs[i] - upper[i] * exact[i + 1]) / diag[i];

  std::vector<double> x(n, 0.0);
  clip::LbfgsOptions options;
  options.gradient_tolerance = 1e-8;
  const clip::LbfgsResult r = clip::minimize_lbfgs(f, std::span<double>(x), options);
  BOOST_TEST_MESSAGE("quadratic: " << r.iterations << " iterations, " << r.evaluations << " evaluations");
  BOOST_TEST((r.stop == clip::LbfgsStop::gradient), clip::lbfgs_stop_name(r.stop));
  BOOST_TEST(r.gradient_max <= 1e-8);
  double err = 0;
  for (int i = 0; i < n; ++i) err = std::max(err, std::abs(x[i] - exact[i]));
  BOOST_TEST(err <= 1e-8);  // smallest curvature is 1: |x - x*| <= |g|
}

BOOST_AUTO_TEST_CASE(rosenbrock_reaches_one_one) {
  // f = sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2, minimum 0 at (1, ..., 1); from (-1.2, 1, ...).
  for (int n : {2, 10}) {
    auto f = [n](std::span<const double> x, std::span<double> g) {
      double v = 0;
      for (int i = 0; i < n; ++i) g[i] = 0;
      for (int i = 0; i + 1 < n; ++i) {
        const double t = x[i + 1] - x[i] * x[i], u = 1 - x[i];
        v += 100 * t * t + u * u;
        g[i] += -400 * t * x[i] - 2 * u;
        g[i + 1] += 200 * t;
      }
      return v;
    };
    std::vector<double> x(n);
    for (int i = 0; i < n; ++i) x[i] = i % 2 ? 1.0 : -1.2;
    clip::LbfgsOptions options;
    options.gradient_tolerance = 1e-10;  // the Hessian's smallest eigenvalue is ~0.4: |x - 1| <~ 2.5 |g|
    const clip::LbfgsResult r = clip::minimize_lbfgs(f, std::span<double>(x), options);
    BOOST_TEST_MESSAGE("rosenbrock n=" << n << ": " << r.iterations << " iterations, " << r.evaluations
                                       << " evaluations, f " << r.value);
    BOOST_TEST((r.stop == clip::LbfgsStop::gradient), clip::lbfgs_stop_name(r.stop));
    BOOST_TEST(r.value <= 1e-16);
    for (int i = 0; i < n; ++i) BOOST_TEST(std::abs(x[i] - 1.0) <= 1e-8);
  }
}

BOOST_AUTO_TEST_CASE(iteration_limit_and_bad_start_are_reported) {
  auto f = [](std::span<const double> x, std::span<double> g) {
    g[0] = 2 * x[0];
    return x[0] < -5 ? NAN : x[0] * x[0];
  };
  std::vector<double> x{-10};
  BOOST_CHECK_THROW(clip::minimize_lbfgs(f, std::span<double>(x)), clip::Error);
  x = {3};
  clip::LbfgsOptions options;
  options.max_iterations = 0;
  const clip::LbfgsResult r = clip::minimize_lbfgs(f, std::span<double>(x), options);
  BOOST_TEST((r.stop == clip::LbfgsStop::iterations));
  BOOST_TEST(!r.converged());
  BOOST_TEST(x[0] == 3.0);
}
