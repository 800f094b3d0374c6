// What the fuzz targets share: the input as text, and as a file for the readers that take a path
// (safetensors maps its file, tar shards are read with fseeko). One file per process, rewritten
// for every input, so a run leaves at most one file behind in the temporary folder.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

#include "clip/core/error.hpp"

namespace clip::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// The input written to this process's scratch file named with `extension` (".tar", ...).
inline std::filesystem::path as_file(const uint8_t* data, size_t size, const std::string& extension) {
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("clip-fuzz-" + std::to_string(getpid()) + extension);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) __builtin_trap();  // the fuzzer cannot go on without its scratch file
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return path;
}

// Every clip::Error is an accepted outcome (bad input refused with a message); anything else
// escaping a target (another exception type, a crash, a sanitizer report) is a finding.
template <class Body>
void refusing_bad_input(Body&& body) {
  try {
    body();
  } catch (const Error& e) {
    if (std::string_view(e.what()).empty()) __builtin_trap();  // a refusal must say why
  }
}

}  // namespace clip::fuzz
