// Finding the golden reference files. They live in $CLIP_GOLDEN_DIR (meson sets it; by default
// ../shared/golden beside the source tree). A missing file skips the test with a message naming
// it, except under CI (CI=true), where a test that cannot see its reference must fail.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

#include <boost/test/unit_test.hpp>

namespace clip::test {

inline std::filesystem::path golden_dir() {
  const char* dir = std::getenv("CLIP_GOLDEN_DIR");
  return dir && *dir ? std::filesystem::path(dir) : std::filesystem::path("../shared/golden");
}

inline std::filesystem::path data_dir() {
  const char* dir = std::getenv("CLIP_DATA_DIR");
  return dir && *dir ? std::filesystem::path(dir) : std::filesystem::path("data");
}

inline bool under_ci() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

// The path of a golden file, or nothing (after a skip message) when it is absent outside CI.
inline std::optional<std::filesystem::path> golden_file(const std::string& name) {
  std::filesystem::path path = golden_dir() / name;
  if (std::filesystem::exists(path)) return path;
  if (under_ci()) BOOST_FAIL("golden file missing under CI: " << path.string());
  BOOST_TEST_MESSAGE("SKIPPED: golden file not found: " << path.string() << " (set CLIP_GOLDEN_DIR)");
  return std::nullopt;
}

// The key part (middle third) of an attention in_proj_bias and the pool's k_proj.bias: their
// gradient is zero analytically (softmax ignores a constant shift), rounding noise in practice, so
// the golden checks hold them to an absolute bound.
inline bool is_key_bias(const std::string& name, int64_t i, int64_t n) {
  if (name.ends_with("attnpool.k_proj.bias")) return true;
  return name.ends_with("in_proj_bias") && i >= n / 3 && i < 2 * n / 3;
}

}  // namespace clip::test
