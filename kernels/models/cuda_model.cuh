// The CLIP model on the GPU: cuda::ClipNet<Cfg, S> (device pointers in and out, for programs that
// manage their own memory and for benchmarks) and the definitions of clip::Model<Cfg, Device::cuda>
// (include/clip/cuda/model.hpp), a pimpl over ClipNet<Cfg, float> or ClipNet<Cfg, bf16>.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/cuda/model.hpp"
#include "clip/models/clip_model.hpp"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/linear.cuh"
#include "kernels/models/device_weights.cuh"
#include "kernels/models/text_transformer.cuh"
#include "kernels/models/vision_transformer.cuh"
#include "kernels/models/modified_resnet.cuh"

namespace clip::cuda {

// The image tower of a variant (as clip::detail::visual_encoder picks the CPU one).
template <class Cfg, class S>
struct image_tower;
template <ViTConfig Cfg, class S>
struct image_tower<Cfg, S> {
  using type = CudaVisionTransformer<Cfg, S>;
};
template <ResNetConfig Cfg, class S>
struct image_tower<Cfg, S> {
  using type = CudaModifiedResNet<Cfg, S>;
};
template <class Cfg, class S>
using image_tower_t = typename image_tower<Cfg, S>::type;

// Weights uploaded once, activations of both towers planned for `capacity` samples in one arena.
template <Variant Cfg, class S>
class ClipNet {
 public:
  using Params = typename Clip<Cfg>::Params;
  using Image = image_tower_t<Cfg, S>;
  using Text = CudaTextTransformer<Cfg, S>;
  static constexpr int R = Clip<Cfg>::R, T = Clip<Cfg>::T, E = Clip<Cfg>::E, V = Cfg::vocab_size;

  // `keys`: the host Params whose member addresses name the tensors (must outlive the net);
  // `values`: the weights to upload (the same object, or another of the same type); `masters`:
  // where the fp32 masters live (device_weights.cuh; sharded: ZeRO-1 in bf16, TrainNet).
  ClipNet(Context& ctx, Params& keys, const Params& values, int64_t capacity, bool training = false,
          bool recompute = false, MasterPlacement masters = {})
      : ctx_(ctx), keys_(keys), weights_(ctx, keys, values, training, std::move(masters)), training_(training),
        recompute_(recompute) {
    reserve(capacity);
  }
  ClipNet(Context& ctx, Params& host, int64_t capacity, bool training = false)
      : ClipNet(ctx, host, host, capacity, training) {}

  // Re-plans the activations for `capacity` samples when that is more than planned (not during a
  // step: pointers into the old arena die).
  void reserve(int64_t capacity) {
    CLIP_CHECK(capacity >= 0, "a batch capacity cannot be negative (got ", capacity, ")");
    if (arena_ && capacity <= capacity_) return;
    image_acts_.reset();
    text_acts_.reset();
    arena_.reset();
    capacity_ = capacity;
    // The plan's tower interface is Acts(arena, capacity, training) and bytes(capacity, training);
    // towers that also take `recompute` (ViT, text) get it.
    constexpr bool image_recomputes = std::is_constructible_v<typename Image::Acts, Arena&, int64_t, bool, bool>;
    int64_t bytes = Text::bytes(capacity, training_, recompute_);
    if constexpr (image_recomputes) bytes += Image::bytes(capacity, training_, recompute_);
    else bytes += Image::bytes(capacity, training_);
    bytes += 2 * static_cast<int64_t>(Arena::alignment);  // the second tower starts at an aligned offset
    arena_ = std::make_unique<Arena>(static_cast<size_t>(bytes));
    if constexpr (image_recomputes) image_acts_.emplace(*arena_, capacity, training_, recompute_);
    else image_acts_.emplace(*arena_, capacity, training_);
    text_acts_.emplace(*arena_, capacity, training_, recompute_);
  }
  int64_t capacity() const { return capacity_; }

  // Inference: features [B, E] (S, device) of device images [B, 3, R, R] (fp32).
  void encode_image(const float* d_images, S* d_features, int64_t batch) {
    check_batch(batch);
    Image::forward(ctx_, weights_, keys_.visual, *image_acts_, d_images, d_features, batch, /*training=*/false,
                   /*update_running_stats=*/false);
  }
  // Inference: features [B, E] of device ids [B, T], device pool positions [B] and the number of
  // positions the batch needs (both from TextBatch::from_host of the same ids).
  void encode_text(const int32_t* d_tokens, const int32_t* d_pool, int64_t positions, S* d_features, int64_t batch) {
    check_batch(batch);
    Text::forward(ctx_, weights_, keys_, *text_acts_, d_tokens, d_pool, positions, d_features, batch,
                  /*training=*/false);
  }

  // Training halves (TrainNet composes them): forward keeping activations, then backward (+= grads).
  void image_forward_train(const float* d_images, S* d_features, int64_t batch, bool update_running_stats = true) {
    check_batch(batch);
    Image::forward(ctx_, weights_, keys_.visual, *image_acts_, d_images, d_features, batch, /*training=*/true,
                   update_running_stats);
  }
  void image_backward(const S* d_features, int64_t batch) {
    Image::backward(ctx_, weights_, keys_.visual, *image_acts_, d_features, batch);
  }
  void text_forward_train(const int32_t* d_tokens, const int32_t* d_pool, int64_t positions, S* d_features,
                          int64_t batch) {
    check_batch(batch);
    Text::forward(ctx_, weights_, keys_, *text_acts_, d_tokens, d_pool, positions, d_features, batch,
                  /*training=*/true);
  }
  void text_backward(const S* d_features, int64_t batch) {
    Text::backward(ctx_, weights_, keys_, *text_acts_, d_features, batch);
  }

  DeviceWeights<S>& weights() { return weights_; }
  const DeviceWeights<S>& weights() const { return weights_; }
  // The towers' activations (tests read intermediate results from them).
  typename Image::Acts& image_acts() { return *image_acts_; }
  typename Text::Acts& text_acts() { return *text_acts_; }
  Params& keys() { return keys_; }
  Context& context() { return ctx_; }

 private:
  Context& ctx_;
  Params& keys_;
  DeviceWeights<S> weights_;
  bool training_, recompute_;
  int64_t capacity_ = 0;
  std::unique_ptr<Arena> arena_;
  std::optional<typename Image::Acts> image_acts_;
  std::optional<typename Text::Acts> text_acts_;

  void check_batch(int64_t batch) const {
    CLIP_CHECK(batch >= 0 && batch <= capacity_, "this network's activations hold ", capacity_,
               " samples, not ", batch, " (reserve() more outside a step)");
  }
};

}  // namespace clip::cuda

namespace clip {

// ---- Model<Cfg, Device::cuda> -------------------------------------------------------------------

template <Variant Cfg>
struct Model<Cfg, Device::cuda>::Impl {
  static constexpr int R = Cfg::image_resolution, T = Cfg::context_length, E = Cfg::embed_dim;
  cuda::Precision precision;
  cuda::Context ctx;
  std::unique_ptr<Params> host;  // the host copy, and the keys of the device tensors
  std::unique_ptr<cuda::ClipNet<Cfg, float>> net32;
  std::unique_ptr<cuda::ClipNet<Cfg, cuda::bf16>> net16;
  // Per-call staging, grown as needed (outside any forward).
  cuda::DeviceBuffer<float> images, features32;
  cuda::DeviceBuffer<cuda::bf16> features16;
  cuda::DeviceBuffer<int32_t> ids, pool;

  Impl(cuda::Precision p, int device) : precision(p), ctx(device), host(std::make_unique<Params>()) {
    zero(*host);
    if (p == cuda::Precision::fp32) net32 = std::make_unique<cuda::ClipNet<Cfg, float>>(ctx, *host, 0);
    else net16 = std::make_unique<cuda::ClipNet<Cfg, cuda::bf16>>(ctx, *host, 0);
  }

  void upload() {
    if (net32) net32->weights().upload(ctx, *host);
    else net16->weights().upload(ctx, *host);
  }

  template <class T_>
  static void ensure(cuda::DeviceBuffer<T_>& b, int64_t n) {
    if (b.size() < n) b = cuda::DeviceBuffer<T_>(n);
  }

  // features [B, E] (float, device) -> host tensor.
  Tensor finish(int64_t batch) {
    Tensor out({batch, E});
    if (batch == 0) return out;
    if (net16) cuda::convert(ctx, features32.data(), static_cast<const cuda::bf16*>(features16.data()), batch * E);
    features32.download(out.data(), batch * E, ctx.stream());
    ctx.synchronize();
    return out;
  }

  void prepare(int64_t batch) {
    ensure(features32, batch * E);
    if (net16) ensure(features16, batch * E), net16->reserve(batch);
    else net32->reserve(batch);
  }

  Tensor encode_image(const Tensor& imgs) {
    const int64_t batch = imgs.shape[0];
    prepare(batch);
    ensure(images, batch * 3 * R * R);
    if (batch > 0) images.upload(imgs.data(), batch * 3 * R * R, ctx.stream());
    if (net32) net32->encode_image(images.data(), features32.data(), batch);
    else net16->encode_image(images.data(), features16.data(), batch);
    return finish(batch);
  }

  template <class Id>
  Tensor encode_text(std::span<const Id> tokens) {
    CLIP_CHECK(tokens.size() % T == 0, Cfg::name, " encodes rows of ", T, " token ids; got ", tokens.size(), " ids");
    const int64_t batch = static_cast<int64_t>(tokens.size()) / T;
    const cuda::TextBatch tb = cuda::TextBatch::from_host(tokens.data(), batch, T, Cfg::vocab_size);
    prepare(batch);
    ensure(ids, batch * T);
    ensure(pool, batch);
    if (batch == 0) return finish(0);
    std::vector<int32_t> narrow(tokens.begin(), tokens.end());
    ids.upload(narrow.data(), batch * T, ctx.stream());
    pool.upload(tb.pool.data(), batch, ctx.stream());
    if (net32) net32->encode_text(ids.data(), pool.data(), tb.positions, features32.data(), batch);
    else net16->encode_text(ids.data(), pool.data(), tb.positions, features16.data(), batch);
    return finish(batch);  // synchronises before `narrow` dies (uploads from pageable memory are staged anyway)
  }
};

template <Variant Cfg>
Model<Cfg, Device::cuda>::Model(cuda::Precision precision, int device)
    : impl_(std::make_unique<Impl>(precision, device)) {}

template <Variant Cfg>
Model<Cfg, Device::cuda>::Model(const Model<Cfg, Device::cpu>& host, cuda::Precision precision, int device)
    : Model(precision, device) {
  *impl_->host = host.params();
  impl_->upload();
}

template <Variant Cfg>
Model<Cfg, Device::cuda>::Model(const std::filesystem::path& weights, cuda::Precision precision, int device,
                                Extra extra)
    : Model(precision, device) {
  load(weights, extra);
}

template <Variant Cfg>
Model<Cfg, Device::cuda>::~Model() = default;
template <Variant Cfg>
Model<Cfg, Device::cuda>::Model(Model&&) noexcept = default;
template <Variant Cfg>
Model<Cfg, Device::cuda>& Model<Cfg, Device::cuda>::operator=(Model&&) noexcept = default;

template <Variant Cfg>
void Model<Cfg, Device::cuda>::load(const std::filesystem::path& weights, Extra extra) {
  load_state_dict(*impl_->host, SafeTensors::open(weights), extra);
  impl_->upload();
}
template <Variant Cfg>
void Model<Cfg, Device::cuda>::load(const SafeTensors& file, Extra extra) {
  load_state_dict(*impl_->host, file, extra);
  impl_->upload();
}

template <Variant Cfg>
typename Model<Cfg, Device::cuda>::Params& Model<Cfg, Device::cuda>::params() {
  return *impl_->host;
}
template <Variant Cfg>
const typename Model<Cfg, Device::cuda>::Params& Model<Cfg, Device::cuda>::params() const {
  return *impl_->host;
}
template <Variant Cfg>
void Model<Cfg, Device::cuda>::upload() {
  impl_->upload();
}
template <Variant Cfg>
cuda::Precision Model<Cfg, Device::cuda>::precision() const {
  return impl_->precision;
}

template <Variant Cfg>
Tensor Model<Cfg, Device::cuda>::encode_image(const Tensor& images) const {
  CLIP_CHECK(images.shape.size() == 4 && images.shape[1] == 3 && images.shape[2] == image_resolution &&
                 images.shape[3] == image_resolution,
             Cfg::name, " encodes images of shape [B, 3, ", image_resolution, ", ", image_resolution, "], not ",
             shape_string(images.shape));
  return impl_->encode_image(images);
}

template <Variant Cfg>
Tensor Model<Cfg, Device::cuda>::encode_text(std::span<const int32_t> tokens) const {
  return impl_->encode_text(tokens);
}
template <Variant Cfg>
Tensor Model<Cfg, Device::cuda>::encode_text(std::span<const int64_t> tokens) const {
  return impl_->encode_text(tokens);
}
template <Variant Cfg>
Tensor Model<Cfg, Device::cuda>::encode_text(const Tensor& tokens) const {
  const std::vector<int32_t> ids = token_ids_of<Cfg>(tokens);
  return impl_->encode_text(std::span<const int32_t>(ids));
}

template <Variant Cfg>
Logits Model<Cfg, Device::cuda>::logits(const Tensor& image_features, const Tensor& text_features) const {
  auto check = [](const Tensor& f, const char* what) {
    CLIP_CHECK(f.shape.size() == 2 && f.shape[1] == embed_dim, what, " features must have shape [B, ", embed_dim,
               "], not ", shape_string(f.shape));
  };
  check(image_features, "image");
  check(text_features, "text");
  const int64_t bi = image_features.shape[0], bt = text_features.shape[0];
  Logits out{Tensor({bi, bt}), Tensor({bt, bi})};
  Network::logits(*impl_->host, image_features.data(), bi, text_features.data(), bt, out.per_image.data(),
                  out.per_text.data());
  return out;
}

}  // namespace clip
