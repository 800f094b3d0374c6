// A small vision-transformer CLIP for the tests that train from scratch: a 500-token vocabulary
// and 16 positions keep a step in milliseconds, and every token row is used often enough that
// no AdamW update sits on a gradient near eps (which would magnify rounding differences).
#pragma once

#include "clip/config/dims.hpp"

namespace clip::test {

struct ViTTrainTest {
  static constexpr const char* name = "ViT-train-test";
  static constexpr int embed_dim = 16;
  static constexpr int image_resolution = 16;
  static constexpr int vision_layers = 2;
  static constexpr int vision_width = 64;
  static constexpr int vision_patch_size = 8;
  static constexpr int context_length = 16;
  static constexpr int vocab_size = 500;
  static constexpr int transformer_width = 32;
  static constexpr int transformer_heads = 2;
  static constexpr int transformer_layers = 2;
};
static_assert(Variant<ViTTrainTest>);

}  // namespace clip::test
