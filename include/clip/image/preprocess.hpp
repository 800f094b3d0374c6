// CLIP's image preprocessing, exactly as OpenAI's clip._transform(n) computes it with
// torchvision 0.14 and Pillow 9.4:
//   Resize(n, BICUBIC)  shorter side -> n, longer -> int(n * long / short); no-op at that size
//   CenterCrop(n)       offsets int(round((size - n) / 2)), Python's round half to even
//   convert("RGB")      last, so resizing happens in the image's own mode (see resample.hpp)
//   ToTensor            x / 255 in float32, CHW
//   Normalize           (x - mean) / std per channel, float32
// Everything before ToTensor is 8-bit, so clip_transform_rgb8() gives the exact bytes and the
// floats follow from them through a 256-entry table per channel.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/image/image.hpp"
#include "clip/image/resample.hpp"

namespace clip::image {

inline constexpr std::array<float, 3> kClipMean{0.48145466f, 0.4578275f, 0.40821073f};
inline constexpr std::array<float, 3> kClipStd{0.26862954f, 0.26130258f, 0.27577711f};

// Where the n x n crop comes from: the size Resize(n) gives and the crop offsets in it.
struct TransformPlan {
  int resized_width = 0, resized_height = 0;
  bool resize_skipped = false;  // the image already had the resized size
  int crop_left = 0, crop_top = 0;
};

namespace detail {
// int(round(d / 2)) for d >= 0 with ties to even, as Python 3's round().
inline constexpr int half_rounded_to_even(int d) {
  const int q = d / 2;
  return d % 2 == 0 ? q : q + (q % 2);
}
}  // namespace detail

inline TransformPlan plan_clip_transform(int width, int height, int n) {
  CLIP_CHECK(n > 0, "the preprocessing size must be positive, not ", n);
  CLIP_CHECK(width > 0 && height > 0, "cannot preprocess an empty ", width, "x", height, " image");
  const int64_t shorter = std::min(width, height), longer = std::max(width, height);
  // Python's int(n * long / short): exact product, correctly rounded division, truncation.
  const double scaled = static_cast<double>(int64_t{n} * longer) / static_cast<double>(shorter);
  CLIP_CHECK(scaled < 2147483647.0, "a ", width, "x", height, " image cannot be resized to ", n, " pixels");
  const int resized_longer = static_cast<int>(scaled);
  TransformPlan plan;
  plan.resized_width = width <= height ? n : resized_longer;
  plan.resized_height = width <= height ? resized_longer : n;
  plan.resize_skipped = plan.resized_width == width && plan.resized_height == height;
  plan.crop_left = detail::half_rounded_to_even(plan.resized_width - n);
  plan.crop_top = detail::half_rounded_to_even(plan.resized_height - n);
  return plan;
}

// The n x n RGB bytes of _transform(n) before ToTensor.
inline Image clip_transform_rgb8(const Image& image, int n) {
  const TransformPlan plan = plan_clip_transform(image.width, image.height, n);
  const Window crop_window{plan.crop_left, plan.crop_top, n, n};
  return to_rgb(resize(image, plan.resized_width, plan.resized_height, crop_window));
}

// ToTensor + Normalize of RGB bytes into `out` (CHW, 3 * width * height floats). Each value is
// float32 (x / 255 - mean) / std, in the same operations and order as torchvision's.
inline void normalize_clip(const Image& rgb, std::span<float> out) {
  CLIP_CHECK(rgb.mode == Mode::RGB, "normalize_clip expects an RGB image, not mode ", mode_name(rgb.mode));
  const size_t plane = static_cast<size_t>(rgb.width) * static_cast<size_t>(rgb.height);
  CLIP_CHECK(out.size() == 3 * plane, "normalize_clip needs ", 3 * plane, " floats of output, not ", out.size());
  static const auto table = [] {
    std::array<std::array<float, 256>, 3> t{};
    for (int c = 0; c < 3; ++c)
      for (int v = 0; v < 256; ++v) {
        // volatile: the three float32 roundings must happen as written, never fused or folded.
        volatile float scaled = static_cast<float>(v) / 255.0f;
        volatile float centred = scaled - kClipMean[c];
        t[c][v] = centred / kClipStd[c];
      }
    return t;
  }();
  const uint8_t* p = rgb.pixels.data();
  for (size_t i = 0; i < plane; ++i, p += 3) {
    out[i] = table[0][p[0]];
    out[plane + i] = table[1][p[1]];
    out[2 * plane + i] = table[2][p[2]];
  }
}

// _transform(n)(image): float32 [3, n, n], channel-major.
inline std::vector<float> clip_preprocess(const Image& image, int n) {
  const Image rgb = clip_transform_rgb8(image, n);
  std::vector<float> out(static_cast<size_t>(3) * n * n);
  normalize_clip(rgb, out);
  return out;
}

}  // namespace clip::image
