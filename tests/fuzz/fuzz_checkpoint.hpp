// The smallest CLIP there is (a modified ResNet of width 2, a text transformer of width 1), for
// the checkpoint fuzzer and its seed: its checkpoint has every kind of tensor a real one has
// (model weights, BatchNorm statistics and counters, AdamW moments) in under 300 KB.
#pragma once

#include <array>

#include "clip/config/dims.hpp"

namespace clip::fuzz {

struct FuzzTiny {
  static constexpr const char* name = "fuzz-tiny";
  static constexpr int embed_dim = 1;
  static constexpr int image_resolution = 32;
  static constexpr std::array<int, 4> vision_layers{1, 1, 1, 1};
  static constexpr int vision_width = 2;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 2;
  static constexpr int vocab_size = 3;
  static constexpr int transformer_width = 1;
  static constexpr int transformer_heads = 1;
  static constexpr int transformer_layers = 1;
};

static_assert(Variant<FuzzTiny>);

}  // namespace clip::fuzz
