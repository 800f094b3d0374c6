// From a model name typed at the command line to a variant type: the one place where a run-time
// value picks a static shape. OpenAI's spellings ("ViT-B/32", "ViT-L/14@336px") and open_clip's
// ("ViT-B-32", "ViT-L-14-336") are both accepted, in any letter case.
#pragma once

#include <cctype>
#include <string>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "clip/config/variants.hpp"
#include "clip/core/error.hpp"

namespace clip {

// open_clip's spelling of a variant name: '/' becomes '-', "@336px" becomes "-336".
inline std::string open_clip_name(std::string_view openai_name) {
  std::string out;
  for (size_t i = 0; i < openai_name.size(); ++i) {
    if (openai_name[i] == '/') {
      out += '-';
    } else if (openai_name[i] == '@') {
      out += '-';
      while (i + 1 < openai_name.size() && std::isdigit(static_cast<unsigned char>(openai_name[i + 1])))
        out += openai_name[++i];
      i = openai_name.size();  // "px" and anything after it
    } else {
      out += openai_name[i];
    }
  }
  return out;
}

inline bool same_variant_name(std::string_view typed, std::string_view openai_name) {
  const std::string a = open_clip_name(typed), b = open_clip_name(openai_name);
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

// Calls f(Cfg{}) for the variant among Cfgs whose name matches; an unknown name is an error that
// lists the names this program was built with.
template <class... Cfgs, class F>
decltype(auto) with_variant(std::string_view name, F&& f) {
  static_assert(sizeof...(Cfgs) > 0, "with_variant needs at least one variant to choose from");
  using Result = decltype(f((std::tuple_element_t<0, std::tuple<Cfgs...>>){}));
  if constexpr (std::is_void_v<Result>) {
    bool found = ((same_variant_name(name, Cfgs::name) ? (f(Cfgs{}), true) : false) || ...);
    if (found) return;
  } else {
    std::optional<Result> result;
    ((same_variant_name(name, Cfgs::name) ? (result.emplace(f(Cfgs{})), true) : false) || ...);
    if (result) return Result(std::move(*result));  // a value: decltype(auto) of std::move(*result) would dangle
  }
  std::string known;
  ((known += (known.empty() ? "" : ", ") + std::string(Cfgs::name)), ...);
  CLIP_FAIL("unknown model '", name, "'; this program knows ", known,
            " (open_clip spellings such as ViT-B-32 work too)");
}

}  // namespace clip
