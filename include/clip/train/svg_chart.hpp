// Line charts as one self-contained SVG document (no scripts, fonts or files it links to), for
// training curves a browser opens: panels stacked vertically, each with its axes, ticks at
// round values (1, 2 or 5 times a power of ten; on a log2 axis, the powers of two), axis labels,
// a title and a legend.
//
//   clip::ChartPanel loss{"Training loss", "step", "loss", {{"loss", "#1f77b4", points}}};
//   std::string svg = clip::render_svg_chart("run 1", {loss});
//
// A series of many points is thinned to about one point per horizontal pixel (each kept point
// the mean of its run of neighbours), so a chart of a million steps stays a small file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace clip {

struct ChartSeries {
  std::string label;
  std::string color;                              // any SVG colour: "#1f77b4", "gray"
  std::vector<std::pair<double, double>> points;  // (x, y), x ascending; non-finite y skipped
  bool markers = false;                           // a dot on every point (sparse series)
  double width = 1.5;                             // stroke width in pixels
};

// How x values map to positions: linear, or by log2(x) with ticks at powers of two (x <= 0 is
// skipped), as the CLIP paper's few-shot figures put shots per class.
enum class AxisScale { linear, log2 };

struct ChartPanel {
  std::string title, x_label, y_label;
  std::vector<ChartSeries> series;
  std::optional<double> x_min, x_max, y_min, y_max;  // fixed ends of an axis (else: the data's)
  std::string empty_note = "no data yet";            // shown when no series has a point
  bool legend_bottom = false;  // the legend in the bottom right corner (for rising curves), else top right
  AxisScale x_scale = AxisScale::linear;  // x_min and x_max are data values either way
};

namespace detail {

// Escapes text for SVG character data and attribute values.
inline std::string svg_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

inline std::string svg_number(double v) {
  char s[32];
  std::snprintf(s, sizeof s, "%.1f", v);
  return s;
}

// Round tick values covering [lo, hi], about `target` of them: steps of 1, 2 or 5 x 10^k.
inline std::vector<double> nice_ticks(double lo, double hi, int target = 6) {
  const double span = hi - lo;
  if (!(span > 0) || !std::isfinite(span)) return {lo};
  const double raw = span / std::max(1, target);
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  double step = power;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * power >= raw) {
      step = m * power;
      break;
    }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step)
    ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return ticks;
}

struct AxisTick {
  double at;          // in axis units (log2 of the value on a log2 axis)
  std::string label;  // the value
};

// Ticks of a log2 axis spanning [lo, hi] in log2 units: the powers of two inside it, every one
// while there are at most `target` + 2 of them, else every second, fourth, ... exponent.
inline std::vector<AxisTick> log2_ticks(double lo, double hi, int target = 8) {
  std::vector<AxisTick> ticks;
  if (!(hi >= lo) || !std::isfinite(lo) || !std::isfinite(hi)) return ticks;
  const double first = std::ceil(lo - 1e-9), last = std::floor(hi + 1e-9);
  int every = 1;
  while ((last - first) / every + 1 > target + 2) every *= 2;
  for (double e = first; e <= last; e += every) {
    char s[32];
    std::snprintf(s, sizeof s, "%g", std::exp2(e));
    ticks.push_back({e, s});
  }
  return ticks;
}

// A tick label: as few digits as the tick step needs (1e4 and above as 10k, 1.5M).
inline std::string tick_label(double v, double step) {
  char s[32];
  const double a = std::abs(v);
  if (a >= 1e6 && step >= 1e5) std::snprintf(s, sizeof s, "%gM", v / 1e6);
  else if (a >= 1e4 && step >= 1e3) std::snprintf(s, sizeof s, "%gk", v / 1e3);
  else {
    const int decimals = step >= 1 ? 0 : std::min(6, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
    std::snprintf(s, sizeof s, "%.*f", decimals, v);
  }
  return s;
}

// At most `limit` points: runs of consecutive points replaced by their mean.
inline std::vector<std::pair<double, double>> thin(const std::vector<std::pair<double, double>>& points, size_t limit) {
  std::vector<std::pair<double, double>> finite;
  for (const auto& p : points)
    if (std::isfinite(p.first) && std::isfinite(p.second)) finite.push_back(p);
  if (finite.size() <= limit || limit == 0) return finite;
  std::vector<std::pair<double, double>> out;
  const size_t run = (finite.size() + limit - 1) / limit;
  for (size_t i = 0; i < finite.size(); i += run) {
    const size_t end = std::min(finite.size(), i + run);
    double x = 0, y = 0;
    for (size_t j = i; j < end; ++j) x += finite[j].first, y += finite[j].second;
    out.emplace_back(x / (end - i), y / (end - i));
  }
  return out;
}

}  // namespace detail

// The SVG document: `title` on top, then each panel, `width` pixels wide.
inline std::string render_svg_chart(const std::string& title, const std::vector<ChartPanel>& panels, int width = 900,
                                    int panel_height = 320) {
  using detail::svg_escape;
  using detail::svg_number;
  constexpr int top = 40, left = 80, right = 30, gap_top = 34, gap_bottom = 52;
  const int height = top + static_cast<int>(panels.size()) * (gap_top + panel_height + gap_bottom) + 10;
  const int plot_w = width - left - right;
  std::string svg = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
                    std::to_string(width) + "\" height=\"" + std::to_string(height) + "\" viewBox=\"0 0 " +
                    std::to_string(width) + " " + std::to_string(height) +
                    "\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
                    "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
                    "<text x=\"" + std::to_string(width / 2) + "\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" "
                    "font-weight=\"bold\">" + svg_escape(title) + "</text>\n";

  int y0 = top;
  for (const ChartPanel& panel : panels) {
    const int plot_top = y0 + gap_top, plot_bottom = plot_top + panel_height;
    svg += "<text x=\"" + std::to_string(left) + "\" y=\"" + std::to_string(plot_top - 10) +
           "\" font-size=\"14\" font-weight=\"bold\">" + svg_escape(panel.title) + "</text>\n";

    // The data's extent, widened where the panel fixes an end.
    double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
    // On a log2 axis everything below is in log2 units; thin() drops the log of x <= 0.
    const bool log_x = panel.x_scale == AxisScale::log2;
    auto axis_x = [&](double x) { return log_x ? std::log2(x) : x; };
    std::vector<std::vector<std::pair<double, double>>> shown;
    for (const ChartSeries& s : panel.series) {
      std::vector<std::pair<double, double>> points = s.points;
      for (auto& p : points) p.first = axis_x(p.first);
      shown.push_back(detail::thin(points, static_cast<size_t>(plot_w)));
      for (const auto& [x, y] : shown.back()) {
        xlo = std::min(xlo, x), xhi = std::max(xhi, x);
        ylo = std::min(ylo, y), yhi = std::max(yhi, y);
      }
    }
    const bool empty = !(xlo <= xhi);
    if (empty) xlo = 0, xhi = 1, ylo = 0, yhi = 1;
    if (panel.x_min) xlo = axis_x(*panel.x_min);
    if (panel.x_max) xhi = axis_x(*panel.x_max);
    if (panel.y_min) ylo = *panel.y_min;
    if (panel.y_max) yhi = *panel.y_max;
    if (!(xhi > xlo)) xhi = xlo + 1;
    if (!(yhi > ylo)) {  // a flat series: a band around it
      const double pad = std::max(1e-6, std::abs(ylo) * 0.05);
      ylo -= pad, yhi += pad;
    } else if (!panel.y_min || !panel.y_max) {
      const double pad = (yhi - ylo) * 0.05;
      if (!panel.y_min) ylo -= pad;
      if (!panel.y_max) yhi += pad;
    }
    const std::vector<double> xt = log_x ? std::vector<double>{} : detail::nice_ticks(xlo, xhi),
                              yt = detail::nice_ticks(ylo, yhi);
    // Axes end on round values, so the outermost ticks sit at the corners.
    if (!panel.x_min && xt.size() > 1) xlo = std::min(xlo, xt.front());
    if (!panel.y_min && yt.size() > 1) ylo = std::min(ylo, yt.front());
    if (!panel.y_max && yt.size() > 1) yhi = std::max(yhi, yt.back());
    auto px = [&](double x) { return left + (x - xlo) / (xhi - xlo) * plot_w; };
    auto py = [&](double y) { return plot_bottom - (y - ylo) / (yhi - ylo) * panel_height; };

    // Grid, ticks and their labels.
    const double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1, ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
    std::vector<detail::AxisTick> x_ticks = log_x ? detail::log2_ticks(xlo, xhi) : std::vector<detail::AxisTick>{};
    for (double t : xt) x_ticks.push_back({t, detail::tick_label(t, xstep)});
    for (const detail::AxisTick& t : x_ticks) {
      if (t.at < xlo - 1e-9 * (xhi - xlo) || t.at > xhi + 1e-9 * (xhi - xlo)) continue;
      const std::string x = svg_number(px(t.at));
      svg += "<line x1=\"" + x + "\" y1=\"" + std::to_string(plot_top) + "\" x2=\"" + x + "\" y2=\"" +
             std::to_string(plot_bottom + 5) + "\" stroke=\"#e0e0e0\"/>\n<text x=\"" + x + "\" y=\"" +
             std::to_string(plot_bottom + 18) + "\" text-anchor=\"middle\">" + svg_escape(t.label) + "</text>\n";
    }
    for (double t : yt) {
      if (t < ylo - 1e-9 * (yhi - ylo) || t > yhi + 1e-9 * (yhi - ylo)) continue;
      const std::string y = svg_number(py(t));
      svg += "<line x1=\"" + std::to_string(left - 5) + "\" y1=\"" + y + "\" x2=\"" + std::to_string(left + plot_w) +
             "\" y2=\"" + y + "\" stroke=\"#e0e0e0\"/>\n<text x=\"" + std::to_string(left - 8) + "\" y=\"" + y +
             "\" text-anchor=\"end\" dominant-baseline=\"middle\">" + detail::tick_label(t, ystep) + "</text>\n";
    }
    svg += "<rect x=\"" + std::to_string(left) + "\" y=\"" + std::to_string(plot_top) + "\" width=\"" +
           std::to_string(plot_w) + "\" height=\"" + std::to_string(panel_height) +
           "\" fill=\"none\" stroke=\"#333\"/>\n";
    svg += "<text x=\"" + std::to_string(left + plot_w / 2) + "\" y=\"" + std::to_string(plot_bottom + 38) +
           "\" text-anchor=\"middle\">" + svg_escape(panel.x_label) + "</text>\n";
    svg += "<text transform=\"translate(" + std::to_string(left - 58) + "," + std::to_string(plot_top + panel_height / 2) +
           ") rotate(-90)\" text-anchor=\"middle\">" + svg_escape(panel.y_label) + "</text>\n";

    if (empty) {
      svg += "<text x=\"" + std::to_string(left + plot_w / 2) + "\" y=\"" + std::to_string(plot_top + panel_height / 2) +
             "\" text-anchor=\"middle\" fill=\"#888\">" + svg_escape(panel.empty_note) + "</text>\n";
    }

    // The series, clipped to the plot, and the legend in the top right corner.
    const std::string clip_id = "plot" + std::to_string(y0);
    // (4 pixels of slack, so a marker on the border shows whole.)
    svg += "<clipPath id=\"" + clip_id + "\"><rect x=\"" + std::to_string(left - 4) + "\" y=\"" +
           std::to_string(plot_top - 4) + "\" width=\"" + std::to_string(plot_w + 8) + "\" height=\"" +
           std::to_string(panel_height + 8) + "\"/></clipPath>\n";
    int legend = 0;
    const int legends = static_cast<int>(std::count_if(shown.begin(), shown.end(), [](const auto& v) { return !v.empty(); }));
    for (size_t i = 0; i < panel.series.size(); ++i) {
      const ChartSeries& s = panel.series[i];
      if (shown[i].empty()) continue;
      svg += "<g clip-path=\"url(#" + clip_id + ")\">";
      if (shown[i].size() > 1) {
        svg += "<polyline fill=\"none\" stroke=\"" + svg_escape(s.color) + "\" stroke-width=\"" + svg_number(s.width) +
               "\" stroke-linejoin=\"round\" points=\"";
        for (const auto& [x, y] : shown[i]) svg += svg_number(px(x)) + "," + svg_number(py(y)) + " ";
        svg.back() = '"';
        svg += "/>";
      }
      if (s.markers || shown[i].size() == 1)
        for (const auto& [x, y] : shown[i])
          svg += "<circle cx=\"" + svg_number(px(x)) + "\" cy=\"" + svg_number(py(y)) + "\" r=\"3\" fill=\"" +
                 svg_escape(s.color) + "\"/>";
      svg += "</g>\n";
      const int ly = panel.legend_bottom ? plot_bottom - 16 - 18 * (legends - 1 - legend) : plot_top + 16 + 18 * legend;
      ++legend;
      const int lx = left + plot_w - 230;
      svg += "<line x1=\"" + std::to_string(lx) + "\" y1=\"" + std::to_string(ly) + "\" x2=\"" + std::to_string(lx + 24) +
             "\" y2=\"" + std::to_string(ly) + "\" stroke=\"" + svg_escape(s.color) + "\" stroke-width=\"3\"/>" +
             "<text x=\"" + std::to_string(lx + 30) + "\" y=\"" + std::to_string(ly) +
             "\" dominant-baseline=\"middle\">" + svg_escape(s.label) + "</text>\n";
    }
    y0 = plot_bottom + gap_bottom;
  }
  return svg + "</svg>\n";
}

}  // namespace clip
