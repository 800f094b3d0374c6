// safetensors files (clip/io/safetensors.hpp): header length, header JSON, dtypes, shapes and
// offsets; every tensor of a file that opens is read both as floats and, if integer, exactly.
#include "clip/io/safetensors.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = clip::fuzz::as_file(data, size, ".safetensors");
  clip::fuzz::refusing_bad_input([&] {
    const clip::SafeTensors file = clip::SafeTensors::open(path);
    for (const clip::SafeTensors::Entry& e : file.entries()) {
      const clip::Tensor t = file.tensor(e.name);
      if (t.numel() != clip::shape_numel(e.shape)) __builtin_trap();
      if (e.dtype == clip::DType::I64 || e.dtype == clip::DType::I32) (void)file.integers(e.name);
    }
  });
  return 0;
}
