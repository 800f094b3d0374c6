// Where every tensor of a host Params struct lives in the CUDA back end's flat weight buffers.
//
// The device keeps one fp32 master buffer, one compute copy (float or bf16) and one fp32
// gradient buffer, all with the same offsets: tensor i of `visit` order starts at offset(i),
// rounded up to a multiple of kAlign elements so every tensor starts 256-byte aligned in the
// fp32 buffers (and 128-byte aligned in bf16), which vectorised kernels and cuBLASLt like.
// Composition code names a tensor by the address of the host Param member that describes it:
//   layout.offset(p.visual.ln_pre.weight)
// so the host Params object the layout was built from must outlive the layout's users.
// BatchNorm statistics (Role::buffer) get offsets too (the master buffer holds them in fp32);
// Counter members (num_batches_tracked) stay on the host and get none.
//
// Host-only and g++-compilable: tests/test_cuda_host_weights.cpp checks it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/tensor/param.hpp"

namespace clip::cuda {

struct WeightEntry {
  std::string name;     // OpenAI's state_dict name
  int64_t offset = 0;   // elements from the start of the flat buffers
  int64_t numel = 0;
  int rank = 0;
  Role role = Role::parameter;
};

class WeightLayout {
 public:
  static constexpr int64_t kAlign = 64;  // elements: 256 bytes of fp32

  WeightLayout() = default;

  // Visits `host` once; every tensor (not Counter) gets the next aligned offset.
  template <class HostParams>
  explicit WeightLayout(HostParams& host) {
    for_each_tensor(host, [&](const std::string& name, auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        const int64_t offset = size_;
        entries_.push_back({name, offset, T::numel, T::rank, role});
        const bool fresh = index_.emplace(static_cast<const void*>(&t), entries_.size() - 1).second;
        CLIP_CHECK(fresh, "tensor ", name, " is visited twice");
        size_ = offset + (T::numel + kAlign - 1) / kAlign * kAlign;
      }
    });
  }

  // Offset of a host Param member of the Params this layout was built from.
  template <int... Dims>
  int64_t offset(const Param<Dims...>& member) const {
    return entry(static_cast<const void*>(&member)).offset;
  }
  const WeightEntry& entry(const void* member) const {
    const auto it = index_.find(member);
    CLIP_CHECK(it != index_.end(),
               "a tensor that is not a member of the Params the device weights were built from was looked up");
    return entries_[it->second];
  }
  bool contains(const void* member) const { return index_.count(member) != 0; }

  const std::vector<WeightEntry>& entries() const { return entries_; }
  int64_t size() const { return size_; }  // elements of each flat buffer, padding included

  // Trained elements (Role::parameter), as parameter_count() counts them.
  int64_t parameter_elements() const {
    int64_t n = 0;
    for (const WeightEntry& e : entries_)
      if (e.role == Role::parameter) n += e.numel;
    return n;
  }

  // Copies the tensors of `host` (same Params type) into `flat` (size() floats) in layout order,
  // padding zeroed; and back. The host object may be another instance of the same type: both walk
  // visit order, which the type fixes.
  template <class HostParams>
  void pack(const HostParams& host, float* flat) const {
    std::fill(flat, flat + size_, 0.0f);
    size_t i = 0;
    for_each_tensor(host, [&](const std::string& name, const auto& t, Role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        const WeightEntry& e = next(i++, name, T::numel);
        std::copy(t.data(), t.data() + T::numel, flat + e.offset);
      }
    });
  }
  template <class HostParams>
  void unpack(const float* flat, HostParams& host) const {
    size_t i = 0;
    for_each_tensor(host, [&](const std::string& name, auto& t, Role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        const WeightEntry& e = next(i++, name, T::numel);
        std::copy(flat + e.offset, flat + e.offset + T::numel, t.data());
      }
    });
  }

  // "name offset numel" per line, for debugging and the host test.
  std::string listing() const {
    std::string out;
    for (const WeightEntry& e : entries_)
      out += e.name + " " + std::to_string(e.offset) + " " + std::to_string(e.numel) + "\n";
    return out;
  }

 private:
  std::vector<WeightEntry> entries_;
  std::unordered_map<const void*, size_t> index_;
  int64_t size_ = 0;

  const WeightEntry& next(size_t i, const std::string& name, int64_t numel) const {
    CLIP_CHECK(i < entries_.size() && entries_[i].numel == numel,
               "the Params passed to the weight layout differ from the ones it was built from (at ", name, ")");
    return entries_[i];
  }
};

}  // namespace clip::cuda
