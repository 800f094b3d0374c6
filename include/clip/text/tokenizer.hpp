// What the tokenizers share: turning a text's ids into the fixed-length row a text encoder reads.
//
// Both BpeTokenizer and SentencePieceTokenizer have the same shape, without a common base class
// (a template or a std::variant picks one at compile time, and no call pays for a virtual):
//   std::vector<int> encode(std::string_view text)            the text's ids, no start/end
//   std::vector<int> tokenize(std::string_view text, int context_length, bool truncate = true)
//   std::string decode(std::span<const int> ids)
//   int sot(), int eot(), int pad(), int vocab_size()
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "clip/core/error.hpp"

namespace clip::text {

// [sot] + ids + [eot], padded with `pad` to context_length, as clip.tokenize builds a row. A text
// too long for the row keeps its first context_length - 2 ids and still ends with eot when
// truncate is set (clip.tokenize's truncate=True), and is an error otherwise.
inline std::vector<int> token_row(std::span<const int> ids, int sot, int eot, int pad, int context_length,
                                  bool truncate) {
  CLIP_CHECK(context_length >= 2, "a context length of ", context_length,
             " has no room for the start and end tokens; it must be at least 2");
  const size_t room = static_cast<size_t>(context_length) - 2;
  CLIP_CHECK(truncate || ids.size() <= room, "the text is ", ids.size(), " tokens long, more than the ", room,
             " that fit a context length of ", context_length, " with its start and end tokens");
  std::vector<int> row(static_cast<size_t>(context_length), pad);
  const size_t kept = std::min(ids.size(), room);
  row[0] = sot;
  std::copy(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(kept), row.begin() + 1);
  row[kept + 1] = eot;
  return row;
}

}  // namespace clip::text
