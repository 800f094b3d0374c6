// UTF-8 for the tokenizers: checking input, stepping through code points, and decoding token
// bytes the way Python's bytes.decode("utf-8", errors="replace") does.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "clip/core/error.hpp"

namespace clip::text::utf8 {

// The outcome of reading one sequence: how many bytes it spans and whether they form a code
// point. An ill-formed sequence spans its maximal subpart (Unicode 3.9, "U+FFFD substitution of
// maximal subparts"), which is also how Python counts the bytes one U+FFFD replaces.
struct Step {
  size_t length;
  bool valid;
};

inline Step step(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return {1, true};
  // Table 3-7: the lead byte fixes the length and the allowed range of the second byte, which
  // excludes overlong forms, surrogates and values above U+10FFFF.
  size_t length;
  unsigned char low = 0x80, high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) length = 2;
  else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return {1, false};
  }
  for (size_t k = 1; k < length; ++k) {
    if (i + k >= s.size()) return {k, false};
    const unsigned char c = byte(i + k);
    if (k == 1 ? (c < low || c > high) : (c < 0x80 || c > 0xBF)) return {k, false};
  }
  return {length, true};
}

// The byte offset of the first ill-formed sequence, or npos when the text is valid UTF-8.
inline size_t find_invalid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    // ASCII runs dominate captions: skip them without the general step.
    if (static_cast<unsigned char>(s[i]) < 0x80) { ++i; continue; }
    Step st = step(s, i);
    if (!st.valid) return i;
    i += st.length;
  }
  return std::string_view::npos;
}

inline bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// Rejects text that is not UTF-8, naming the offset and value of the first bad byte.
inline void check(std::string_view s) {
  size_t bad = find_invalid(s);
  if (bad == std::string_view::npos) return;
  static const char* hex = "0123456789ABCDEF";
  const unsigned char b = static_cast<unsigned char>(s[bad]);
  CLIP_FAIL("text is not valid UTF-8: bad byte 0x", hex[b >> 4], hex[b & 15], " at byte offset ", bad);
}

// The code point starting at s[i], which must begin a well-formed sequence; i moves past it.
inline char32_t next(std::string_view s, size_t& i) {
  const auto byte = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[k])); };
  const char32_t lead = byte(i);
  if (lead < 0x80) return ++i, lead;
  if (lead < 0xE0) {
    char32_t c = ((lead & 0x1F) << 6) | (byte(i + 1) & 0x3F);
    return i += 2, c;
  }
  if (lead < 0xF0) {
    char32_t c = ((lead & 0x0F) << 12) | ((byte(i + 1) & 0x3F) << 6) | (byte(i + 2) & 0x3F);
    return i += 3, c;
  }
  char32_t c = ((lead & 0x07) << 18) | ((byte(i + 1) & 0x3F) << 12) | ((byte(i + 2) & 0x3F) << 6) |
               (byte(i + 3) & 0x3F);
  return i += 4, c;
}

inline void append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Decoded ids can split a character between tokens; like Python's errors="replace", each
// maximal ill-formed subpart becomes one U+FFFD and the rest is kept.
inline std::string replace_invalid(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    Step st = step(s, i);
    if (st.valid) out.append(s.substr(i, st.length));
    else append(out, U'\uFFFD');
    i += st.length;
  }
  return out;
}

}  // namespace clip::text::utf8
