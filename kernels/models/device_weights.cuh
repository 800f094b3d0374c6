// All tensors of a host Params struct on the device, in visit order (include/clip/cuda/weight_layout.hpp):
// one fp32 master buffer (BatchNorm running statistics included), the compute copy the kernels
// read (S; for S = float it IS the master buffer, no second copy), and fp32 gradients with the
// same offsets. Composition code names a tensor by its host member: w(p.visual.ln_pre.weight).
//
// Master placement. By default the master buffer is whole (layout-sized). Under ZeRO-1 with a
// bf16 copy (MasterPlacement::sharded) the trained tensors' fp32 masters live in the optimizer's
// shards (kernels/dist/sharded_adamw.cuh), each rank holding its owned floats only, and the master
// buffer here shrinks to the fp32 values every rank keeps (replicated_masters.hpp: buffers and
// the named trained tensors, e.g. logit_scale), packed; master(member) finds them there and
// refuses any other. With S = float the master is the compute copy and cannot be sharded.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/cuda/replicated_masters.hpp"
#include "clip/cuda/weight_layout.hpp"
#include "clip/tensor/param.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/linear.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

// Where the trained tensors' fp32 masters live: here, whole (default), or in ZeRO-1's shards,
// with `replicated` naming the trained tensors every rank still keeps in fp32.
struct MasterPlacement {
  bool sharded = false;
  std::vector<std::string> replicated;
};

template <class S>
class DeviceWeights {
 public:
  static constexpr bool separate_copy = !std::is_same_v<S, float>;
  // Host -> device conversion goes through a staging of this many floats when the masters are
  // sharded (no layout-sized fp32 buffer, even for a moment: a resume must not need one).
  static constexpr int64_t kUploadFloats = int64_t{1} << 22;

  // Uploads `host`; its member addresses are the keys of w()/master()/g(). Gradients are
  // allocated (and zeroed) only when `gradients` (training).
  template <class HostParams>
  DeviceWeights(Context& ctx, HostParams& host, bool gradients = true) : DeviceWeights(ctx, host, host, gradients) {}

  // Keys from `keys`, values from `values` (another instance of the same type): a model can keep
  // an untouched Params as its key object (its storage is never written, so never paged in).
  // Under a sharded placement the trained masters are not uploaded here (the optimizer's shards
  // take them from the host: ShardedAdamW::load_masters).
  template <class HostParams>
  DeviceWeights(Context& ctx, HostParams& keys, const HostParams& values, bool gradients, MasterPlacement placement = {})
      : layout_(keys), replicated_(replicated_of(layout_, placement)),
        master_(replicated_ ? replicated_->size : layout_.size()), compute_(separate_copy ? layout_.size() : 0),
        grad_(gradients ? layout_.size() : 0) {
    upload(ctx, values);
    if (gradients) grad_.zero(ctx.stream());
  }

  template <int... Dims>
  S* w(const Param<Dims...>& member) const {
    return compute() + layout_.offset(member);
  }
  // The fp32 master of a tensor (sharded placement: a buffer or a replicated trained tensor only).
  template <int... Dims>
  float* master(const Param<Dims...>& member) const {
    const int64_t offset = layout_.offset(member);
    if (!replicated_) return const_cast<float*>(master_.data()) + offset;
    const int64_t at = replicated_->position(offset);
    CLIP_CHECK(at >= 0, "the fp32 master of ", layout_.entry(&member).name, " is sharded across the ranks (ZeRO-1): "
               "only the BatchNorm buffers and the replicated tensors are kept whole on every rank");
    return const_cast<float*>(master_.data()) + at;
  }
  template <int... Dims>
  float* g(const Param<Dims...>& member) const {
    CLIP_CHECK(grad_.size() > 0, "these device weights were made without gradients (inference)");
    return const_cast<float*>(grad_.data()) + layout_.offset(member);
  }

  // The whole (layout-sized) master buffer; refused when the masters are sharded.
  float* master_data() {
    CLIP_CHECK(!replicated_, "the fp32 master weights are sharded across the ranks (ZeRO-1): there is no whole buffer");
    return master_.data();
  }
  S* compute_data() { return compute(); }
  float* grad_data() { return grad_.data(); }
  int64_t size() const { return layout_.size(); }
  bool has_gradients() const { return grad_.size() > 0; }
  const WeightLayout& layout() const { return layout_; }
  bool masters_sharded() const { return replicated_.has_value(); }
  // The fp32 values kept here when the masters are sharded (null when whole).
  const ReplicatedMasters* replicated() const { return replicated_ ? &*replicated_ : nullptr; }
  int64_t master_floats() const { return master_.size(); }

  // host (same Params type) -> master -> compute copy. Sharded placement: the replicated values
  // into the master buffer, every tensor's S image through a bounded fp32 staging.
  template <class HostParams>
  void upload(Context& ctx, const HostParams& host) {
    std::vector<float> flat(static_cast<size_t>(layout_.size()));
    layout_.pack(host, flat.data());
    if (!replicated_) {
      master_.upload(flat.data(), layout_.size(), ctx.stream());
      refresh_compute_copy(ctx);
    } else {
      std::vector<float> packed(static_cast<size_t>(replicated_->size));
      replicated_->pack(flat.data(), packed.data());
      master_.upload(packed.data(), replicated_->size, ctx.stream());
      DeviceBuffer<float> staging(std::min(kUploadFloats, layout_.size()));
      for (int64_t at = 0; at < layout_.size(); at += staging.size()) {  // one stream: each chunk waits for the last
        const int64_t n = std::min(staging.size(), layout_.size() - at);
        staging.upload(flat.data() + at, n, ctx.stream());
        convert<S>(ctx, compute_.data() + at, staging.data(), n);
      }
      ctx.synchronize();  // `packed` and the staging die here
    }
    ctx.synchronize();  // `flat` dies here
  }

  // master -> host (weights and BatchNorm running statistics; Counters are host-side already).
  // Sharded placement: refused (the trained masters are the optimizer's; TrainNet gathers them
  // and fills the rest with download_replicated).
  template <class HostParams>
  void download(Context& ctx, HostParams& host) const {
    CLIP_CHECK(!replicated_, "the fp32 master weights are sharded across the ranks (ZeRO-1): the trainer gathers them");
    std::vector<float> flat(static_cast<size_t>(layout_.size()));
    master_.download(flat.data(), layout_.size(), ctx.stream());
    ctx.synchronize();
    layout_.unpack(flat.data(), host);
  }
  // Sharded placement: the replicated values into their places of a layout-sized host buffer.
  void download_replicated(Context& ctx, float* flat) const {
    CLIP_CHECK(replicated_, "download_replicated is for sharded master weights");
    std::vector<float> packed(static_cast<size_t>(replicated_->size));
    master_.download(packed.data(), replicated_->size, ctx.stream());
    replicated_->unpack(packed.data(), flat);
  }

  // S <- master (after the optimizer or an upload); nothing to do for S = float. Sharded
  // placement: refused (the optimizer writes the S image of each shard, gathered as S).
  void refresh_compute_copy(Context& ctx) {
    CLIP_CHECK(!replicated_, "with sharded master weights the compute copy is gathered, not rebuilt");
    if constexpr (separate_copy) convert<S>(ctx, compute_.data(), master_.data(), layout_.size());
  }

 private:
  WeightLayout layout_;
  std::optional<ReplicatedMasters> replicated_;  // the sharded placement's packed fp32 values
  DeviceBuffer<float> master_;
  DeviceBuffer<S> compute_;
  DeviceBuffer<float> grad_;

  static std::optional<ReplicatedMasters> replicated_of(const WeightLayout& layout, const MasterPlacement& placement) {
    if (!placement.sharded) return std::nullopt;
    CLIP_CHECK(separate_copy, "fp32 training cannot shard its master weights: they are the weights the kernels read");
    return replicated_masters(layout, placement.replicated);
  }

  S* compute() const {
    if constexpr (separate_copy) return const_cast<S*>(compute_.data());
    else return const_cast<float*>(master_.data());
  }
};

}  // namespace clip::cuda
