// Checkpoint loading (clip/train/checkpoint.hpp): the metadata record, the variant check and
// every tensor's name, dtype, shape and offsets. The input is the safetensors header (JSON);
// the data section after it is a real checkpoint's (the tiny model's, written when the fuzzer
// starts), so that a header that fits gets as far as a real one. The seed is that checkpoint's
// own header.
#include <fstream>
#include <iterator>

#include "clip/models/clip_model.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/checkpoint.hpp"
#include "fuzz_checkpoint.hpp"
#include "fuzz_input.hpp"

namespace {

using Params = clip::Clip<clip::fuzz::FuzzTiny>::Params;

// The data section of the tiny model's checkpoint.
std::vector<uint8_t> real_data_section() {
  auto params = std::make_unique<Params>();
  clip::AdamW<Params> optimizer(*params);
  clip::CheckpointInfo info;
  info.variant = clip::fuzz::FuzzTiny::name;
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("clip-fuzz-seed-" + std::to_string(getpid()) + ".safetensors");
  clip::save_checkpoint(path, *params, optimizer, info);
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  return std::vector<uint8_t>(bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header), bytes.end());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<uint8_t> data_section = real_data_section();
  static auto params = std::make_unique<Params>();
  static auto optimizer = std::make_unique<clip::AdamW<Params>>(*params);
  std::vector<uint8_t> file(8);
  const uint64_t header = size;
  std::memcpy(file.data(), &header, 8);
  file.insert(file.end(), data, data + size);
  file.insert(file.end(), data_section.begin(), data_section.end());
  const std::filesystem::path path = clip::fuzz::as_file(file.data(), file.size(), ".safetensors");
  clip::fuzz::refusing_bad_input([&] {
    (void)clip::read_checkpoint_info(path);
    (void)clip::load_checkpoint(path, *params, *optimizer, clip::fuzz::FuzzTiny::name);
  });
  return 0;
}
