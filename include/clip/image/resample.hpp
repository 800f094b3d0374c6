// Pillow's Image.resize(size) with its default filter, BICUBIC, reproduced to the last bit.
//
// The algorithm (Pillow's libImaging/Resample.c, since Pillow 4; described in its docs as
// "convolution-based resampling with antialiasing"), reimplemented here:
//  * Separable: a horizontal pass over the input rows the vertical pass needs, then a vertical
//    pass; the intermediate image is rounded and clamped to 8 bits.
//  * Per output pixel i of an axis scaled by s = in/out: centre c = (i + 0.5) * s; when
//    shrinking the kernel is stretched by s (support 2s instead of 2), which is the antialiasing;
//    taps are inputs j in [int(c - support + 0.5), int(c + support + 0.5)), clamped to the image,
//    weight bicubic((j - c + 0.5) / max(s, 1)) with a = -0.5, then divided by their sum.
//  * Weights become fixed point with 22 fractional bits (32 - 8 - 2: eight bits of pixel, two
//    of headroom for the negative lobes), rounding half away from zero; each output is
//    (2^21 + sum pixel * weight) >> 22, clamped to 0..255.
//  * Modes: P and "1" are resized NEAREST (Pillow refuses to interpolate indices); LA and RGBA
//    are premultiplied by alpha first (Pillow converts to La/RGBa) and divided again after.
//
// resize() can return just a window of the result: every output pixel depends only on its own
// taps, so a resize followed by a crop computes only the pixels it keeps, bit-identically.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/image/image.hpp"

// The exact weights depend on the filter being evaluated without fused multiply-adds, as in
// Pillow's x86-64 builds; g++ fuses them in C++ whenever the target has FMA (-march=native).
#if defined(__clang__)
#define CLIP_NO_FP_CONTRACT _Pragma("clang fp contract(off)")
#define CLIP_NO_FP_CONTRACT_FN
#elif defined(__GNUC__)
#define CLIP_NO_FP_CONTRACT
#define CLIP_NO_FP_CONTRACT_FN [[gnu::optimize("fp-contract=off")]]
#else
#define CLIP_NO_FP_CONTRACT
#define CLIP_NO_FP_CONTRACT_FN
#endif

namespace clip::image {

// A rectangle of the resized image: the part resize() computes.
struct Window {
  int left = 0, top = 0, width = 0, height = 0;
};

namespace detail {

inline constexpr int kPrecisionBits = 32 - 8 - 2;

// Taps of one axis for the outputs [begin, end): input index of the first tap, the number of
// taps, and `taps` fixed-point weights per output (zero past `count`).
struct AxisWeights {
  int taps = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

CLIP_NO_FP_CONTRACT_FN inline double bicubic_kernel(double x) {
  CLIP_NO_FP_CONTRACT
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

CLIP_NO_FP_CONTRACT_FN inline AxisWeights bicubic_weights(int in_size, int out_size, int begin, int end) {
  CLIP_NO_FP_CONTRACT
  AxisWeights w;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);
  const double support = 2.0 * filter_scale;
  w.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  const int n = end - begin;
  w.first.resize(n);
  w.count.resize(n);
  w.weights.assign(static_cast<size_t>(n) * w.taps, 0);
  std::vector<double> k(w.taps);
  for (int i = 0; i < n; ++i) {
    const double center = (begin + i + 0.5) * scale;
    const double inv_filter_scale = 1.0 / filter_scale;
    int lo = static_cast<int>(center - support + 0.5);  // truncation, as Pillow's (int) cast
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    const int count = hi - lo;
    double sum = 0.0;
    for (int t = 0; t < count; ++t) {
      k[t] = bicubic_kernel((t + lo - center + 0.5) * inv_filter_scale);
      sum += k[t];
    }
    int32_t* out = &w.weights[static_cast<size_t>(i) * w.taps];
    for (int t = 0; t < count; ++t) {
      const double v = sum != 0.0 ? k[t] / sum : k[t];
      out[t] = static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    w.first[i] = lo;
    w.count[i] = count;
  }
  return w;
}

inline uint8_t clamp_fixed(int32_t sum) {
  const int32_t v = sum >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's table lookup
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

// Horizontal pass over `rows` rows: out row r = in row r filtered with `w` (C channels).
// Rows go through in blocks of R, transposed so that one sample of every row of the block is
// contiguous: the multiply-adds then vectorize across rows (4x faster than filtering one row
// at a time, where every output gathers its own few taps).
template <int C>
void filter_rows(const uint8_t* in, size_t in_stride, uint8_t* out, size_t out_stride, int rows,
                 const AxisWeights& w) {
  constexpr int R = 16;  // rows per block: one 512-bit vector of int32 sums
  const int outputs = static_cast<int>(w.first.size());
  const int col0 = w.first.front(), cols = w.first.back() + w.count.back() - col0;  // input columns read
  std::vector<uint8_t> block(static_cast<size_t>(cols) * C * R), result(static_cast<size_t>(outputs) * C * R);
  for (int r0 = 0; r0 < rows; r0 += R) {
    const int n = std::min(R, rows - r0);
    for (int r = 0; r < n; ++r) {
      const uint8_t* src = in + (r0 + r) * in_stride + static_cast<size_t>(col0) * C;
      for (int j = 0; j < cols * C; ++j) block[static_cast<size_t>(j) * R + r] = src[j];
    }
    for (int i = 0; i < outputs; ++i) {
      const int32_t* k = &w.weights[static_cast<size_t>(i) * w.taps];
      const uint8_t* base = &block[static_cast<size_t>(w.first[i] - col0) * C * R];
      for (int c = 0; c < C; ++c) {
        int32_t sum[R];
        for (int r = 0; r < R; ++r) sum[r] = 1 << (kPrecisionBits - 1);
        for (int t = 0, taps = w.count[i]; t < taps; ++t) {
          const uint8_t* s = base + static_cast<size_t>(t * C + c) * R;
          const int32_t kt = k[t];
          for (int r = 0; r < R; ++r) sum[r] += s[r] * kt;
        }
        uint8_t* dst = &result[static_cast<size_t>(i * C + c) * R];
        for (int r = 0; r < R; ++r) dst[r] = clamp_fixed(sum[r]);
      }
    }
    for (int r = 0; r < n; ++r) {
      uint8_t* dst = out + (r0 + r) * out_stride;
      for (int j = 0; j < outputs * C; ++j) dst[j] = result[static_cast<size_t>(j) * R + r];
    }
  }
}

// Vertical pass: out row i = sum over taps of in rows (first[i] - row0 + t), `bytes` per row.
inline void filter_columns(const uint8_t* in, size_t in_stride, int row0, uint8_t* out, size_t out_stride,
                           size_t bytes, const AxisWeights& w) {
  std::vector<int32_t> sum(bytes);
  const int outputs = static_cast<int>(w.first.size());
  for (int i = 0; i < outputs; ++i) {
    const int32_t* k = &w.weights[static_cast<size_t>(i) * w.taps];
    std::fill(sum.begin(), sum.end(), 1 << (kPrecisionBits - 1));
    for (int t = 0, n = w.count[i]; t < n; ++t) {
      const uint8_t* src = in + static_cast<size_t>(w.first[i] - row0 + t) * in_stride;
      const int32_t kt = k[t];
      int32_t* s = sum.data();
      for (size_t x = 0; x < bytes; ++x) s[x] += src[x] * kt;
    }
    uint8_t* dst = out + i * out_stride;
    for (size_t x = 0; x < bytes; ++x) dst[x] = clamp_fixed(sum[x]);
  }
}

inline void filter_rows_any(int channels, const uint8_t* in, size_t in_stride, uint8_t* out, size_t out_stride,
                            int rows, const AxisWeights& w) {
  switch (channels) {
    case 1: return filter_rows<1>(in, in_stride, out, out_stride, rows, w);
    case 2: return filter_rows<2>(in, in_stride, out, out_stride, rows, w);
    case 3: return filter_rows<3>(in, in_stride, out, out_stride, rows, w);
    default: return filter_rows<4>(in, in_stride, out, out_stride, rows, w);
  }
}

inline Image resize_bicubic(const Image& in, int width, int height, const Window& win) {
  const int c = in.channels();
  Image out(win.width, win.height, in.mode);
  if (win.width == 0 || win.height == 0) return out;
  // Pillow skips a pass whose axis keeps its size; the other pass then reads the input as is.
  const bool horizontal = width != in.width, vertical = height != in.height;
  const AxisWeights wy = bicubic_weights(in.height, height, win.top, win.top + win.height);
  if (!horizontal) {
    const size_t offset = static_cast<size_t>(win.left) * c;
    filter_columns(in.pixels.data() + offset, in.row_bytes(), 0, out.pixels.data(), out.row_bytes(),
                   out.row_bytes(), wy);
    return out;
  }
  const AxisWeights wx = bicubic_weights(in.width, width, win.left, win.left + win.width);
  if (!vertical) {
    filter_rows_any(c, in.row(win.top), in.row_bytes(), out.pixels.data(), out.row_bytes(), win.height, wx);
    return out;
  }
  const int row0 = wy.first.front();
  const int row1 = wy.first.back() + wy.count.back();
  std::vector<uint8_t> rows(static_cast<size_t>(row1 - row0) * out.row_bytes());
  filter_rows_any(c, in.row(row0), in.row_bytes(), rows.data(), out.row_bytes(), row1 - row0, wx);
  filter_columns(rows.data(), out.row_bytes(), row0, out.pixels.data(), out.row_bytes(), out.row_bytes(), wy);
  return out;
}

// Pillow's NEAREST resize (ImagingScaleAffine): the source coordinate starts at half a step
// and is advanced by repeated addition of the step in double precision, then truncated.
inline std::vector<int> nearest_sources(int in_size, int out_size, int begin, int end) {
  const double step = static_cast<double>(in_size) / out_size;
  double pos = step * 0.5;
  std::vector<int> sources;
  sources.reserve(end - begin);
  for (int i = 0; i < end; ++i, pos += step) {
    if (i < begin) continue;
    const int s = pos < 0.0 ? -1 : static_cast<int>(pos);
    sources.push_back(s >= 0 && s < in_size ? s : -1);  // -1: outside, Pillow fills with 0
  }
  return sources;
}

inline Image resize_nearest(const Image& in, int width, int height, const Window& win) {
  const int c = in.channels();
  Image out(win.width, win.height, in.mode);  // zero-filled, like Pillow's fill for misses
  const std::vector<int> xs = nearest_sources(in.width, width, win.left, win.left + win.width);
  const std::vector<int> ys = nearest_sources(in.height, height, win.top, win.top + win.height);
  for (int y = 0; y < win.height; ++y) {
    if (ys[y] < 0) continue;
    const uint8_t* src = in.row(ys[y]);
    uint8_t* dst = out.row(y);
    for (int x = 0; x < win.width; ++x)
      if (xs[x] >= 0) std::copy_n(src + static_cast<size_t>(xs[x]) * c, c, dst + static_cast<size_t>(x) * c);
  }
  return out;
}

// Pillow's RGBA -> RGBa (and LA -> La): colour times alpha / 255, rounded (MULDIV255).
inline Image premultiply(const Image& in) {
  Image out = in;
  const int c = in.channels();
  for (size_t i = 0; i < out.pixels.size(); i += c)
    for (int ch = 0; ch < c - 1; ++ch) out.pixels[i + ch] = static_cast<uint8_t>(muldiv255(in.pixels[i + ch], in.pixels[i + c - 1]));
  return out;
}

// Pillow's RGBa -> RGBA: colour * 255 / alpha truncated and clamped; alpha 0 and 255 keep it.
inline void unpremultiply(Image& image) {
  const int c = image.channels();
  for (size_t i = 0; i < image.pixels.size(); i += c) {
    const unsigned alpha = image.pixels[i + c - 1];
    if (alpha == 0 || alpha == 255) continue;
    for (int ch = 0; ch < c - 1; ++ch)
      image.pixels[i + ch] = static_cast<uint8_t>(std::min(255u, 255u * image.pixels[i + ch] / alpha));
  }
}

}  // namespace detail

// The `window` of Pillow's image.resize((width, height)) (BICUBIC, or NEAREST for P and "1"),
// in the image's own mode.
inline Image resize(const Image& image, int width, int height, const Window& window) {
  CLIP_CHECK(width > 0 && height > 0, "cannot resize an image to ", width, "x", height);
  CLIP_CHECK(image.width > 0 && image.height > 0, "cannot resize an empty ", image.width, "x", image.height,
             " image");
  CLIP_CHECK(window.left >= 0 && window.top >= 0 && window.width >= 0 && window.height >= 0 &&
                 window.left + window.width <= width && window.top + window.height <= height,
             "resize window (", window.left, ", ", window.top, ", ", window.width, "x", window.height,
             ") does not lie inside the ", width, "x", height, " result");
  if (width == image.width && height == image.height)  // Pillow copies instead of resampling
    return crop(image, window.left, window.top, window.width, window.height);
  switch (image.mode) {
    case Mode::P: case Mode::Bilevel:
      return detail::resize_nearest(image, width, height, window);
    case Mode::LA: case Mode::RGBA: {
      Image out = detail::resize_bicubic(detail::premultiply(image), width, height, window);
      detail::unpremultiply(out);
      return out;
    }
    default:
      return detail::resize_bicubic(image, width, height, window);
  }
}

inline Image resize(const Image& image, int width, int height) {
  return resize(image, width, height, Window{0, 0, width, height});
}

}  // namespace clip::image

#undef CLIP_NO_FP_CONTRACT
#undef CLIP_NO_FP_CONTRACT_FN
