// The sum of every rank's gradients, in buckets, as PyTorch's DistributedDataParallel does:
// tensors are grouped in visit order into buckets of about kBucketFloats; a tensor at least
// that large is its own bucket. On the CPU a tensor of at least kInPlaceFloats is summed in
// place, and the smaller ones of a bucket are packed into one staging buffer, so a model of
// hundreds of small tensors costs a few collectives, not hundreds.
//
// Gradients are summed, not averaged: each rank's loss term is already its share of the mean
// over the global batch (train/contrastive_loss.hpp), so the sum is the one-process gradient.
//
// Where the buckets fall is decided once, by cut(), for both trainers: the CPU packs each bucket
// of a Params' tensors into staging (this class), the GPU trainer sums each bucket as one range of
// its flat gradient buffer (flat_ranges(), kernels/models/cuda_trainer.cuh).
//
// start() launches the non-blocking sums and returns at once; finish() waits and unpacks. The
// trainer starts the image tower's buckets as soon as its backward is done and finishes them
// after the text tower's backward, so the transfer overlaps that work where the back end
// progresses in the background (NCCL; the MPI back end sums at once, blocking, which measured
// faster on the CPU: communicator.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/dist/communicator.hpp"
#include "clip/tensor/param.hpp"

namespace clip::dist {

class GradientBuckets {
 public:
  static constexpr int64_t kBucketFloats = int64_t{1} << 22;  // 16 MiB
  // Host tensors are separate arrays: one of at least this many floats is summed where it lies,
  // as its own collective; packing it would copy it twice for nothing (ViT-B/32's 577 MiB of
  // gradients are tensors of 0.26 to 2.4 M floats).
  static constexpr int64_t kInPlaceFloats = int64_t{1} << 18;  // 1 MiB

  // A bucket: tensors [begin, end) of a sequence, in visit order.
  struct Cut {
    size_t begin, end;
  };
  // The buckets of tensors of `sizes` floats, in order: consecutive tensors together up to
  // kBucketFloats; a tensor of at least kBucketFloats alone.
  static std::vector<Cut> cut(const std::vector<int64_t>& sizes) {
    std::vector<Cut> cuts;
    size_t begin = 0;
    int64_t packed = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      CLIP_CHECK(sizes[i] >= 0, "a tensor of ", sizes[i], " floats cannot be bucketed");
      if (sizes[i] >= kBucketFloats || packed + sizes[i] > kBucketFloats) {
        if (i > begin) cuts.push_back({begin, i});
        begin = i, packed = 0;
      }
      packed += sizes[i];
      if (sizes[i] >= kBucketFloats) {
        cuts.push_back({i, i + 1});
        begin = i + 1, packed = 0;
      }
    }
    if (sizes.size() > begin) cuts.push_back({begin, sizes.size()});
    return cuts;
  }

  // A tensor's place in a flat buffer; `selected`: summed by this set of buckets (the others are
  // summed at another time, so no range may cover them).
  struct FlatTensor {
    int64_t offset, numel;
    bool selected;
  };
  // [first, first + n) of a flat buffer.
  struct FlatRange {
    int64_t first, n;
  };
  // The buckets of the selected tensors of a flat buffer, each one range of it: the tensors in
  // offset order, cut() over the floats each adds to its range (its size and the gap before it:
  // alignment padding and untrained buffers, whose sums are harmless), a run broken wherever a
  // tensor that is not selected lies between. `tensors`: every trained tensor of the buffer.
  static std::vector<FlatRange> flat_ranges(std::vector<FlatTensor> tensors) {
    std::sort(tensors.begin(), tensors.end(), [](const FlatTensor& x, const FlatTensor& y) { return x.offset < y.offset; });
    std::vector<FlatRange> ranges;
    std::vector<const FlatTensor*> run;
    auto close_run = [&] {
      std::vector<int64_t> sizes;
      for (size_t i = 0; i < run.size(); ++i)
        sizes.push_back(i == 0 ? run[i]->numel : run[i]->offset + run[i]->numel - (run[i - 1]->offset + run[i - 1]->numel));
      for (const Cut& c : cut(sizes)) {
        const int64_t first = run[c.begin]->offset, end = run[c.end - 1]->offset + run[c.end - 1]->numel;
        ranges.push_back({first, end - first});
      }
      run.clear();
    };
    for (size_t i = 0; i < tensors.size(); ++i) {
      const FlatTensor& t = tensors[i];
      CLIP_CHECK(t.offset >= 0 && t.numel >= 0, "a tensor at offset ", t.offset, " of ", t.numel, " floats");
      CLIP_CHECK(i == 0 || t.offset >= tensors[i - 1].offset + tensors[i - 1].numel, "the tensors at offsets ",
                 tensors[i - 1].offset, " and ", t.offset, " of the flat buffer overlap");
      if (!t.selected) close_run();
      else if (t.numel > 0) run.push_back(&t);
    }
    close_run();
    return ranges;
  }

  // The trained tensors of `grads` whose names `select` accepts.
  template <class Params>
  GradientBuckets(Params& grads, const std::function<bool(const std::string&)>& select) {
    std::vector<Part> parts;
    for_each_tensor(grads, [&](const std::string& name, auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>)
        if (role == Role::parameter && select(name)) parts.push_back({t.data(), T::numel});
    });
    std::vector<int64_t> sizes;
    for (const Part& p : parts) sizes.push_back(p.n);
    for (const Cut& c : cut(sizes)) {
      Bucket packed;
      for (size_t i = c.begin; i < c.end; ++i) {
        if (parts[i].n >= kInPlaceFloats) buckets_.push_back({{parts[i]}, {}, parts[i].n, /*in_place=*/true});
        else packed.parts.push_back(parts[i]), packed.floats += parts[i].n;
      }
      if (packed.parts.empty()) continue;
      packed.staging.resize(static_cast<size_t>(packed.floats));
      buckets_.push_back(std::move(packed));
    }
  }

  // Packs and launches every bucket's sum.
  void start(Communicator& comm) {
    CLIP_CHECK(pending_.empty(), "a gradient sum was started twice without finish()");
    for (Bucket& b : buckets_) {
      if (!b.in_place) {
        float* at = b.staging.data();
        for (const Part& p : b.parts) at = std::copy(p.data, p.data + p.n, at);
      }
      pending_.push_back(comm.start_all_reduce_sum(b.in_place ? b.parts[0].data : b.staging.data(), b.floats));
    }
  }

  // Waits for every bucket and unpacks the sums into the gradients.
  void finish() {
    for (size_t i = 0; i < pending_.size(); ++i) {
      pending_[i]->wait();
      const Bucket& b = buckets_[i];
      if (b.in_place) continue;
      const float* at = b.staging.data();
      for (const Part& p : b.parts) {
        std::copy(at, at + p.n, p.data);
        at += p.n;
      }
    }
    pending_.clear();
  }

  int64_t floats() const {
    int64_t n = 0;
    for (const Bucket& b : buckets_) n += b.floats;
    return n;
  }
  size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Part {
    float* data;
    int64_t n;
  };
  struct Bucket {
    std::vector<Part> parts;
    std::vector<float> staging;  // packed parts (empty when in place)
    int64_t floats = 0;
    bool in_place = false;
  };
  std::vector<Bucket> buckets_;
  std::vector<std::unique_ptr<PendingCollective>> pending_;
};

}  // namespace clip::dist
