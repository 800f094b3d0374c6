// HTML character references, resolved the way Python's html.unescape does, because CLIP's
// tokenizer runs html.unescape twice over every caption before it splits the text.
//
// What matches Python exactly: which text is taken as a reference (`&#123;`, `&#x7B;`, `&name;`,
// the trailing `;` optional, at most 32 name characters), numeric references with HTML5's
// repairs (C1 bytes read as windows-1252, NUL / surrogates / values past U+10FFFF become U+FFFD,
// noncharacters and most controls vanish), the 106 legacy names that need no `;` (`&amp`, `&lt`,
// `&eacute`...) including their use as a prefix (`&copyright` -> "©right"), and unknown names
// left as they are.
//
// The gap: the names are HTML 4's 252 (Latin-1, symbols and Greek, special) plus `&apos;` and
// the upper-case aliases of the legacy names, written out here from the HTML 4 lists: 365 of the
// 2,231 keys of Python's html5 table (checked against it one by one). HTML5's other names
// (`&NewLine;`, `&bigstar;`, `&check;`...) stay as text, except the 39 that begin with a legacy
// name, which read as that name plus text (`&centerdot;` -> "¢erdot;"). Such names are rare in
// captions; a caption that uses one tokenizes differently from the reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

#include "clip/text/utf8.hpp"

namespace clip::text {

namespace html_detail {

struct NamedReference {
  char32_t code_point;
  bool legacy;  // HTML5 also accepts it without the ';'
};

// HTML 4's Latin-1 names, one per code point from U+00A0 to U+00FF; all are legacy names.
constexpr const char* kLatin1Names[96] = {
    "nbsp",   "iexcl",  "cent",   "pound",  "curren", "yen",    "brvbar", "sect",
    "uml",    "copy",   "ordf",   "laquo",  "not",    "shy",    "reg",    "macr",
    "deg",    "plusmn", "sup2",   "sup3",   "acute",  "micro",  "para",   "middot",
    "cedil",  "sup1",   "ordm",   "raquo",  "frac14", "frac12", "frac34", "iquest",
    "Agrave", "Aacute", "Acirc",  "Atilde", "Auml",   "Aring",  "AElig",  "Ccedil",
    "Egrave", "Eacute", "Ecirc",  "Euml",   "Igrave", "Iacute", "Icirc",  "Iuml",
    "ETH",    "Ntilde", "Ograve", "Oacute", "Ocirc",  "Otilde", "Ouml",   "times",
    "Oslash", "Ugrave", "Uacute", "Ucirc",  "Uuml",   "Yacute", "THORN",  "szlig",
    "agrave", "aacute", "acirc",  "atilde", "auml",   "aring",  "aelig",  "ccedil",
    "egrave", "eacute", "ecirc",  "euml",   "igrave", "iacute", "icirc",  "iuml",
    "eth",    "ntilde", "ograve", "oacute", "ocirc",  "otilde", "ouml",   "divide",
    "oslash", "ugrave", "uacute", "ucirc",  "uuml",   "yacute", "thorn",  "yuml"};

// Greek letters in alphabet order: capitals from U+0391 (U+03A2 is unassigned), small letters
// from U+03B1 (final sigma included).
constexpr const char* kGreekCapitals[24] = {
    "Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa", "Lambda", "Mu",
    "Nu", "Xi", "Omicron", "Pi", "Rho", "Sigma", "Tau", "Upsilon", "Phi", "Chi", "Psi", "Omega"};
constexpr const char* kGreekSmall[25] = {
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
    "xi", "omicron", "pi", "rho", "sigmaf", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"};

struct Named {
  const char* name;
  char32_t code_point;
};

// The rest of HTML 4 (markup-significant, special and symbol sets), with HTML5's values where
// it changed them (lang/rang are the mathematical angle brackets).
constexpr Named kOtherNames[] = {
    {"quot", 0x22}, {"amp", 0x26}, {"lt", 0x3C}, {"gt", 0x3E}, {"apos", 0x27},
    {"OElig", 0x152}, {"oelig", 0x153}, {"Scaron", 0x160}, {"scaron", 0x161}, {"Yuml", 0x178},
    {"fnof", 0x192}, {"circ", 0x2C6}, {"tilde", 0x2DC},
    {"thetasym", 0x3D1}, {"upsih", 0x3D2}, {"piv", 0x3D6},
    {"ensp", 0x2002}, {"emsp", 0x2003}, {"thinsp", 0x2009}, {"zwnj", 0x200C}, {"zwj", 0x200D},
    {"lrm", 0x200E}, {"rlm", 0x200F}, {"ndash", 0x2013}, {"mdash", 0x2014}, {"lsquo", 0x2018},
    {"rsquo", 0x2019}, {"sbquo", 0x201A}, {"ldquo", 0x201C}, {"rdquo", 0x201D}, {"bdquo", 0x201E},
    {"dagger", 0x2020}, {"Dagger", 0x2021}, {"bull", 0x2022}, {"hellip", 0x2026}, {"permil", 0x2030},
    {"prime", 0x2032}, {"Prime", 0x2033}, {"lsaquo", 0x2039}, {"rsaquo", 0x203A}, {"oline", 0x203E},
    {"frasl", 0x2044}, {"euro", 0x20AC}, {"image", 0x2111}, {"weierp", 0x2118}, {"real", 0x211C},
    {"trade", 0x2122}, {"alefsym", 0x2135},
    {"larr", 0x2190}, {"uarr", 0x2191}, {"rarr", 0x2192}, {"darr", 0x2193}, {"harr", 0x2194},
    {"crarr", 0x21B5}, {"lArr", 0x21D0}, {"uArr", 0x21D1}, {"rArr", 0x21D2}, {"dArr", 0x21D3},
    {"hArr", 0x21D4},
    {"forall", 0x2200}, {"part", 0x2202}, {"exist", 0x2203}, {"empty", 0x2205}, {"nabla", 0x2207},
    {"isin", 0x2208}, {"notin", 0x2209}, {"ni", 0x220B}, {"prod", 0x220F}, {"sum", 0x2211},
    {"minus", 0x2212}, {"lowast", 0x2217}, {"radic", 0x221A}, {"prop", 0x221D}, {"infin", 0x221E},
    {"ang", 0x2220}, {"and", 0x2227}, {"or", 0x2228}, {"cap", 0x2229}, {"cup", 0x222A},
    {"int", 0x222B}, {"there4", 0x2234}, {"sim", 0x223C}, {"cong", 0x2245}, {"asymp", 0x2248},
    {"ne", 0x2260}, {"equiv", 0x2261}, {"le", 0x2264}, {"ge", 0x2265}, {"sub", 0x2282},
    {"sup", 0x2283}, {"nsub", 0x2284}, {"sube", 0x2286}, {"supe", 0x2287}, {"oplus", 0x2295},
    {"otimes", 0x2297}, {"perp", 0x22A5}, {"sdot", 0x22C5}, {"lceil", 0x2308}, {"rceil", 0x2309},
    {"lfloor", 0x230A}, {"rfloor", 0x230B}, {"lang", 0x27E8}, {"rang", 0x27E9}, {"loz", 0x25CA},
    {"spades", 0x2660}, {"clubs", 0x2663}, {"hearts", 0x2665}, {"diams", 0x2666}};

// Markup characters and two symbols that HTML5 also accepts in capitals, and without ';'.
constexpr Named kLegacyOutsideLatin1[] = {{"quot", 0x22}, {"amp", 0x26}, {"lt", 0x3C}, {"gt", 0x3E},
                                          {"QUOT", 0x22}, {"AMP", 0x26}, {"LT", 0x3C}, {"GT", 0x3E},
                                          {"COPY", 0xA9}, {"REG", 0xAE}};

inline const std::unordered_map<std::string_view, NamedReference>& named_references() {
  static const auto table = [] {
    std::unordered_map<std::string_view, NamedReference> t;
    for (int k = 0; k < 96; ++k) t[kLatin1Names[k]] = {static_cast<char32_t>(0xA0 + k), true};
    for (int k = 0; k < 24; ++k) t[kGreekCapitals[k]] = {static_cast<char32_t>(0x391 + k + (k >= 17)), false};
    for (int k = 0; k < 25; ++k) t[kGreekSmall[k]] = {static_cast<char32_t>(0x3B1 + k), false};
    for (const Named& n : kOtherNames) t[n.name] = {n.code_point, false};
    for (const Named& n : kLegacyOutsideLatin1) t[n.name] = {n.code_point, true};
    return t;
  }();
  return table;
}

// HTML5 reads the C1 range of a numeric reference as windows-1252 (its five holes stay as they are).
constexpr char32_t kWindows1252C1[32] = {
    0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0x008D, 0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178};

// Python's html.unescape drops these code points when a numeric reference names them.
inline bool dropped_code_point(uint32_t c) {
  return (c >= 0x1 && c <= 0x8) || c == 0xB || (c >= 0xE && c <= 0x1F) || (c >= 0x7F && c <= 0x9F) ||
         (c >= 0xFDD0 && c <= 0xFDEF) || (c & 0xFFFE) == 0xFFFE;
}

// The text a numeric reference stands for; `value` saturates at 0x110000.
inline void append_numeric(std::string& out, uint32_t value) {
  if (value == 0) return utf8::append(out, U'\uFFFD');
  if (value == 0x0D) return utf8::append(out, U'\r');
  if (value >= 0x80 && value <= 0x9F) return utf8::append(out, kWindows1252C1[value - 0x80]);
  if ((value >= 0xD800 && value <= 0xDFFF) || value > 0x10FFFF) return utf8::append(out, U'\uFFFD');
  if (dropped_code_point(value)) return;
  utf8::append(out, value);
}

inline int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reads `&#...` at s[i] (s[i] == '&', s[i+1] == '#'); false when no digits follow.
inline bool numeric_reference(std::string_view s, size_t& i, std::string& out) {
  size_t k = i + 2;
  const bool hex = k < s.size() && (s[k] == 'x' || s[k] == 'X');
  if (hex) ++k;
  const uint32_t base = hex ? 16 : 10;
  const size_t first_digit = k;
  uint32_t value = 0;
  for (; k < s.size(); ++k) {
    int d = hex ? hex_digit(s[k]) : (s[k] >= '0' && s[k] <= '9' ? s[k] - '0' : -1);
    if (d < 0) break;
    value = value >= 0x110000 ? value : value * base + static_cast<uint32_t>(d);
  }
  if (k == first_digit) return false;
  if (k < s.size() && s[k] == ';') ++k;
  append_numeric(out, value);
  i = k;
  return true;
}

inline bool ends_name(char c) {
  return c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' || c == ';';
}

// Reads `&name` at s[i] (s[i] == '&'); false when no name character follows.
inline bool named_reference(std::string_view s, size_t& i, std::string& out) {
  size_t k = i + 1;
  int characters = 0;
  while (k < s.size() && characters < 32 && !ends_name(s[k])) {
    // step() never reads past the end, even where the text is not UTF-8 (found by
    // tests/fuzz/fuzz_bpe_tokenizer: utf8::next ran past a sequence cut short at the end)
    k += utf8::step(s, k).length;
    ++characters;
  }
  if (characters == 0) return false;
  const std::string_view name = s.substr(i + 1, k - i - 1);
  const bool semicolon = k < s.size() && s[k] == ';';
  if (semicolon) ++k;
  const auto& table = named_references();
  if (auto it = table.find(name); it != table.end() && (semicolon || it->second.legacy)) {
    utf8::append(out, it->second.code_point);
    i = k;
    return true;
  }
  // Otherwise the longest legacy name that is a proper prefix of the reference wins (names are
  // ASCII, so byte prefixes are character prefixes).
  const size_t whole = k - i - 1;  // the name and its ';', as Python's match group holds them
  for (size_t length = std::min<size_t>(whole - 1, 6); length >= 2; --length) {
    auto it = table.find(name.substr(0, length));
    if (it != table.end() && it->second.legacy) {
      utf8::append(out, it->second.code_point);
      out.append(s.substr(i + 1 + length, whole - length));
      i = k;
      return true;
    }
  }
  out.append(s.substr(i, k - i));
  i = k;
  return true;
}

}  // namespace html_detail

// One pass of Python's html.unescape over valid UTF-8 text.
inline std::string html_unescape(std::string_view s) {
  if (s.find('&') == std::string_view::npos) return std::string(s);
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t amp = std::min(s.find('&', i), s.size());
    out.append(s.substr(i, amp - i));
    if ((i = amp) == s.size()) break;
    const bool numeric = i + 1 < s.size() && s[i + 1] == '#';
    if (numeric ? html_detail::numeric_reference(s, i, out) : html_detail::named_reference(s, i, out)) continue;
    out += s[i++];
  }
  return out;
}

}  // namespace clip::text
