// The small CLIP variant of the Fashion-MNIST demo (README, "Pretraining from scratch"), defined
// as a user defines one: a vision transformer over 28x28 images in 7x7 patches (16 patches and
// the class token: 17 tokens) and a 2-layer text transformer over 16-token captions, both 128 wide
// and joined in a 128-dimensional embedding. clip-train offers it by its name, "fmnist-vit".
// Patch 7 keeps the image tower cheap: patch 4 costs 2.4x the FLOPs per pair for no gain in a
// ten-minute CPU budget.
#pragma once

#include "clip/config/dims.hpp"

namespace clip::examples {

struct FashionMnistViT {
  static constexpr const char* name = "fmnist-vit";
  static constexpr int embed_dim = 128;
  static constexpr int image_resolution = 28;
  static constexpr int vision_layers = 4;       // one number: a vision transformer
  static constexpr int vision_width = 128;      // heads = width / 64: 2 heads of 64
  static constexpr int vision_patch_size = 7;   // 4 x 4 = 16 patches + the class token
  static constexpr int context_length = 16;     // captions of up to 14 BPE tokens
  static constexpr int vocab_size = 49408;      // OpenAI's BPE vocabulary
  static constexpr int transformer_width = 128;
  static constexpr int transformer_heads = 2;   // 2 heads of 64, as the image tower
  static constexpr int transformer_layers = 2;
};

static_assert(Variant<FashionMnistViT>);
static_assert(dims<FashionMnistViT>::vision::tokens == 17);

}  // namespace clip::examples
