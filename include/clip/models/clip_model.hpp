// The CLIP model: an image encoder (vision transformer or modified ResNet, chosen by the variant),
// the text encoder, and the contrastive head.
//
//   clip::Model<clip::variants::ViT_B_32> model("ViT-B-32.safetensors");
//   clip::Tensor img = model.encode_image(images);   // [B, 3, 224, 224] -> [B, 512]
//   clip::Tensor txt = model.encode_text(tokens);    // [B, 77] ids      -> [B, 512]
//   auto [per_image, per_text] = model.logits(img, txt);
//
// Clip<Cfg> is the same model as static functions on a Params struct, for code that manages its
// own memory (trainers, benchmarks).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "clip/config/device.hpp"
#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/io/safetensors.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/modified_resnet.hpp"
#include "clip/models/text_transformer.hpp"
#include "clip/models/vision_transformer.hpp"
#include "clip/ops/matmul_precision.hpp"
#include "clip/tensor/param.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

namespace detail {
// The image encoder of a variant. A partial specialisation per concept rather than
// std::conditional_t: naming VisionTransformer<RN50> at all is ill-formed (its constraint fails),
// even in the branch conditional_t would discard.
template <class Cfg>
struct visual_encoder;
template <ViTConfig Cfg>
struct visual_encoder<Cfg> {
  using type = VisionTransformer<Cfg>;
};
template <ResNetConfig Cfg>
struct visual_encoder<Cfg> {
  using type = ModifiedResNet<Cfg>;
};
}  // namespace detail

template <Variant Cfg>
struct Clip {
  using Visual = typename detail::visual_encoder<Cfg>::type;  // ModifiedResNet or VisionTransformer
  using Text = TextTransformer<Cfg>;
  static constexpr int R = Cfg::image_resolution;  // image side
  static constexpr int T = Cfg::context_length;    // T
  static constexpr int E = Cfg::embed_dim;         // E

  // Activation memory of inference per image and per caption, known before anything is allocated.
  static constexpr int64_t image_activation_bytes_per_sample = sizeof(float) * Visual::inference_floats_per_sample;
  static constexpr int64_t text_activation_bytes_per_sample = sizeof(float) * Text::inference_floats_per_sample;

  // Flat, as OpenAI's CLIP module: positional_embedding, text_projection, transformer,
  // token_embedding, ln_final (from Text::Params), logit_scale and visual.
  struct Params : Text::Params {
    Param<> logit_scale;  // []
    typename Visual::Params visual;

    // OpenAI's exact state_dict order.
    template <class F>
    void visit(F&& f, const std::string& prefix = "") {
      f(prefix + "positional_embedding", this->positional_embedding, Role::parameter);
      f(prefix + "text_projection", this->text_projection, Role::parameter);
      f(prefix + "logit_scale", logit_scale, Role::parameter);
      visual.visit(f, prefix + "visual.");
      this->transformer.visit(f, prefix + "transformer.");
      this->token_embedding.visit(f, prefix + "token_embedding.");
      this->ln_final.visit(f, prefix + "ln_final.");
    }
  };

  // features [B, E] of images [B, 3, R, R] (normalised pixels), not L2-normalised. The matrix
  // products run in the calling thread's matmul_precision() (fp32 unless a scope says otherwise).
  static void encode_image(const Params& p, const float* images, float* features, int64_t batch,
                           Trace* trace = nullptr) {
    Visual::forward(p.visual, images, features, batch, trace);
  }
  // The same with the products in `precision` (bf16: operands rounded to bf16, fp32 sums).
  static void encode_image(const Params& p, const float* images, float* features, int64_t batch,
                           Precision precision, Trace* trace = nullptr) {
    const MatmulPrecisionScope scope(precision);
    Visual::forward(p.visual, images, features, batch, trace);
  }

  // features [B, E] of token rows [B, T], not L2-normalised.
  template <std::integral Id>
  static void encode_text(const Params& p, const Id* tokens, float* features, int64_t batch,
                          Trace* trace = nullptr) {
    Text::forward(p, tokens, features, batch, trace);
  }
  template <std::integral Id>
  static void encode_text(const Params& p, const Id* tokens, float* features, int64_t batch, Precision precision,
                          Trace* trace = nullptr) {
    const MatmulPrecisionScope scope(precision);
    Text::forward(p, tokens, features, batch, trace);
  }

  // logits_per_image[i, j] = exp(logit_scale) * cos(image i, text j); logits_per_text is its
  // transpose (may be null). Features are L2-normalised without an epsilon, as OpenAI's forward.
  static void logits(const Params& p,
                     const float* image_features,  // [Bi, E]
                     int64_t images,
                     const float* text_features,   // [Bt, E]
                     int64_t texts,
                     float* logits_per_image,      // [Bi, Bt]
                     float* logits_per_text = nullptr) {  // [Bt, Bi]
    auto normalized = [](const float* f, int64_t n) {
      std::vector<float> out(f, f + n * E);
      for (int64_t i = 0; i < n; ++i) {
        float* row = out.data() + i * E;
        float sq = 0.0f;
        for (int j = 0; j < E; ++j) sq += row[j] * row[j];
        const float norm = std::sqrt(sq);
        for (int j = 0; j < E; ++j) row[j] /= norm;
      }
      return out;
    };
    const std::vector<float> img = normalized(image_features, images);
    const std::vector<float> txt = normalized(text_features, texts);
    const float scale = std::exp(p.logit_scale[0]);
    for (int64_t i = 0; i < images; ++i)
      for (int64_t j = 0; j < texts; ++j) {
        float dot = 0.0f;
        for (int k = 0; k < E; ++k) dot += img[i * E + k] * txt[j * E + k];
        logits_per_image[i * texts + j] = scale * dot;
        if (logits_per_text) logits_per_text[j * images + i] = scale * dot;
      }
  }
};

// Both directions of the contrastive logits.
struct Logits {
  Tensor per_image;  // [B_img, B_txt]
  Tensor per_text;   // [B_txt, B_img]
};

// Token ids held in a float tensor [B, context_length] (as SafeTensors::tensor reads I64 files),
// checked to be whole ids of the variant's vocabulary.
template <Variant Cfg>
std::vector<int32_t> token_ids_of(const Tensor& tokens) {
  CLIP_CHECK(tokens.shape.size() == 2 && tokens.shape[1] == Cfg::context_length, Cfg::name,
             " encodes token ids of shape [B, ", Cfg::context_length, "], not ", shape_string(tokens.shape));
  std::vector<int32_t> ids(tokens.values.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const float v = tokens.values[i];
    CLIP_CHECK(v >= 0 && v < float(Cfg::vocab_size) && v == std::floor(v), "token id ", v, " at position ", i,
               " is not an id of the ", Cfg::vocab_size, "-token vocabulary");
    ids[i] = static_cast<int32_t>(v);
  }
  return ids;
}

// The object API: weights on the heap, tensors in and out. Model<Cfg> runs on the CPU;
// Model<Cfg, Device::cuda> (include/clip/cuda/model.hpp) is the same model on a GPU.
template <Variant Cfg, Device D = Device::cpu>
class Model;

template <Variant Cfg>
class Model<Cfg, Device::cpu> {
 public:
  using Config = Cfg;
  using Network = Clip<Cfg>;
  using Params = typename Network::Params;
  static constexpr int image_resolution = Cfg::image_resolution;
  static constexpr int context_length = Cfg::context_length;
  static constexpr int embed_dim = Cfg::embed_dim;

  // All weights zero; fill them with load() or through params(). `precision` is what the matrix
  // products run in (weights stay fp32 either way): bf16 runs them on AMX tiles where the CPU
  // has them (see ops/cpu_features.hpp), fp32 is the reference.
  explicit Model(Precision precision = Precision::fp32) : params_(std::make_unique<Params>()), precision_(precision) {}
  // Loads a safetensors file with OpenAI's (or Hugging Face's) names.
  explicit Model(const std::filesystem::path& weights, Extra extra = Extra::forbid) : Model() { load(weights, extra); }
  Model(const std::filesystem::path& weights, Precision precision, Extra extra = Extra::forbid) : Model(precision) {
    load(weights, extra);
  }

  void load(const std::filesystem::path& weights, Extra extra = Extra::forbid) {
    load_state_dict(*params_, SafeTensors::open(weights), extra);
  }
  void load(const SafeTensors& file, Extra extra = Extra::forbid) { load_state_dict(*params_, file, extra); }

  Params& params() { return *params_; }
  const Params& params() const { return *params_; }
  Precision precision() const { return precision_; }

  // [B, 3, R, R] preprocessed images -> [B, E] features (not normalised).
  Tensor encode_image(const Tensor& images, Trace* trace = nullptr) const {
    CLIP_CHECK(images.shape.size() == 4 && images.shape[1] == 3 && images.shape[2] == image_resolution &&
                   images.shape[3] == image_resolution,
               Cfg::name, " encodes images of shape [B, 3, ", image_resolution, ", ", image_resolution, "], not ",
               shape_string(images.shape));
    const int64_t batch = images.shape[0];
    Tensor features({batch, embed_dim});
    Network::encode_image(*params_, images.data(), features.data(), batch, precision_, trace);
    return features;
  }

  // Token rows, `context_length` ids each (B * 77 values) -> [B, E] features (not normalised).
  template <std::integral Id>
  Tensor encode_text(std::span<const Id> tokens, Trace* trace = nullptr) const {
    CLIP_CHECK(tokens.size() % context_length == 0, Cfg::name, " encodes rows of ", context_length,
               " token ids; got ", tokens.size(), " ids");
    const int64_t batch = static_cast<int64_t>(tokens.size()) / context_length;
    Tensor features({batch, embed_dim});
    Network::encode_text(*params_, tokens.data(), features.data(), batch, precision_, trace);
    return features;
  }
  template <std::integral Id>
  Tensor encode_text(const std::vector<Id>& tokens, Trace* trace = nullptr) const {
    return encode_text(std::span<const Id>(tokens), trace);
  }
  // Token ids held in a float tensor [B, context_length] (as SafeTensors::tensor reads I64 files).
  Tensor encode_text(const Tensor& tokens, Trace* trace = nullptr) const {
    const std::vector<int32_t> ids = token_ids_of<Cfg>(tokens);
    return encode_text(std::span<const int32_t>(ids), trace);
  }

  // exp(logit_scale) * cosine similarities, both directions.
  Logits logits(const Tensor& image_features, const Tensor& text_features) const {
    auto check = [](const Tensor& f, const char* what) {
      CLIP_CHECK(f.shape.size() == 2 && f.shape[1] == embed_dim, what, " features must have shape [B, ", embed_dim,
                 "], not ", shape_string(f.shape));
    };
    check(image_features, "image");
    check(text_features, "text");
    const int64_t bi = image_features.shape[0], bt = text_features.shape[0];
    Logits out{Tensor({bi, bt}), Tensor({bt, bi})};
    Network::logits(*params_, image_features.data(), bi, text_features.data(), bt, out.per_image.data(),
                    out.per_text.data());
    return out;
  }

 private:
  std::unique_ptr<Params> params_;
  Precision precision_ = Precision::fp32;
};

}  // namespace clip
