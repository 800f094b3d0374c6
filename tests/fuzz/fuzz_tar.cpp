// The tar reader (clip/data/tar.hpp): ustar headers and checksums, octal and base-256 numbers,
// pax records, GNU long names, bodies cut short. Every member returned lies inside the file and
// reads back; a stop before the end-of-archive marker says why.
#include "clip/data/tar.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = clip::fuzz::as_file(data, size, ".tar");
  clip::fuzz::refusing_bad_input([&] {
    clip::data::TarReader reader(path);
    int64_t previous_end = 0;
    while (std::optional<clip::data::TarEntry> entry = reader.next()) {
      if (entry->offset < previous_end || entry->size < 0 || entry->offset + entry->size > static_cast<int64_t>(size))
        __builtin_trap();
      previous_end = entry->offset + entry->size;
      const std::vector<uint8_t> body = reader.read();
      if (body.size() != static_cast<size_t>(entry->size) ||
          (!body.empty() && std::memcmp(body.data(), data + entry->offset, body.size()) != 0))
        __builtin_trap();
    }
    if (reader.truncated() && reader.problem().empty()) __builtin_trap();
  });
  return 0;
}
