// All tensors of a host Params struct on the device, in visit order (include/clip/cuda/weight_layout.hpp):
// one fp32 master buffer (BatchNorm running statistics included), the compute copy the kernels
// read (S; for S = float it IS the master buffer, no second copy), and fp32 gradients with the
// same offsets. Composition code names a tensor by its host member: w(p.visual.ln_pre.weight).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "clip/cuda/weight_layout.hpp"
#include "clip/tensor/param.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/linear.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

template <class S>
class DeviceWeights {
 public:
  static constexpr bool separate_copy = !std::is_same_v<S, float>;

  // Uploads `host`; its member addresses are the keys of w()/master()/g(). Gradients are
  // allocated (and zeroed) only when `gradients` (training).
  template <class HostParams>
  DeviceWeights(Context& ctx, HostParams& host, bool gradients = true) : DeviceWeights(ctx, host, host, gradients) {}

  // Keys from `keys`, values from `values` (another instance of the same type): a model can keep
  // an untouched Params as its key object (its storage is never written, so never paged in).
  template <class HostParams>
  DeviceWeights(Context& ctx, HostParams& keys, const HostParams& values, bool gradients)
      : layout_(keys), master_(layout_.size()), compute_(separate_copy ? layout_.size() : 0),
        grad_(gradients ? layout_.size() : 0) {
    upload(ctx, values);
    if (gradients) grad_.zero(ctx.stream());
  }

  template <int... Dims>
  S* w(const Param<Dims...>& member) const {
    return compute() + layout_.offset(member);
  }
  template <int... Dims>
  float* master(const Param<Dims...>& member) const {
    return const_cast<float*>(master_.data()) + layout_.offset(member);
  }
  template <int... Dims>
  float* g(const Param<Dims...>& member) const {
    CLIP_CHECK(grad_.size() > 0, "these device weights were made without gradients (inference)");
    return const_cast<float*>(grad_.data()) + layout_.offset(member);
  }

  float* master_data() { return master_.data(); }
  S* compute_data() { return compute(); }
  float* grad_data() { return grad_.data(); }
  int64_t size() const { return layout_.size(); }
  bool has_gradients() const { return grad_.size() > 0; }
  const WeightLayout& layout() const { return layout_; }

  // host (same Params type) -> master -> compute copy.
  template <class HostParams>
  void upload(Context& ctx, const HostParams& host) {
    std::vector<float> flat(static_cast<size_t>(layout_.size()));
    layout_.pack(host, flat.data());
    master_.upload(flat.data(), layout_.size(), ctx.stream());
    refresh_compute_copy(ctx);
    ctx.synchronize();  // `flat` dies here
  }

  // master -> host (weights and BatchNorm running statistics; Counters are host-side already).
  template <class HostParams>
  void download(Context& ctx, HostParams& host) const {
    std::vector<float> flat(static_cast<size_t>(layout_.size()));
    master_.download(flat.data(), layout_.size(), ctx.stream());
    ctx.synchronize();
    layout_.unpack(flat.data(), host);
  }

  // S <- master (after the optimizer or an upload); nothing to do for S = float.
  void refresh_compute_copy(Context& ctx) {
    if constexpr (separate_copy) convert<S>(ctx, compute_.data(), master_.data(), layout_.size());
  }

 private:
  WeightLayout layout_;
  DeviceBuffer<float> master_;
  DeviceBuffer<S> compute_;
  DeviceBuffer<float> grad_;

  S* compute() const {
    if constexpr (separate_copy) return const_cast<S*>(compute_.data());
    else return const_cast<float*>(master_.data());
  }
};

}  // namespace clip::cuda
