// clip::Model<Cfg, Device::cuda>: the CLIP model on a GPU, with the CPU Model's API.
//
//   clip::Model<clip::variants::ViT_B_32, clip::Device::cuda> model(clip::cuda::Precision::bf16);
//   model.load("ViT-B-32.safetensors");                 // host copy, then one upload
//   clip::Tensor img = model.encode_image(images);       // [B, 3, 224, 224] -> [B, 512] (float)
//
// Declarations only (g++-compilable, no CUDA headers): the members are defined in
// kernels/models/cuda_model.cuh and instantiated per variant by a .cu unit
// (`template class clip::Model<V, clip::Device::cuda>;`). The model keeps a host copy of the
// weights (params()); after changing it, call upload(). Activation memory is planned once per
// batch capacity and re-planned (outside any forward) when a larger batch arrives.
#pragma once

#include <concepts>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "clip/config/device.hpp"
#include "clip/io/state_dict.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/tensor/tensor.hpp"

namespace clip {

template <Variant Cfg>
class Model<Cfg, Device::cuda> {
 public:
  using Config = Cfg;
  using Network = Clip<Cfg>;
  using Params = typename Network::Params;
  static constexpr int image_resolution = Cfg::image_resolution;
  static constexpr int context_length = Cfg::context_length;
  static constexpr int embed_dim = Cfg::embed_dim;

  // All weights zero (load() them); `device` is the CUDA device ordinal.
  explicit Model(cuda::Precision precision = cuda::Precision::bf16, int device = 0);
  // The weights of a CPU model, copied.
  explicit Model(const Model<Cfg, Device::cpu>& host, cuda::Precision precision = cuda::Precision::bf16,
                 int device = 0);
  // A safetensors file with OpenAI's (or Hugging Face's) names.
  explicit Model(const std::filesystem::path& weights, cuda::Precision precision = cuda::Precision::bf16,
                 int device = 0, Extra extra = Extra::forbid);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  void load(const std::filesystem::path& weights, Extra extra = Extra::forbid);
  void load(const SafeTensors& file, Extra extra = Extra::forbid);

  // The host copy of the weights; upload() after changing it.
  Params& params();
  const Params& params() const;
  void upload();

  cuda::Precision precision() const;

  // [B, 3, R, R] preprocessed images -> [B, E] features (not normalised).
  Tensor encode_image(const Tensor& images) const;
  // Token rows, context_length ids each -> [B, E] features (not normalised).
  Tensor encode_text(std::span<const int32_t> tokens) const;
  Tensor encode_text(std::span<const int64_t> tokens) const;
  template <std::integral Id>
  Tensor encode_text(const std::vector<Id>& tokens) const {
    return encode_text(std::span<const Id>(tokens));
  }
  template <std::integral Id>
    requires(!std::same_as<Id, int32_t> && !std::same_as<Id, int64_t>)
  Tensor encode_text(std::span<const Id> tokens) const {
    return encode_text(std::span<const int64_t>(std::vector<int64_t>(tokens.begin(), tokens.end())));
  }
  // Token ids held in a float tensor [B, context_length].
  Tensor encode_text(const Tensor& tokens) const;

  // exp(logit_scale) * cosine similarities, both directions (computed on the host, as the CPU Model).
  Logits logits(const Tensor& image_features, const Tensor& text_features) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace clip
