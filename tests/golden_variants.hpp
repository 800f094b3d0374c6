// The two tiny CLIP models of the golden files (../shared/golden/MANIFEST.md sections A and B),
// defined as a user defines a variant. Not official variants: the tests and the test copies of
// the command-line programs (examples/built_variants.hpp) add them.
#pragma once

#include <array>

#include "clip/config/dims.hpp"

namespace clip::test {

// vit_tiny.safetensors: a vision transformer for 32-pixel images.
struct ViTTiny {
  static constexpr const char* name = "ViT-tiny";
  static constexpr int embed_dim = 32;
  static constexpr int image_resolution = 32;
  static constexpr int vision_layers = 2;
  static constexpr int vision_width = 128;
  static constexpr int vision_patch_size = 8;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 64;
  static constexpr int transformer_heads = 2;
  static constexpr int transformer_layers = 2;
};

// rn_tiny.safetensors: a modified ResNet for 64-pixel images.
struct RNTiny {
  static constexpr const char* name = "RN-tiny";
  static constexpr int embed_dim = 32;
  static constexpr int image_resolution = 64;
  static constexpr std::array<int, 4> vision_layers{1, 1, 1, 1};
  static constexpr int vision_width = 16;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 64;
  static constexpr int transformer_heads = 2;
  static constexpr int transformer_layers = 2;
};

static_assert(Variant<ViTTiny> && Variant<RNTiny>);

}  // namespace clip::test
