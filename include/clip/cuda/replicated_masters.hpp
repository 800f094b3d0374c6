// The fp32 values every rank keeps when ZeRO-1 shards the master weights (bf16 training): the
// trained tensors' fp32 masters then live in the optimizer's shards (kernels/dist/sharded_adamw.cuh),
// but a few tensors are read in fp32 on every rank and so stay whole, packed back to back:
//   - buffers (BatchNorm running statistics): not trained; each rank's forward updates and reads
//     them in fp32;
//   - logit_scale: trained, but the loss reads it in fp32 and the step reports it; its owner
//     updates and clamps it in its shard and broadcasts the 4 bytes.
// Each entry starts at a multiple of WeightLayout::kAlign floats, as in the whole layout, so the
// kernels that read them keep their alignment. Host-only (tests/test_cuda_host_zero1.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/cuda/weight_layout.hpp"

namespace clip::cuda {

struct ReplicatedMasters {
  struct Entry {
    int64_t layout, numel, at;  // at: within the packed region
  };
  std::vector<Entry> entries;  // in layout order
  int64_t size = 0;            // floats of the packed region, padding included

  // Where the tensor at layout offset `layout` sits in the region, or -1 when it is not kept.
  int64_t position(int64_t layout) const {
    for (const Entry& e : entries)
      if (e.layout == layout) return e.at;
    return -1;
  }
  // The kept tensors of a layout-sized buffer `flat` into the region `packed` (padding zeroed), and back.
  void pack(const float* flat, float* packed) const {
    std::fill(packed, packed + size, 0.0f);
    for (const Entry& e : entries) std::copy_n(flat + e.layout, e.numel, packed + e.at);
  }
  void unpack(const float* packed, float* flat) const {
    for (const Entry& e : entries) std::copy_n(packed + e.at, e.numel, flat + e.layout);
  }
};

// Every buffer of `layout` and the trained tensors named in `trained` (e.g. {"logit_scale"}).
inline ReplicatedMasters replicated_masters(const WeightLayout& layout, const std::vector<std::string>& trained) {
  ReplicatedMasters r;
  for (const WeightEntry& e : layout.entries()) {
    const bool named = std::find(trained.begin(), trained.end(), e.name) != trained.end();
    if (e.role != Role::buffer && !named) continue;
    r.entries.push_back({e.offset, e.numel, r.size});
    r.size += (e.numel + WeightLayout::kAlign - 1) / WeightLayout::kAlign * WeightLayout::kAlign;
  }
  for (const std::string& name : trained)
    CLIP_CHECK(std::any_of(layout.entries().begin(), layout.entries().end(),
                           [&](const WeightEntry& e) { return e.name == name; }),
               "the weight layout has no tensor named ", name, " to keep in fp32 on every rank");
  return r;
}

}  // namespace clip::cuda
