// Shard lists in brace notation, as WebDataset and open_clip take them:
//   data/{00000..00099}.tar       a numeric range, zero-padded when either end has a leading
//                                 zero (to the wider end), descending when it runs backwards
//   data/{0..100..10}.tar         a range with a step (its sign is ignored, as in bash)
//   {a..e}                        a range of single letters
//   data/{train,extra}-{0..3}.tar comma lists; several groups multiply, nested groups expand
//   a/{0..9}.tar::b/{0..4}.tar    "::" separates lists whose expansions are concatenated
//                                 (open_clip's --train-data convention)
// A brace group that is neither a comma list nor a range, an unmatched brace and an empty list
// element are errors naming the pattern and the position, not silently literal text: a typo in
// a shard list should stop a run before it trains on the wrong data.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"

namespace clip::data {

namespace shards_detail {

struct Range {
  bool ok = false;
  std::vector<std::string> items;
};

inline bool parse_int(std::string_view s, int64_t& v) {
  if (s.empty() || s.size() > 18) return false;
  size_t i = s[0] == '-' || s[0] == '+' ? 1 : 0;
  if (i == s.size()) return false;
  int64_t x = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    x = x * 10 + (s[i] - '0');
  }
  v = s[0] == '-' ? -x : x;
  return true;
}

inline bool has_leading_zero(std::string_view s) {
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  return s.size() > 1 && s[0] == '0';
}

// "A..B" or "A..B..STEP" with integers A, B (or single letters A, B and no step).
inline Range parse_range(std::string_view body, std::string_view pattern, size_t max_names) {
  Range range;
  const size_t dots = body.find("..");
  if (dots == std::string_view::npos) return range;
  const std::string_view first = body.substr(0, dots);
  std::string_view last = body.substr(dots + 2), step_text;
  if (const size_t more = last.find(".."); more != std::string_view::npos) {
    step_text = last.substr(more + 2);
    last = last.substr(0, more);
  }
  int64_t a = 0, b = 0, step = 1;
  if (parse_int(first, a) && parse_int(last, b)) {
    if (!step_text.empty()) {
      CLIP_CHECK(parse_int(step_text, step), "the range {", body, "} in the shard list '", pattern,
                 "' has a step that is not an integer");
      CLIP_CHECK(step != 0, "the range {", body, "} in the shard list '", pattern, "' has a step of 0");
      step = std::llabs(step);
    }
    const uint64_t count = static_cast<uint64_t>(a < b ? b - a : a - b) / static_cast<uint64_t>(step) + 1;
    CLIP_CHECK(count <= max_names, "the range {", body, "} in the shard list '", pattern, "' has ", count,
               " elements, more than the limit of ", max_names);
    const size_t width = has_leading_zero(first) || has_leading_zero(last) ? std::max(first.size(), last.size()) : 0;
    range.items.reserve(count);
    for (uint64_t k = 0; k < count; ++k) {
      const int64_t v = a <= b ? a + static_cast<int64_t>(k) * step : a - static_cast<int64_t>(k) * step;
      std::string digits = std::to_string(v < 0 ? -v : v);
      const size_t sign = v < 0 ? 1 : 0;
      if (digits.size() + sign < width) digits.insert(0, width - digits.size() - sign, '0');
      range.items.push_back(v < 0 ? "-" + digits : digits);
    }
    range.ok = true;
    return range;
  }
  const auto letter = [](std::string_view s) {
    return s.size() == 1 && ((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z'));
  };
  if (letter(first) && letter(last) && step_text.empty()) {
    const char x = first[0], y = last[0];
    for (int c = x; x <= y ? c <= y : c >= y; c += x <= y ? 1 : -1) range.items.emplace_back(1, static_cast<char>(c));
    range.ok = true;
    return range;
  }
  CLIP_FAIL("the range {", body, "} in the shard list '", pattern,
            "' needs two integers (or two letters), as in {00000..00099}");
}

// The names s expands to; s is the part of `pattern` from character `offset` on (for messages).
inline std::vector<std::string> expand(std::string_view s, std::string_view pattern, size_t offset,
                                       size_t max_names) {
  // The first top-level brace group, if any.
  size_t open = std::string_view::npos, close = std::string_view::npos;
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '{') {
      if (depth++ == 0 && open == std::string_view::npos) open = i;
    } else if (s[i] == '}') {
      CLIP_CHECK(depth > 0, "the shard list '", pattern, "' has an unmatched '}' at character ", offset + i + 1);
      if (--depth == 0 && close == std::string_view::npos) close = i;
    }
  }
  CLIP_CHECK(depth == 0, "the shard list '", pattern, "' has an unmatched '{' at character ",
             offset + (open == std::string_view::npos ? s.rfind('{') : open) + 1);
  if (open == std::string_view::npos) return {std::string(s)};

  const std::string_view prefix = s.substr(0, open), body = s.substr(open + 1, close - open - 1);
  CLIP_CHECK(!body.empty(), "the shard list '", pattern, "' has an empty brace group {} at character ",
             offset + open + 1);
  // Split the group at its top-level commas.
  std::vector<std::string_view> alternatives;
  size_t start = 0;
  depth = 0;
  for (size_t i = 0; i <= body.size(); ++i) {
    if (i < body.size() && body[i] == '{') ++depth;
    if (i < body.size() && body[i] == '}') --depth;
    if (i == body.size() || (body[i] == ',' && depth == 0)) {
      alternatives.push_back(body.substr(start, i - start));
      start = i + 1;
    }
  }
  std::vector<std::string> choices;
  if (alternatives.size() == 1) {
    Range range = parse_range(body, pattern, max_names);
    CLIP_CHECK(range.ok, "the brace group {", body, "} at character ", offset + open + 1, " of the shard list '",
               pattern, "' is neither a comma list nor a range");
    choices = std::move(range.items);
  } else {
    size_t at = offset + open + 1;
    for (std::string_view alternative : alternatives) {
      CLIP_CHECK(!alternative.empty(), "the brace group {", body, "} at character ", offset + open + 1,
                 " of the shard list '", pattern, "' has an empty element");
      for (std::string& c : expand(alternative, pattern, at, max_names)) choices.push_back(std::move(c));
      CLIP_CHECK(choices.size() <= max_names, "the shard list '", pattern, "' expands to more than the limit of ",
                 max_names, " names");
      at += alternative.size() + 1;
    }
  }
  const std::vector<std::string> rests = expand(s.substr(close + 1), pattern, offset + close + 1, max_names);
  CLIP_CHECK(!choices.empty() && rests.size() <= max_names / choices.size(), "the shard list '", pattern,
             "' expands to more than the limit of ", max_names, " names");
  std::vector<std::string> out;
  out.reserve(choices.size() * rests.size());
  for (const std::string& c : choices)
    for (const std::string& r : rests) out.push_back(std::string(prefix) + c + r);
  return out;
}

}  // namespace shards_detail

// One brace pattern's names, in order; more than max_names is an error.
inline std::vector<std::string> expand_braces(std::string_view pattern,
                                              size_t max_names = limits::kMaxShardListNames) {
  CLIP_CHECK(!pattern.empty(), "an empty shard pattern names no files");
  return shards_detail::expand(pattern, pattern, 0, max_names);
}

// A "::"-separated list of brace patterns: every pattern's names, in order.
inline std::vector<std::string> expand_shard_list(std::string_view spec,
                                                  size_t max_names = limits::kMaxShardListNames) {
  CLIP_CHECK(!spec.empty(), "the shard list is empty");
  std::vector<std::string> names;
  size_t start = 0;
  for (;;) {
    const size_t sep = spec.find("::", start);
    const std::string_view part = spec.substr(start, sep == std::string_view::npos ? spec.npos : sep - start);
    CLIP_CHECK(!part.empty(), "the shard list '", spec, "' has an empty element between '::' separators");
    for (std::string& name : expand_braces(part, max_names)) names.push_back(std::move(name));
    CLIP_CHECK(names.size() <= max_names, "the shard list '", spec, "' names more than the limit of ", max_names,
               " files");
    if (sep == std::string_view::npos) break;
    start = sep + 2;
  }
  return names;
}

}  // namespace clip::data
