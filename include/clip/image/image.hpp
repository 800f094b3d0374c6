// An 8-bit image with Pillow's notion of a mode. The mode matters beyond the channel count:
// Pillow resizes palette and bilevel images with NEAREST, alpha images premultiplied, and
// converts to RGB only after resizing, so CLIP's preprocessing must know what it was given.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"

namespace clip::image {

enum class Mode {
  L,        // grayscale
  LA,       // grayscale + alpha
  RGB,
  RGBA,
  P,        // palette; see Image::pixels
  Bilevel,  // Pillow's "1": black/white stored as 0/255
  CMYK,     // JPEG CMYK, already un-inverted (Pillow reads Adobe files as "CMYK;I")
};

inline constexpr int channels_of(Mode mode) {
  switch (mode) {
    case Mode::L: case Mode::Bilevel: return 1;
    case Mode::LA: return 2;
    case Mode::RGB: case Mode::P: return 3;
    case Mode::RGBA: case Mode::CMYK: return 4;
  }
  return 0;
}

inline constexpr std::string_view mode_name(Mode mode) {
  switch (mode) {
    case Mode::L: return "L";
    case Mode::LA: return "LA";
    case Mode::RGB: return "RGB";
    case Mode::RGBA: return "RGBA";
    case Mode::P: return "P";
    case Mode::Bilevel: return "1";
    case Mode::CMYK: return "CMYK";
  }
  return "?";
}

inline std::ostream& operator<<(std::ostream& out, Mode mode) { return out << mode_name(mode); }

// Pixels are row-major and interleaved, channels_of(mode) bytes each, rows not padded.
//
// A P image holds its palette colours (RGB), not indices. Pillow only ever picks whole pixels
// of a P image (NEAREST resize, crop) before convert("RGB") looks the indices up, and picking
// then looking up equals looking up then picking; decoders expand palettes anyway.
struct Image {
  int width = 0;
  int height = 0;
  Mode mode = Mode::RGB;
  std::vector<uint8_t> pixels;

  Image() = default;
  Image(int w, int h, Mode m) : width(w), height(h), mode(m) {
    CLIP_CHECK(w >= 0 && h >= 0, "image size ", w, "x", h, " is negative");
    pixels.resize(static_cast<size_t>(w) * static_cast<size_t>(h) * static_cast<size_t>(channels_of(m)));
  }

  int channels() const { return channels_of(mode); }
  size_t row_bytes() const { return static_cast<size_t>(width) * static_cast<size_t>(channels()); }
  uint8_t* row(int y) { return pixels.data() + static_cast<size_t>(y) * row_bytes(); }
  const uint8_t* row(int y) const { return pixels.data() + static_cast<size_t>(y) * row_bytes(); }
};

// The w x h rectangle at (left, top), like PIL's Image.crop on a box inside the image.
inline Image crop(const Image& image, int left, int top, int w, int h) {
  CLIP_CHECK(left >= 0 && top >= 0 && w >= 0 && h >= 0 && left + w <= image.width && top + h <= image.height,
             "crop box (", left, ", ", top, ", ", w, "x", h, ") does not lie inside the ", image.width, "x",
             image.height, " image");
  Image out(w, h, image.mode);
  const size_t offset = static_cast<size_t>(left) * static_cast<size_t>(image.channels());
  for (int y = 0; y < h; ++y) {
    const uint8_t* src = image.row(top + y) + offset;
    std::copy(src, src + out.row_bytes(), out.row(y));
  }
  return out;
}

namespace detail {
// Pillow's rounding x*y/255 (Convert.c MULDIV255), exact for 8-bit operands.
inline constexpr unsigned muldiv255(unsigned a, unsigned b) {
  unsigned t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}
}  // namespace detail

// Pillow's convert("RGB"): alpha is dropped without compositing, gray is replicated, CMYK uses
// Pillow's cmyk2rgb (RGB = (255-K) - C*(255-K)/255 per channel).
inline Image to_rgb(const Image& image) {
  if (image.mode == Mode::RGB) return image;
  Image out(image.width, image.height, Mode::RGB);
  const size_t n = static_cast<size_t>(image.width) * static_cast<size_t>(image.height);
  const uint8_t* in = image.pixels.data();
  uint8_t* o = out.pixels.data();
  const int c = image.channels();
  switch (image.mode) {
    case Mode::L: case Mode::LA: case Mode::Bilevel:
      for (size_t i = 0; i < n; ++i, in += c, o += 3) o[0] = o[1] = o[2] = in[0];
      break;
    case Mode::RGBA: case Mode::P:
      for (size_t i = 0; i < n; ++i, in += c, o += 3) o[0] = in[0], o[1] = in[1], o[2] = in[2];
      break;
    case Mode::CMYK:
      for (size_t i = 0; i < n; ++i, in += 4, o += 3) {
        const unsigned not_k = 255u - in[3];
        for (int ch = 0; ch < 3; ++ch) o[ch] = static_cast<uint8_t>(not_k - detail::muldiv255(in[ch], not_k));
      }
      break;
    case Mode::RGB: break;
  }
  return out;
}

}  // namespace clip::image
