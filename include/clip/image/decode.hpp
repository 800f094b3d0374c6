// Decoding image files into clip::image::Image, in the mode Pillow 9.4 would open them in.
//
// JPEG goes through libjpeg-turbo (TurboJPEG API) with libjpeg's defaults, accurate integer IDCT
// and fancy upsampling: that is what Pillow's JPEG decoder asks of the same library, so the
// pixels are bit for bit Pillow's (stb_image's own JPEG decoder differs by a level or two).
// PNG, BMP and GIF go through stb_image; the mode comes from the file header, read here,
// because stb_image expands palettes and that must not change how the image is resized.
//
// Checked against Pillow 9.4.0 beyond the golden images (then through the whole preprocessing,
// every byte equal): gray, CMYK, progressive, 4:4:4, 4:2:2 JPEGs; PNGs in 1/2-bit gray,
// 4-bit palette, palette with tRNS, LA, 16-bit RGB/RGBA/LA, gray with tRNS; BMPs in 1/4/8-bit
// palette, 8-bit gray ramp, 16-bit 555/565, 24-bit, 32-bit with and without alpha bitfields;
// GIFs with colour, gray-ramp and transparent palettes.
//
// Deliberate differences from Pillow:
//  * 16-bit grayscale PNG: Pillow opens it as mode "I", whose convert("RGB") clips every value
//    above 255 to white; here it keeps its high byte, like the 16-bit colour PNGs Pillow reads.
//  * GIF: only the first frame, as Pillow's first frame; pixels outside that frame's rectangle
//    may differ when the file names a background colour (stb_image paints it there).
//  * RLE-compressed BMPs are rejected (stb_image cannot read them; Pillow can); 16-bit BMP
//    bitfields other than 555/565, which Pillow rejects, are read.
//  * Progressive JPEGs with more scans than libjpeg-turbo's sanity limit are rejected.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <stb_image.h>
#include <turbojpeg.h>

#include "clip/core/checked_math.hpp"
#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"
#include "clip/image/image.hpp"

namespace clip::image {

// Pillow's decompression-bomb limit (core/limits.hpp), checked against the header before any
// pixel memory is allocated.
inline constexpr int64_t kMaxImagePixels = limits::kMaxImagePixels;

namespace detail {

template <class... Parts>
[[noreturn]] void bad_image(std::string_view name, const Parts&... parts) {
  CLIP_FAIL("cannot read image '", name, "': ", parts...);
}

inline uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
inline uint32_t le32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
inline uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Headers give up to 32 bits per side: their product is checked, as it can overflow even int64.
inline void check_dimensions(std::string_view name, int64_t width, int64_t height) {
  if (width <= 0 || height <= 0) bad_image(name, "the header gives an empty size ", width, "x", height);
  const std::optional<int64_t> pixels = checked_mul(width, height);
  if (!pixels || *pixels > kMaxImagePixels)
    bad_image(name, "the header claims ", width, "x", height, " pixels, more than the limit of ", kMaxImagePixels,
              " (Pillow's, against decompression bombs)");
}

// stb_image decodes to `channels` bytes per pixel: it drops or adds alpha and expands palettes
// as asked, takes the high byte of 16-bit samples, and scales 1/2/4-bit gray to 0..255, all as
// Pillow's unpackers do for the modes chosen by the callers.
inline Image stb_decode(std::span<const uint8_t> bytes, std::string_view name, std::string_view format, Mode mode,
                        int expected_width, int expected_height) {
  int w = 0, h = 0, in_file = 0;
  const int channels = channels_of(mode);
  std::unique_ptr<stbi_uc, void (*)(void*)> data(
      stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &in_file, channels),
      stbi_image_free);
  if (!data) {
    const char* reason = stbi_failure_reason();
    bad_image(name, "corrupt or truncated ", format, " data (stb_image: ", reason && *reason ? reason : "no detail", ")");
  }
  if (w != expected_width || h != expected_height)
    bad_image(name, "the ", format, " decoder gave ", w, "x", h, " pixels for a ", expected_width, "x",
              expected_height, " header");
  Image image(w, h, mode);
  std::memcpy(image.pixels.data(), data.get(), image.pixels.size());
  return image;
}

inline Image decode_png(std::span<const uint8_t> b, std::string_view name) {
  // Signature (8), then the IHDR chunk: length, "IHDR", width, height, depth, colour type, ...
  if (b.size() < 33 || std::memcmp(b.data() + 12, "IHDR", 4) != 0)
    bad_image(name, "truncated PNG header (", b.size(), " bytes, no complete IHDR chunk)");
  const int64_t width = be32(b.data() + 16), height = be32(b.data() + 20);
  const int depth = b[24], color_type = b[25];
  check_dimensions(name, width, height);
  Mode mode;
  switch (color_type) {
    case 0: mode = depth == 1 ? Mode::Bilevel : Mode::L; break;
    case 2: mode = Mode::RGB; break;
    case 3: mode = Mode::P; break;  // tRNS alpha is ignored: convert("RGB") drops it
    case 4: mode = Mode::LA; break;
    case 6: mode = Mode::RGBA; break;
    default: bad_image(name, "invalid PNG colour type ", color_type);
  }
  return stb_decode(b, name, "PNG", mode, static_cast<int>(width), static_cast<int>(height));
}

// What Pillow takes from a GIF before its first frame's pixels: the frame's colour table (local,
// else global) and the transparent index of the graphic control extension before it.
struct GifFrameInfo {
  const uint8_t* palette = nullptr;
  size_t colors = 0;
  int transparent = -1;
};

inline GifFrameInfo gif_first_frame(std::span<const uint8_t> b) {
  GifFrameInfo info;
  auto table_colors = [](uint8_t flags) { return size_t{1} << ((flags & 7) + 1); };
  size_t pos = 13;
  if (b[10] & 0x80) {
    info.colors = table_colors(b[10]);
    info.palette = b.data() + pos;
    pos += 3 * info.colors;
  }
  while (pos + 10 <= b.size()) {
    if (b[pos] == 0x2C) {  // image descriptor
      const uint8_t flags = b[pos + 9];
      if ((flags & 0x80) && pos + 10 + 3 * table_colors(flags) <= b.size()) {
        info.colors = table_colors(flags);
        info.palette = b.data() + pos + 10;
      }
      break;
    }
    if (b[pos] != 0x21) break;  // neither an extension: stb_image reports what is wrong
    if (b[pos + 1] == 0xF9 && b[pos + 2] == 4 && (b[pos + 3] & 1)) info.transparent = b[pos + 6];
    pos += 2;  // then data sub-blocks, each with a length byte, up to an empty one
    while (pos < b.size() && b[pos] != 0) pos += b[pos] + size_t{1};
    ++pos;
  }
  if (info.palette && info.palette + 3 * info.colors > b.data() + b.size()) info = {};
  return info;
}

// Pillow opens a GIF's first frame as P, or as L when its colour table is missing or exactly
// the gray ramp (index = level). Transparent pixels keep their index, so their colour is the
// palette's, which convert("RGB") shows.
inline Image decode_gif(std::span<const uint8_t> b, std::string_view name) {
  if (b.size() < 13) bad_image(name, "truncated GIF header (", b.size(), " bytes)");
  const int width = le16(b.data() + 6), height = le16(b.data() + 8);  // the logical screen
  check_dimensions(name, width, height);
  const GifFrameInfo frame = gif_first_frame(b);
  bool gray_ramp = true;
  for (size_t i = 0; i < frame.colors && gray_ramp; ++i)
    gray_ramp = frame.palette[3 * i] == i && frame.palette[3 * i + 1] == i && frame.palette[3 * i + 2] == i;
  const Image rgba = stb_decode(b, name, "GIF", Mode::RGBA, width, height);
  // stb_image leaves alpha 0 where the frame is transparent and where it did not paint; Pillow
  // has the transparent index there, or index 0 when there is none.
  const int blank = frame.transparent >= 0 ? frame.transparent : 0;
  uint8_t blank_colour[3] = {0, 0, 0};
  if (static_cast<size_t>(blank) < frame.colors) std::memcpy(blank_colour, frame.palette + 3 * blank, 3);
  else if (gray_ramp) blank_colour[0] = blank_colour[1] = blank_colour[2] = static_cast<uint8_t>(blank);
  Image image(width, height, gray_ramp ? Mode::L : Mode::P);
  const int c = image.channels();
  for (size_t i = 0, n = static_cast<size_t>(width) * height; i < n; ++i) {
    const uint8_t* in = &rgba.pixels[4 * i];
    const uint8_t* colour = in[3] == 0 ? blank_colour : in;
    std::memcpy(&image.pixels[c * i], colour, c);
  }
  return image;
}

// Pillow's BMP modes: palette files are P, unless the palette is the identity gray ramp (8-bit:
// L) or black and white (1-bit: "1"); 32-bit files are RGBA only when a bitfield gives alpha.
inline Image decode_bmp(std::span<const uint8_t> b, std::string_view name) {
  if (b.size() < 26) bad_image(name, "truncated BMP header (", b.size(), " bytes)");
  const uint32_t header_size = le32(b.data() + 14);
  int64_t width, height;
  int bits;
  uint32_t compression = 0, colors_used = 0;
  size_t palette_entry = 4;
  if (header_size == 12) {  // OS/2 BITMAPCOREHEADER
    width = le16(b.data() + 18);
    height = le16(b.data() + 20);
    bits = le16(b.data() + 24);
    palette_entry = 3;
  } else {
    if (header_size < 40 || b.size() < 54) bad_image(name, "truncated or unknown BMP header");
    width = static_cast<int32_t>(le32(b.data() + 18));
    height = static_cast<int32_t>(le32(b.data() + 22));
    bits = le16(b.data() + 28);
    compression = le32(b.data() + 30);
    colors_used = le32(b.data() + 46);
  }
  if (height < 0) height = -height;  // top-down rows
  check_dimensions(name, width, height);
  if (compression == 0 || compression == 3) {
    // Uncompressed rows, each padded to 4 bytes (the last one's padding may be missing): a file
    // shorter than them is truncated, as Pillow says. stb_image would read zeros past the end,
    // so a few hundred bytes could stand for 60 megapixels (found by tests/fuzz/fuzz_image).
    const int64_t row_bytes = (width * bits + 31) / 32 * 4, last_row = (width * bits + 7) / 8;
    const std::optional<int64_t> rows = checked_mul(row_bytes, height - 1);
    const int64_t pixels_at = le32(b.data() + 10);
    const std::optional<int64_t> end =
        rows ? checked_add(*rows + last_row, pixels_at) : std::nullopt;
    if (!end || *end > static_cast<int64_t>(b.size()))
      bad_image(name, "truncated BMP data: ", width, "x", height, " pixels of ", bits, " bits need ",
                rows ? std::to_string(*rows + last_row) : std::string("more"), " bytes from byte ", pixels_at,
                ", the file has ", b.size());
  }
  Mode mode = Mode::RGB;
  if (bits <= 8) {
    const size_t colors = colors_used ? colors_used : size_t{1} << bits;
    const size_t palette_at = 14 + size_t{header_size};
    if (colors > 256 || b.size() < palette_at + colors * palette_entry) bad_image(name, "truncated BMP palette");
    auto gray_entry = [&](size_t index, unsigned value) {
      const uint8_t* e = b.data() + palette_at + index * palette_entry;
      return e[0] == value && e[1] == value && e[2] == value;
    };
    bool ramp = true;
    if (bits == 1 && colors == 2) {
      ramp = gray_entry(0, 0) && gray_entry(1, 255);
      mode = ramp ? Mode::Bilevel : Mode::P;
    } else {
      for (size_t i = 0; i < colors && ramp; ++i) ramp = gray_entry(i, static_cast<unsigned>(i));
      mode = ramp && bits == 8 ? Mode::L : Mode::P;
    }
  } else if (bits == 32 && compression == 3 && header_size >= 56 && b.size() >= 70) {
    mode = le32(b.data() + 14 + 52) != 0 ? Mode::RGBA : Mode::RGB;  // the alpha bitfield
  }
  Image image = stb_decode(b, name, "BMP", mode, static_cast<int>(width), static_cast<int>(height));
  if (bits == 16) {
    // 5- and 6-bit samples: stb_image widens them by bit replication, Pillow as v * 255 / max.
    // Both keep v in the top bits, so the value is recovered and widened Pillow's way.
    const bool green6 = compression == 3 && b.size() >= 62 && le32(b.data() + 58) == 0x7E0;
    for (size_t i = 0; i < image.pixels.size(); ++i) {
      const bool six = green6 && i % 3 == 1;
      const unsigned v = image.pixels[i] >> (six ? 2 : 3);
      image.pixels[i] = static_cast<uint8_t>(v * 255 / (six ? 63 : 31));
    }
  }
  return image;
}

// True when libjpeg decodes the file in a single pass over one Huffman-coded scan holding every
// component (sequential SOF0/SOF1): only then does Pillow finish without reading the end marker.
inline bool jpeg_is_single_huffman_scan(std::span<const uint8_t> b) {
  int components = -1;
  size_t i = 2;
  while (i + 4 <= b.size()) {
    if (b[i] != 0xFF) return false;
    const uint8_t marker = b[i + 1];
    if (marker == 0xFF) { ++i; continue; }  // fill byte
    const size_t length = (size_t{b[i + 2]} << 8) | b[i + 3];
    if (marker == 0xC0 || marker == 0xC1) {
      if (i + 10 > b.size()) return false;
      components = b[i + 9];
    } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      return false;  // progressive, lossless or arithmetic-coded
    } else if (marker == 0xDA) {
      return components > 0 && i + 5 <= b.size() && b[i + 4] == components;
    }
    i += 2 + length;
  }
  return false;
}

inline Image decode_jpeg(std::span<const uint8_t> b, std::string_view name) {
  std::unique_ptr<void, int (*)(tjhandle)> tj(tjInitDecompress(), tjDestroy);
  if (!tj) bad_image(name, "cannot start the JPEG decoder: ", tjGetErrorStr2(nullptr));
  unsigned char* data = const_cast<unsigned char*>(b.data());  // TurboJPEG 2.x is not const-correct
  int width = 0, height = 0, subsampling = 0, colorspace = 0;
  if (tjDecompressHeader3(tj.get(), data, b.size(), &width, &height, &subsampling, &colorspace) != 0)
    bad_image(name, "corrupt JPEG header (", tjGetErrorStr2(tj.get()), ")");
  // libjpeg reads a header cut short as one without a frame: TurboJPEG then reports 0 x 0.
  if (width <= 0 || height <= 0) bad_image(name, "corrupt or truncated JPEG header (no frame size)");
  check_dimensions(name, width, height);
  Mode mode = Mode::RGB;
  int format = TJPF_RGB;
  if (colorspace == TJCS_GRAY) mode = Mode::L, format = TJPF_GRAY;
  if (colorspace == TJCS_CMYK || colorspace == TJCS_YCCK) mode = Mode::CMYK, format = TJPF_CMYK;
  Image image(width, height, mode);
  // TJFLAG_ACCURATEDCT is TurboJPEG's decoding default anyway (libjpeg's JDCT_ISLOW, as in
  // Pillow); LIMITSCANS rejects progressive files built to take minutes to decode.
  const int flags = TJFLAG_ACCURATEDCT | TJFLAG_LIMITSCANS;
  if (tjDecompress2(tj.get(), data, b.size(), image.pixels.data(), width, 0, height, format, flags) != 0) {
    const std::string message = tjGetErrorStr2(tj.get());
    const bool fatal = tjGetErrorCode(tj.get()) == TJERR_FATAL;
    // Pillow ignores libjpeg's warnings (corrupt-data notes the decoder recovers from) but
    // fails when the data ends early, which libjpeg reports as the warning JWRN_JPEG_EOF...
    bool ended_early = message.find("Premature end") != std::string::npos;
    if (ended_early && !fatal && jpeg_is_single_huffman_scan(b)) {
      // ...unless every row was decoded before the end: Pillow stops without the end marker.
      // Decoding again with the marker supplied tells: scan data that ends early now meets the
      // marker mid-scan, which libjpeg warns about, and this time a warning stops the decoder.
      std::vector<uint8_t> completed(b.begin(), b.end());
      completed.push_back(0xFF);
      completed.push_back(0xD9);
      ended_early = tjDecompress2(tj.get(), completed.data(), completed.size(), image.pixels.data(), width, 0,
                                  height, format, flags | TJFLAG_STOPONWARNING) != 0;
    }
    if (fatal || ended_early) bad_image(name, "corrupt or truncated JPEG data (", message, ")");
  }
  if (mode == Mode::CMYK)  // Pillow reads every CMYK JPEG as Adobe's inverted "CMYK;I"
    for (uint8_t& v : image.pixels) v = static_cast<uint8_t>(255 - v);
  return image;
}

}  // namespace detail

// Decodes a JPEG, PNG, BMP or GIF (first frame) held in memory; `name` is what errors call it.
inline Image decode(std::span<const uint8_t> bytes, std::string_view name = "<memory>") {
  if (bytes.empty()) detail::bad_image(name, "the file is empty");
  if (bytes.size() > static_cast<size_t>(limits::kMaxImageFileBytes))
    detail::bad_image(name, "the file is larger than the limit of ", limits::kMaxImageFileBytes, " bytes");
  auto starts_with = [&](std::string_view magic) {
    return bytes.size() >= magic.size() && std::memcmp(bytes.data(), magic.data(), magic.size()) == 0;
  };
  if (starts_with("\xFF\xD8\xFF")) return detail::decode_jpeg(bytes, name);
  if (starts_with("\x89PNG\r\n\x1A\n")) return detail::decode_png(bytes, name);
  if (starts_with("GIF87a") || starts_with("GIF89a")) return detail::decode_gif(bytes, name);
  if (starts_with("BM")) return detail::decode_bmp(bytes, name);
  detail::bad_image(name, "not a JPEG, PNG, BMP or GIF file");
}

inline Image decode_file(const std::filesystem::path& path) {
  const std::string name = path.string();
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) detail::bad_image(name, "it is a directory");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) detail::bad_image(name, "cannot open the file (", std::strerror(errno), ")");
  const std::streamoff size = in.tellg();
  if (size < 0) detail::bad_image(name, "cannot determine the file size");
  if (size > limits::kMaxImageFileBytes)
    detail::bad_image(name, "the file is larger than the limit of ", limits::kMaxImageFileBytes, " bytes");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(bytes.data()), size)) detail::bad_image(name, "read error");
  return decode(bytes, name);
}

}  // namespace clip::image
