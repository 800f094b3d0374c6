// Shard lists in brace notation (clip/data/shards.hpp): ranges, steps, letters, comma lists,
// nesting and "::"; an expansion never exceeds its limit.
#include "clip/data/shards.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 256) return 0;  // longer lists only multiply the same groups
  clip::fuzz::refusing_bad_input([&] {
    const std::vector<std::string> names = clip::data::expand_shard_list(clip::fuzz::as_text(data, size));
    if (names.empty()) __builtin_trap();
  });
  return 0;
}
