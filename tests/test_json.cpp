#include <boost/test/unit_test.hpp>

#include <string>

#include "clip/io/json.hpp"

using namespace clip;

BOOST_AUTO_TEST_CASE(json_parses_nested_values_and_escapes) {
  json::Value v = json::parse(R"({"a": [1, -2.5e1, true, null], "s": "x\n\u00e9\ud83d\ude00", "o": {}})");
  BOOST_TEST(v["a"].as_array().size() == 4u);
  BOOST_TEST(v["a"].as_array()[0].as_int() == 1);
  BOOST_TEST(v["a"].as_array()[1].as_number() == -25.0);
  BOOST_TEST(v["a"].as_array()[2].as_bool());
  BOOST_TEST(v["a"].as_array()[3].is_null());
  BOOST_TEST(v["s"].as_string() == "x\n\xc3\xa9\xf0\x9f\x98\x80");
  BOOST_TEST(v["o"].as_object().empty());
  BOOST_TEST(json::quote("a\"b\\\x01") == "\"a\\\"b\\\\\\u0001\"");
}

BOOST_AUTO_TEST_CASE(json_rejects_malformed_text_with_a_position) {
  for (const char* bad : {"{", "[1,]", "{\"a\" 1}", "\"unterminated", "tru", "{} x", "[1e]"}) {
    BOOST_CHECK_EXCEPTION(json::parse(bad), Error, [](const Error& e) {
      return std::string(e.what()).find("invalid JSON at byte") != std::string::npos;
    });
  }
  BOOST_CHECK_THROW(json::parse(R"({"a": 1})")["b"], Error);
  BOOST_CHECK_THROW(json::parse("1.5").as_int(), Error);
}

// Nesting is held to limits::kMaxJsonDepth (the parser recurses per level); 100,000 levels are
// refused with the limit named, not a stack overflow. Numbers outside int64 are not integers
// (converting them would be undefined behaviour).
BOOST_AUTO_TEST_CASE(json_depth_and_integer_range_are_limited) {
  const int limit = clip::limits::kMaxJsonDepth;
  BOOST_TEST(json::parse(std::string(limit + 1, '[') + std::string(limit + 1, ']')).is_array());
  const std::string deeper = std::string(limit + 2, '[') + std::string(limit + 2, ']');
  BOOST_CHECK_EXCEPTION(json::parse(deeper), Error, [](const Error& e) {
    return std::string(e.what()).find("nest deeper than the limit of 256") != std::string::npos;
  });
  BOOST_CHECK_THROW(json::parse(std::string(100000, '[')), Error);
  BOOST_TEST(json::parse("-9007199254740992").as_int() == -9007199254740992);
  for (const char* big : {"1e300", "-1e19", "9223372036854775808"})
    BOOST_CHECK_EXCEPTION(json::parse(big).as_int(), Error, [](const Error& e) {
      return std::string(e.what()).find("is not a 64-bit integer") != std::string::npos;
    });
}
