// JSON (clip/io/json.hpp): any text parses or is refused; what parses survives dump and parse
// again unchanged.
#include "clip/io/json.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  clip::fuzz::refusing_bad_input([&] {
    const clip::json::Value value = clip::json::parse(clip::fuzz::as_text(data, size));
    const std::string text = clip::json::dump(value);
    if (clip::json::dump(clip::json::parse(text)) != text) __builtin_trap();
  });
  return 0;
}
