// Image decoding (clip/image/decode.hpp: JPEG through TurboJPEG, PNG/BMP/GIF through stb_image,
// the mode logic read from the headers) and CLIP's preprocessing of what decodes (resample.hpp,
// preprocess.hpp), at a small size so that each input stays fast.
#include "clip/image/decode.hpp"
#include "clip/image/preprocess.hpp"
#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  clip::fuzz::refusing_bad_input([&] {
    const clip::image::Image image = clip::image::decode({data, size}, "fuzz-input");
    const size_t expected = static_cast<size_t>(image.width) * image.height * image.channels();
    if (image.pixels.size() != expected) __builtin_trap();
    // The resampler's cost grows with the image: a few megapixels keep the fuzzer fast.
    if (static_cast<int64_t>(image.width) * image.height > 4'000'000) return;
    const int n = 1 + (size % 7 == 0 ? 223 : static_cast<int>(size % 40));
    const std::vector<float> tensor = clip::image::clip_preprocess(image, n);
    if (tensor.size() != static_cast<size_t>(3) * n * n) __builtin_trap();
  });
  return 0;
}
