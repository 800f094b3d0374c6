// L-BFGS (Nocedal & Wright, "Numerical Optimization", 2nd ed., algorithms 7.4 and 7.5) for smooth
// unconstrained minimisation in double precision:
//
//   direction   d = -H g by the two-loop recursion over the last `history` pairs
//               s = x_{k+1} - x_k, y = g_{k+1} - g_k, with H0 = (s.y / y.y) I from the newest pair
//   step        a line search satisfying the strong Wolfe conditions
//                 f(x + a d) <= f(x) + c1 a g.d        (sufficient decrease)
//                 |g(x + a d).d| <= c2 |g.d|            (curvature)
//               by bracketing and zoom with safeguarded cubic interpolation (N&W algorithms 3.5,
//               3.6); the first iteration tries a = 1 / |g|_2, later ones a = 1
//   stop        max_i |g_i| <= gradient_tolerance (the test scipy's L-BFGS-B calls pgtol), or
//               (f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= relative_reduction (its factr test;
//               0 disables it), or the iteration limit, or a line search that finds no lower
//               point (the values have reached rounding).
//
// The objective is any callable `double f(std::span<const double> x, std::span<double> gradient)`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "clip/core/error.hpp"

namespace clip {

struct LbfgsOptions {
  int history = 10;                   // pairs (s, y) kept: scipy's default m
  int max_iterations = 1000;
  double gradient_tolerance = 1e-5;   // on max |g_i|
  double relative_reduction = 0.0;    // scipy's ftol; 0 never stops on it
  int max_line_search = 50;           // evaluations per line search (scipy's maxls)
  double c1 = 1e-4, c2 = 0.9;         // Wolfe constants for quasi-Newton directions
  // Near the optimum f changes by less than its rounding, and sufficient decrease can no longer
  // be seen in the values. A step is then accepted on the approximate Wolfe conditions of Hager
  // and Zhang: slope(a) <= (2 c1 - 1) slope(0) and f(a) <= f(0) + value_noise |f(0)|.
  double value_noise = 1e-8;
};

enum class LbfgsStop { gradient, reduction, iterations, line_search };

inline const char* lbfgs_stop_name(LbfgsStop s) {
  switch (s) {
    case LbfgsStop::gradient: return "gradient below tolerance";
    case LbfgsStop::reduction: return "relative reduction below tolerance";
    case LbfgsStop::iterations: return "iteration limit";
    case LbfgsStop::line_search: return "line search found no lower point";
  }
  return "";
}

struct LbfgsResult {
  double value = 0;          // f at the returned x
  double gradient_max = 0;   // max |g_i| there
  int iterations = 0;
  int evaluations = 0;
  LbfgsStop stop = LbfgsStop::iterations;
  bool converged() const { return stop == LbfgsStop::gradient || stop == LbfgsStop::reduction; }
};

namespace detail {

inline double dot(std::span<const double> a, std::span<const double> b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline double max_abs(std::span<const double> a) {
  double m = 0;
  for (double v : a) m = std::max(m, std::abs(v));
  return m;
}

// The minimiser of the cubic through (a, fa, ga) and (b, fb, gb) (values and slopes), kept at
// least 10% of the interval away from both ends; bisection where the cubic has no minimiser.
inline double cubic_step(double a, double fa, double ga, double b, double fb, double gb) {
  const double lo = std::min(a, b), hi = std::max(a, b), margin = 0.1 * (hi - lo);
  const double d1 = ga + gb - 3 * (fa - fb) / (a - b);
  const double radicand = d1 * d1 - ga * gb;
  double t = 0.5 * (a + b);
  if (radicand >= 0) {
    const double d2 = std::copysign(std::sqrt(radicand), b - a);
    const double denominator = gb - ga + 2 * d2;
    if (denominator != 0) {
      const double c = b - (b - a) * (gb + d2 - d1) / denominator;
      if (std::isfinite(c)) t = c;
    }
  }
  if (!(t >= lo + margin && t <= hi - margin)) t = 0.5 * (a + b);
  return t;
}

}  // namespace detail

// Minimises f from x (updated in place). Throws if f is not finite at the start.
template <class Objective>
LbfgsResult minimize_lbfgs(Objective&& f, std::span<double> x, const LbfgsOptions& options = {}) {
  const size_t n = x.size();
  CLIP_CHECK(options.history > 0 && options.max_line_search > 0, "L-BFGS needs history > 0 and max_line_search > 0");
  std::vector<double> g(n), trial(n), trial_g(n), d(n), alpha_k;
  LbfgsResult result;
  double fx = f(std::span<const double>(x), std::span<double>(g));
  ++result.evaluations;
  CLIP_CHECK(std::isfinite(fx), "L-BFGS: the objective is not finite at the starting point");

  struct Pair {
    std::vector<double> s, y;
    double rho;
  };
  std::deque<Pair> pairs;

  for (;;) {
    result.value = fx;
    result.gradient_max = detail::max_abs(g);
    if (result.gradient_max <= options.gradient_tolerance) {
      result.stop = LbfgsStop::gradient;
      return result;
    }
    if (result.iterations >= options.max_iterations) {
      result.stop = LbfgsStop::iterations;
      return result;
    }

    // Two-loop recursion: d = -H g.
    for (size_t i = 0; i < n; ++i) d[i] = -g[i];
    alpha_k.assign(pairs.size(), 0.0);
    for (size_t j = pairs.size(); j-- > 0;) {
      alpha_k[j] = pairs[j].rho * detail::dot(pairs[j].s, d);
      for (size_t i = 0; i < n; ++i) d[i] -= alpha_k[j] * pairs[j].y[i];
    }
    if (!pairs.empty()) {
      const Pair& last = pairs.back();
      const double gamma = detail::dot(last.s, last.y) / detail::dot(last.y, last.y);
      for (double& v : d) v *= gamma;
    }
    for (size_t j = 0; j < pairs.size(); ++j) {
      const double beta = pairs[j].rho * detail::dot(pairs[j].y, d);
      for (size_t i = 0; i < n; ++i) d[i] += (alpha_k[j] - beta) * pairs[j].s[i];
    }
    double slope0 = detail::dot(g, d);
    if (!(slope0 < 0)) {  // rounding spoilt the curvature model: restart from steepest descent
      pairs.clear();
      for (size_t i = 0; i < n; ++i) d[i] = -g[i];
      slope0 = detail::dot(g, d);
    }
    double step = 1.0;
    if (pairs.empty()) step = std::min(1.0, 1.0 / std::sqrt(detail::dot(g, g)));

    // Strong Wolfe line search: phi(a) = f(x + a d).
    const double f0 = fx;
    int evaluations = 0;
    auto phi = [&](double a, double& slope) {
      for (size_t i = 0; i < n; ++i) trial[i] = x[i] + a * d[i];
      const double value = f(std::span<const double>(trial), std::span<double>(trial_g));
      ++evaluations;
      ++result.evaluations;
      slope = detail::dot(trial_g, d);
      return std::isfinite(value) ? value : std::numeric_limits<double>::infinity();
    };
    auto sufficient = [&](double a, double value) { return value <= f0 + options.c1 * a * slope0; };
    auto decrease = [&](double a, double value, double slope) {
      return sufficient(a, value) || (value <= f0 + options.value_noise * std::abs(f0) &&
                                      slope <= (2 * options.c1 - 1) * slope0);
    };
    auto curvature = [&](double slope) { return std::abs(slope) <= -options.c2 * slope0; };

    bool found = false;
    double f_accept = 0;  // f at the accepted step (trial, trial_g hold its point and gradient)
    double best_a = 0, best_f = f0;  // the lowest sufficient-decrease point seen, the fallback
    std::vector<double> best_x, best_g;
    auto remember = [&](double a, double value) {
      if (value < best_f && sufficient(a, value)) {
        best_a = a, best_f = value;
        best_x = trial, best_g = trial_g;
      }
    };
    // Evaluates the step a; true when it satisfies the (approximate) strong Wolfe conditions.
    auto wolfe_step = [&](double a, double& f_a, double& s_a) {
      f_a = phi(a, s_a);
      remember(a, f_a);
      if (decrease(a, f_a, s_a) && curvature(s_a)) found = true, f_accept = f_a;
      return found;
    };
    double lo = 0, f_lo = f0, s_lo = slope0, hi = 0, f_hi = 0, s_hi = 0;
    bool bracketed = false;
    double a = step, prev = 0, f_prev = f0, s_prev = slope0;
    while (evaluations < options.max_line_search) {
      double f_a, s_a;
      if (wolfe_step(a, f_a, s_a)) break;
      if (!decrease(a, f_a, s_a) || (prev > 0 && f_a >= f_prev)) {
        lo = prev, f_lo = f_prev, s_lo = s_prev, hi = a, f_hi = f_a, s_hi = s_a;
        bracketed = true;
        break;
      }
      if (s_a >= 0) {
        lo = a, f_lo = f_a, s_lo = s_a, hi = prev, f_hi = f_prev, s_hi = s_prev;
        bracketed = true;
        break;
      }
      prev = a, f_prev = f_a, s_prev = s_a;
      a *= 4;  // still descending: extrapolate (scipy's dcsrch bounds the growth by 4 as well)
    }
    while (bracketed && !found && evaluations < options.max_line_search) {
      if (std::abs(hi - lo) <= 1e-16 * std::max(std::abs(lo), std::abs(hi))) break;
      a = std::isfinite(f_hi) ? detail::cubic_step(lo, f_lo, s_lo, hi, f_hi, s_hi) : 0.5 * (lo + hi);
      double f_a, s_a;
      if (wolfe_step(a, f_a, s_a)) break;
      if (!decrease(a, f_a, s_a) || f_a >= f_lo) {
        hi = a, f_hi = f_a, s_hi = s_a;
      } else {
        if (s_a * (hi - lo) >= 0) hi = lo, f_hi = f_lo, s_hi = s_lo;
        lo = a, f_lo = f_a, s_lo = s_a;
      }
    }
    if (!found) {
      if (best_a == 0) {  // no lower point at all: the values are at rounding level
        result.stop = LbfgsStop::line_search;
        return result;
      }
      // The search ran out of evaluations or of resolution: take its lowest sufficient point.
      trial = best_x;
      trial_g = best_g;
      f_accept = best_f;
    }
    Pair p{std::vector<double>(n), std::vector<double>(n), 0};
    for (size_t i = 0; i < n; ++i) {
      p.s[i] = trial[i] - x[i];
      p.y[i] = trial_g[i] - g[i];
    }
    const double sy = detail::dot(p.s, p.y);
    if (sy > 1e-12 * detail::dot(p.y, p.y)) {  // keep H positive definite
      p.rho = 1.0 / sy;
      pairs.push_back(std::move(p));
      if (pairs.size() > static_cast<size_t>(options.history)) pairs.pop_front();
    }
    std::copy(trial.begin(), trial.end(), x.begin());
    g = trial_g;
    fx = f_accept;
    ++result.iterations;
    if (options.relative_reduction > 0 &&
        (f0 - fx) / std::max({std::abs(f0), std::abs(fx), 1.0}) <= options.relative_reduction) {
      result.value = fx;
      result.gradient_max = detail::max_abs(g);
      result.stop = result.gradient_max <= options.gradient_tolerance ? LbfgsStop::gradient : LbfgsStop::reduction;
      return result;
    }
  }
}

}  // namespace clip
