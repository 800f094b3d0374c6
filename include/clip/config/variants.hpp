// The paper's nine CLIP variants. Each is a struct of the hyperparameters OpenAI's build_model()
// infers from a released checkpoint; a user defines their own variant the same way.
//
// A ResNet variant gives `vision_layers` as four stage depths and has no patch size (0, where
// OpenAI writes None); a vision-transformer variant gives its depth as one number.
#pragma once

#include <array>

namespace clip::variants {

struct RN50 {
  static constexpr const char* name = "RN50";
  static constexpr int embed_dim = 1024;
  static constexpr int image_resolution = 224;
  static constexpr std::array<int, 4> vision_layers{3, 4, 6, 3};
  static constexpr int vision_width = 64;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 512;
  static constexpr int transformer_heads = 8;
  static constexpr int transformer_layers = 12;
};

struct RN101 {
  static constexpr const char* name = "RN101";
  static constexpr int embed_dim = 512;
  static constexpr int image_resolution = 224;
  static constexpr std::array<int, 4> vision_layers{3, 4, 23, 3};
  static constexpr int vision_width = 64;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 512;
  static constexpr int transformer_heads = 8;
  static constexpr int transformer_layers = 12;
};

struct RN50x4 {
  static constexpr const char* name = "RN50x4";
  static constexpr int embed_dim = 640;
  static constexpr int image_resolution = 288;
  static constexpr std::array<int, 4> vision_layers{4, 6, 10, 6};
  static constexpr int vision_width = 80;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 640;
  static constexpr int transformer_heads = 10;
  static constexpr int transformer_layers = 12;
};

struct RN50x16 {
  static constexpr const char* name = "RN50x16";
  static constexpr int embed_dim = 768;
  static constexpr int image_resolution = 384;
  static constexpr std::array<int, 4> vision_layers{6, 8, 18, 8};
  static constexpr int vision_width = 96;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 768;
  static constexpr int transformer_heads = 12;
  static constexpr int transformer_layers = 12;
};

struct RN50x64 {
  static constexpr const char* name = "RN50x64";
  static constexpr int embed_dim = 1024;
  static constexpr int image_resolution = 448;
  static constexpr std::array<int, 4> vision_layers{3, 15, 36, 10};
  static constexpr int vision_width = 128;
  static constexpr int vision_patch_size = 0;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 1024;
  static constexpr int transformer_heads = 16;
  static constexpr int transformer_layers = 12;
};

struct ViT_B_32 {
  static constexpr const char* name = "ViT-B/32";
  static constexpr int embed_dim = 512;
  static constexpr int image_resolution = 224;
  static constexpr int vision_layers = 12;
  static constexpr int vision_width = 768;
  static constexpr int vision_patch_size = 32;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 512;
  static constexpr int transformer_heads = 8;
  static constexpr int transformer_layers = 12;
};

struct ViT_B_16 {
  static constexpr const char* name = "ViT-B/16";
  static constexpr int embed_dim = 512;
  static constexpr int image_resolution = 224;
  static constexpr int vision_layers = 12;
  static constexpr int vision_width = 768;
  static constexpr int vision_patch_size = 16;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 512;
  static constexpr int transformer_heads = 8;
  static constexpr int transformer_layers = 12;
};

struct ViT_L_14 {
  static constexpr const char* name = "ViT-L/14";
  static constexpr int embed_dim = 768;
  static constexpr int image_resolution = 224;
  static constexpr int vision_layers = 24;
  static constexpr int vision_width = 1024;
  static constexpr int vision_patch_size = 14;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 768;
  static constexpr int transformer_heads = 12;
  static constexpr int transformer_layers = 12;
};

struct ViT_L_14_336 {
  static constexpr const char* name = "ViT-L/14@336px";
  static constexpr int embed_dim = 768;
  static constexpr int image_resolution = 336;
  static constexpr int vision_layers = 24;
  static constexpr int vision_width = 1024;
  static constexpr int vision_patch_size = 14;
  static constexpr int context_length = 77;
  static constexpr int vocab_size = 49408;
  static constexpr int transformer_width = 768;
  static constexpr int transformer_heads = 12;
  static constexpr int transformer_layers = 12;
};

}  // namespace clip::variants
