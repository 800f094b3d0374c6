// Sizes derived from a variant's hyperparameters, all constexpr, with static_asserts that say in
// a sentence why a configuration cannot be built.
//
// Shape alphabet used in comments across the library: B batch, T tokens, C channels/width,
// H heads, D head dim, E embed dim, V vocab, P patch pixels.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

namespace clip {

// A ResNet variant lists four stage depths; a vision transformer gives one depth.
template <class Cfg>
concept ResNetConfig = std::is_same_v<std::remove_cv_t<decltype(Cfg::vision_layers)>, std::array<int, 4>>;
template <class Cfg>
concept ViTConfig = std::is_same_v<std::remove_cv_t<decltype(Cfg::vision_layers)>, int>;

// A variant: the ten hyperparameters of OpenAI's model.CLIP, plus a name.
template <class Cfg>
concept Variant = (ResNetConfig<Cfg> || ViTConfig<Cfg>) && requires {
  { Cfg::name } -> std::convertible_to<const char*>;
  Cfg::embed_dim; Cfg::image_resolution; Cfg::vision_width; Cfg::vision_patch_size; Cfg::context_length;
  Cfg::vocab_size; Cfg::transformer_width; Cfg::transformer_heads; Cfg::transformer_layers;
};

// One residual attention block of width W: in_proj, out_proj, two LayerNorms, a 4x MLP.
constexpr int64_t residual_block_parameters(int64_t w) { return 12 * w * w + 13 * w; }

// The causal text transformer shared by every variant.
template <class Cfg>
struct text_dims {
  static constexpr int width = Cfg::transformer_width;              // C
  static constexpr int heads = Cfg::transformer_heads;              // H
  static constexpr int layers = Cfg::transformer_layers;
  static constexpr int context = Cfg::context_length;               // T
  static constexpr int vocab = Cfg::vocab_size;                     // V
  static constexpr int embed = Cfg::embed_dim;                      // E
  static constexpr int head_dim = width / heads;                    // D
  static constexpr int mlp_width = 4 * width;

  static_assert(width > 0 && heads > 0 && layers > 0, "the text transformer needs a positive width, head count and depth");
  static_assert(width % heads == 0, "transformer_width must be a multiple of transformer_heads");
  static_assert(context >= 2, "context_length must hold at least the start and end tokens");
  static_assert(vocab >= 3, "vocab_size must hold the tokens and the start and end tokens");

  static constexpr int64_t parameters = int64_t{vocab} * width + int64_t{context} * width +
                                        layers * residual_block_parameters(width) + 2 * width +
                                        int64_t{width} * embed + 1 /* logit_scale */;

  // Matrix-product FLOPs (2 per multiply-add) of encoding one caption over `tokens` positions:
  // per block 24 T C^2 for the projections and MLP plus 4 T^2 C for attention.
  static constexpr double forward_flops(int tokens = context) {
    const double t = tokens, c = width;
    return layers * (24.0 * t * c * c + 4.0 * t * t * c) + 2.0 * c * embed;
  }
};

template <class Cfg>
struct vision_dims;

// Vision transformer: patches of P x P pixels on a grid, one class token, heads of 64 channels.
template <ViTConfig Cfg>
struct vision_dims<Cfg> {
  static constexpr int resolution = Cfg::image_resolution;
  static constexpr int width = Cfg::vision_width;                   // C
  static constexpr int layers = Cfg::vision_layers;
  static constexpr int patch = Cfg::vision_patch_size;
  static constexpr int heads = width / 64;                          // H, as OpenAI's build_model
  static constexpr int head_dim = width / heads;                    // D
  static constexpr int grid = resolution / patch;
  static constexpr int tokens = grid * grid + 1;                    // T
  static constexpr int patch_pixels = 3 * patch * patch;            // P
  static constexpr int mlp_width = 4 * width;
  static constexpr int embed = Cfg::embed_dim;

  static_assert(patch > 0, "a vision transformer needs a positive vision_patch_size");
  static_assert(resolution % patch == 0, "image_resolution must be a multiple of vision_patch_size");
  static_assert(width >= 64 && width % 64 == 0, "vision_width must be a multiple of 64 (one head per 64 channels)");
  static_assert(layers > 0, "vision_layers must be positive");

  static constexpr int64_t parameters = int64_t{width} * patch_pixels + int64_t{width} /* class */ +
                                        int64_t{tokens} * width + 4 * width /* ln_pre, ln_post */ +
                                        layers * residual_block_parameters(width) + int64_t{width} * embed;
  static constexpr int64_t buffer_elements = 0;

  // Matrix-product FLOPs (2 per multiply-add) of encoding one image: ViT-B/32 is 8.82 GFLOP.
  static constexpr double forward_flops() {
    const double t = tokens, c = width;
    return 2.0 * grid * grid * c * patch_pixels + layers * (24.0 * t * c * c + 4.0 * t * t * c) + 2.0 * c * embed;
  }
};

// Modified ResNet: a 3-conv stem, four bottleneck stages, attention pooling over a 1/32 grid.
template <ResNetConfig Cfg>
struct vision_dims<Cfg> {
  static constexpr int resolution = Cfg::image_resolution;
  static constexpr int width = Cfg::vision_width;                   // stem output channels
  static constexpr std::array<int, 4> layers = Cfg::vision_layers;
  static constexpr int embed = Cfg::embed_dim;
  static constexpr int pool_width = width * 32;                     // C of the attention pool
  static constexpr int heads = width * 32 / 64;                     // H, as OpenAI's build_model
  static constexpr int head_dim = pool_width / heads;               // D
  static constexpr int grid = resolution / 32;                      // final spatial size
  static constexpr int pool_tokens = grid * grid + 1;               // T: positions plus their mean

  static_assert(resolution % 32 == 0, "image_resolution of a ResNet must be a multiple of 32 (stem /4, three strided stages)");
  static_assert(width % 2 == 0, "vision_width must be even: the stem's first convolutions use half of it");
  static_assert(layers[0] > 0 && layers[1] > 0 && layers[2] > 0 && layers[3] > 0, "every ResNet stage needs at least one block");

  // Stage s has `planes = width << s` and outputs 4 * planes channels.
  static constexpr int planes(int stage) { return width << stage; }
  static constexpr int stage_in(int stage) { return stage == 0 ? width : 4 * planes(stage - 1); }

  static constexpr int64_t bottleneck_parameters(int64_t in, int64_t p, bool downsample) {
    return p * in + 2 * p + 9 * p * p + 2 * p + 4 * p * p + 8 * p + (downsample ? 4 * p * in + 8 * p : 0);
  }
  static constexpr int64_t bottleneck_batchnorms(bool downsample) { return downsample ? 4 : 3; }

  static constexpr int64_t stem_parameters() {
    const int64_t h = width / 2;
    return h * 3 * 9 + 2 * h + h * h * 9 + 2 * h + width * h * 9 + 2 * width;
  }
  static constexpr int64_t pool_parameters() {
    const int64_t c = pool_width;
    return int64_t{pool_tokens} * c + 3 * (c * c + c) + int64_t{embed} * c + embed;
  }
  static constexpr int64_t compute_parameters() {
    int64_t n = stem_parameters() + pool_parameters();
    for (int s = 0; s < 4; ++s)
      for (int b = 0; b < layers[s]; ++b)
        n += bottleneck_parameters(b == 0 ? stage_in(s) : 4 * planes(s), planes(s), b == 0);
    return n;
  }
  // running_mean and running_var of every BatchNorm, plus one num_batches_tracked each.
  static constexpr int64_t compute_buffer_elements() {
    int64_t n = (width / 2) * 2 + 1 + (width / 2) * 2 + 1 + width * 2 + 1;  // the stem's three
    for (int s = 0; s < 4; ++s)
      for (int b = 0; b < layers[s]; ++b) {
        const int64_t p = planes(s);
        n += (2 * p + 1) * 2 + (2 * 4 * p + 1) * (b == 0 ? 2 : 1);
      }
    return n;
  }
  static constexpr int64_t parameters = compute_parameters();
  static constexpr int64_t buffer_elements = compute_buffer_elements();

  // Floats per image of the two activation buffers inference alternates between: the largest
  // feature map, the stem's (w x R/2 x R/2) or a stage output (4 planes x side x side).
  static constexpr int64_t compute_inference_floats_per_sample() {
    int64_t largest = int64_t{width} * (resolution / 2) * (resolution / 2);
    for (int s = 0; s < 4; ++s) {
      const int64_t side = resolution / (4 << s);
      largest = std::max(largest, 4 * int64_t{planes(s)} * side * side);
    }
    return 2 * largest;
  }
  static constexpr int64_t inference_floats_per_sample = compute_inference_floats_per_sample();

  // Matrix-product FLOPs (2 per multiply-add) of the convolutions and projections for one image
  // (RN50: 11.6 GFLOP; profilers that also count normalisation and pooling report ~12.2).
  static constexpr double forward_flops() {
    double macs = 0;
    const double h = width / 2;
    double side = resolution / 2;  // the stem's convolutions run at half resolution
    macs += side * side * (h * 3 * 9 + h * h * 9 + width * h * 9);
    side = resolution / 4;
    double in = width;
    for (int s = 0; s < 4; ++s) {
      const double p = planes(s);
      for (int b = 0; b < layers[s]; ++b) {
        const double out_side = (s > 0 && b == 0) ? side / 2 : side;  // avg-pool after the 3x3 conv
        macs += side * side * (in * p + 9 * p * p) + out_side * out_side * 4 * p * p;
        if (b == 0) macs += out_side * out_side * in * 4 * p;
        in = 4 * p;
        side = out_side;
      }
    }
    const double c = pool_width, t = pool_tokens;
    macs += 2 * t * c * c + c * c + 2 * t * c + c * embed;
    return 2 * macs;
  }
};

// Everything a model needs to know about a variant.
template <Variant Cfg>
struct dims {
  using text = text_dims<Cfg>;
  using vision = vision_dims<Cfg>;
  static constexpr bool is_resnet = ResNetConfig<Cfg>;
  static constexpr int embed = Cfg::embed_dim;
  static_assert(embed > 0, "embed_dim must be positive");
  // Trained parameters of the whole model, as OpenAI's checkpoints count them.
  static constexpr int64_t parameters = text::parameters + vision::parameters;
};

}  // namespace clip
