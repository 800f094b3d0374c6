// The training-time image transform. The paper's only augmentation is "a random square crop from
// resized images"; this implements it as one crop and one resample:
//   1. a square side s drawn uniformly among the integers in [ceil(min_crop_scale * short), short]
//      (short: the image's shorter side), then its left and top uniformly among the positions
//      that keep the square inside the image;
//   2. the square resized to n x n with the Pillow-exact resample (image/resample.hpp, BICUBIC
//      with antialiasing; NEAREST for palette and bilevel images), in the image's own mode;
//   3. convert("RGB") (gray is replicated, alpha dropped), then optionally a translation by
//      (dx, dy), each uniform in [-max_shift, max_shift], with black filling what moves in;
//   4. ToTensor + Normalize with CLIP's mean and std: float32 [3, n, n].
// Resizing the shorter side to n and then cropping a random square of side s * n / short would
// be the same up to resampling; cropping first needs one resample instead of two and matches
// torchvision's crop-then-resize order. With min_crop_scale = 1 the square is the largest one,
// at a random place along the longer side.
//
// Without augmentation the transform is CLIP's evaluation preprocessing exactly (resize the
// shorter side to n, centre crop; image/preprocess.hpp), so a model trained here is evaluated
// on the inputs it saw. The random draws, in order: s, left, top, then dx, dy when shifting.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "clip/core/error.hpp"
#include "clip/data/random.hpp"
#include "clip/image/image.hpp"
#include "clip/image/preprocess.hpp"
#include "clip/image/resample.hpp"

namespace clip::data {

struct AugmentOptions {
  bool enabled = true;          // false: CLIP's centre-crop preprocessing, no randomness
  float min_crop_scale = 0.8f;  // the smallest square side, as a fraction of the shorter side
  int max_shift = 0;            // then a translation by up to this many output pixels (0: none)
};

// A square of the input image, in its pixels.
struct SquareCrop {
  int left = 0, top = 0, side = 0;
};

inline SquareCrop random_square_crop(int width, int height, float min_crop_scale, Rng& rng) {
  CLIP_CHECK(width > 0 && height > 0, "cannot crop an empty ", width, "x", height, " image");
  CLIP_CHECK(min_crop_scale > 0.0f && min_crop_scale <= 1.0f, "the smallest crop scale must lie in (0, 1], not ",
             min_crop_scale);
  const int shorter = std::min(width, height);
  // The tolerance keeps a float scale such as 0.8f (0.80000001) from rounding 0.8 * 5 up to 5.
  const int smallest = std::clamp(static_cast<int>(std::ceil(double{min_crop_scale} * shorter - 1e-6)), 1, shorter);
  SquareCrop c;
  c.side = smallest + static_cast<int>(rng.below(static_cast<uint64_t>(shorter - smallest + 1)));
  c.left = static_cast<int>(rng.below(static_cast<uint64_t>(width - c.side + 1)));
  c.top = static_cast<int>(rng.below(static_cast<uint64_t>(height - c.side + 1)));
  return c;
}

// The image moved by (dx, dy) pixels (right, down); uncovered pixels are 0.
inline image::Image shift(const image::Image& in, int dx, int dy) {
  image::Image out(in.width, in.height, in.mode);
  const int c = in.channels();
  const int x0 = std::max(0, dx), x1 = std::min(in.width, in.width + dx);
  for (int y = std::max(0, dy); y < std::min(in.height, in.height + dy); ++y)
    if (x1 > x0)
      std::copy_n(in.row(y - dy) + static_cast<size_t>(x0 - dx) * c, static_cast<size_t>(x1 - x0) * c,
                  out.row(y) + static_cast<size_t>(x0) * c);
  return out;
}

// Steps 1-3: the n x n RGB bytes.
inline image::Image augment_rgb8(const image::Image& input, int n, const AugmentOptions& options, Rng& rng) {
  CLIP_CHECK(n > 0, "the training resolution must be positive, not ", n);
  CLIP_CHECK(options.max_shift >= 0, "the largest shift must not be negative, not ", options.max_shift);
  if (!options.enabled) return image::clip_transform_rgb8(input, n);
  const SquareCrop c = random_square_crop(input.width, input.height, options.min_crop_scale, rng);
  image::Image out = image::to_rgb(image::resize(image::crop(input, c.left, c.top, c.side, c.side), n, n));
  if (options.max_shift > 0) {
    const uint64_t span = 2 * static_cast<uint64_t>(options.max_shift) + 1;
    const int dx = static_cast<int>(rng.below(span)) - options.max_shift;
    const int dy = static_cast<int>(rng.below(span)) - options.max_shift;
    if (dx || dy) out = shift(out, dx, dy);
  }
  return out;
}

// The whole transform into `out`: 3 * n * n floats, CHW, CLIP-normalised.
inline void augment(const image::Image& input, int n, const AugmentOptions& options, Rng& rng, std::span<float> out) {
  image::normalize_clip(augment_rgb8(input, n, options, rng), out);
}

}  // namespace clip::data
