// A small JSON reader and writer: enough for safetensors headers, variant tables, test cases,
// checkpoint metadata and metrics logs, with errors that say where the text is wrong.
#pragma once

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/core/limits.hpp"
#include "clip/text/utf8.hpp"

namespace clip::json {

struct Value;
using Array = std::vector<Value>;
using Object = std::map<std::string, Value, std::less<>>;

struct Value {
  std::variant<std::nullptr_t, bool, double, std::string, Array, Object> v;

  bool is_null() const { return std::holds_alternative<std::nullptr_t>(v); }
  bool is_number() const { return std::holds_alternative<double>(v); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  bool is_array() const { return std::holds_alternative<Array>(v); }
  bool is_object() const { return std::holds_alternative<Object>(v); }

  bool as_bool() const { return get<bool>("a boolean"); }
  double as_number() const { return get<double>("a number"); }
  // Integers are exact up to 2^53, which covers every offset a safetensors file can hold here.
  int64_t as_int() const {
    double d = as_number();
    // (range first: converting a double outside int64 is undefined behaviour)
    CLIP_CHECK(d >= -0x1p63 && d < 0x1p63 && d == std::floor(d), "JSON number ", d, " is not a 64-bit integer");
    return static_cast<int64_t>(d);
  }
  const std::string& as_string() const { return get<std::string>("a string"); }
  const Array& as_array() const { return get<Array>("an array"); }
  const Object& as_object() const { return get<Object>("an object"); }

  // Member lookup; a missing key is an error that names it.
  const Value& operator[](std::string_view key) const {
    const Object& o = as_object();
    auto it = o.find(key);
    CLIP_CHECK(it != o.end(), "JSON object has no key \"", key, "\"");
    return it->second;
  }
  const Value* find(std::string_view key) const {
    const Object& o = as_object();
    auto it = o.find(key);
    return it == o.end() ? nullptr : &it->second;
  }

 private:
  template <class T>
  const T& get(const char* what) const {
    const T* p = std::get_if<T>(&v);
    CLIP_CHECK(p, "JSON value is not ", what);
    return *p;
  }
};

namespace detail {

class Parser {
 public:
  explicit Parser(std::string_view text) : s_(text) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (i_ != s_.size()) error("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = limits::kMaxJsonDepth;
  std::string_view s_;
  size_t i_ = 0;

  [[noreturn]] void error(const char* what) const { CLIP_FAIL("invalid JSON at byte ", i_, ": ", what); }

  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char peek() {
    skip_space();
    if (i_ >= s_.size()) error("unexpected end of text");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) error((std::string("expected '") + c + "'").c_str());
    ++i_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  Value value(int depth) {
    if (depth > kMaxDepth)
      CLIP_FAIL("invalid JSON at byte ", i_, ": arrays and objects nest deeper than the limit of ", kMaxDepth);
    char c = peek();
    if (c == '{') return Value{object(depth)};
    if (c == '[') return Value{array(depth)};
    if (c == '"') return Value{string()};
    if (literal("true")) return Value{true};
    if (literal("false")) return Value{false};
    if (literal("null")) return Value{nullptr};
    return Value{number()};
  }

  Object object(int depth) {
    Object o;
    expect('{');
    if (peek() == '}') return ++i_, o;
    for (;;) {
      if (peek() != '"') error("expected a string key");
      std::string key = string();
      expect(':');
      o.insert_or_assign(std::move(key), value(depth + 1));
      if (peek() == ',') { ++i_; continue; }
      expect('}');
      return o;
    }
  }

  Array array(int depth) {
    Array a;
    expect('[');
    if (peek() == ']') return ++i_, a;
    for (;;) {
      a.push_back(value(depth + 1));
      if (peek() == ',') { ++i_; continue; }
      expect(']');
      return a;
    }
  }

  double number() {
    size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.' || s_[i_] == 'e' ||
                              s_[i_] == 'E' || s_[i_] == '+' || s_[i_] == '-'))
      ++i_;
    if (start == i_) error("expected a value");
    std::string digits(s_.substr(start, i_ - start));
    char* end = nullptr;
    double d = std::strtod(digits.c_str(), &end);
    if (end != digits.c_str() + digits.size()) error("malformed number");
    return d;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) error("truncated \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      u <<= 4;
      if (c >= '0' && c <= '9') u |= c - '0';
      else if (c >= 'a' && c <= 'f') u |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') u |= c - 'A' + 10;
      else error("bad hex digit in \\u escape");
    }
    return u;
  }

  std::string string() {
    expect('"');
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) error("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) error("unterminated escape");
      switch (char e = s_[i_++]) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          // A high surrogate followed by a low one is one code point; a lone surrogate is kept
          // as its own (WTF-8) bytes so that no input is silently dropped.
          if (cp >= 0xD800 && cp < 0xDC00 && s_.substr(i_, 2) == "\\u") {
            size_t save = i_;
            i_ += 2;
            unsigned lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else i_ = save;
          }
          text::utf8::append(out, cp);
          break;
        }
        default: error("unknown escape");
      }
    }
  }
};

}  // namespace detail

inline Value parse(std::string_view text) { return detail::Parser(text).document(); }

// Quotes a UTF-8 string as a JSON string literal (control characters escaped, the rest verbatim).
inline std::string quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[(c >> 4) & 0xF];
          out += hex[c & 0xF];
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// A number as JSON text: the shortest form that reads back as the same double, so floats and
// doubles survive a round trip exactly. JSON has no NaN or infinity: they become null.
inline std::string number(double d) {
  if (!std::isfinite(d)) return "null";
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, d);
  return std::string(buf, ec == std::errc() ? end : buf);
}

// A value as compact JSON text (object keys in sorted order); parse(dump(v)) gives v back.
inline std::string dump(const Value& value) {
  struct Writer {
    std::string operator()(std::nullptr_t) const { return "null"; }
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(double d) const { return number(d); }
    std::string operator()(const std::string& s) const { return quote(s); }
    std::string operator()(const Array& a) const {
      std::string out = "[";
      for (size_t i = 0; i < a.size(); ++i) {
        if (i) out += ',';
        out += dump(a[i]);
      }
      return out + "]";
    }
    std::string operator()(const Object& o) const {
      std::string out = "{";
      for (const auto& [k, v] : o) {
        if (out.size() > 1) out += ',';
        out += quote(k);
        out += ':';
        out += dump(v);
      }
      return out + "}";
    }
  };
  return std::visit(Writer{}, value.v);
}

}  // namespace clip::json
