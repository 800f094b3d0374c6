// The sum of every rank's gradients, in buckets, as PyTorch's DistributedDataParallel does:
// tensors are grouped in visit order into buckets of about kBucketFloats; a tensor at least
// that large is its own bucket, summed in place; a run of smaller ones is packed into one
// staging buffer, so a model of hundreds of small tensors costs a few collectives, not hundreds.
//
// Gradients are summed, not averaged: each rank's loss term is already its share of the mean
// over the global batch (train/contrastive_loss.hpp), so the sum is the one-process gradient.
//
// start() launches the non-blocking sums and returns at once; finish() waits and unpacks. The
// trainer starts the image tower's buckets as soon as its backward is done and finishes them
// after the text tower's backward, so the transfer overlaps that work where the back end
// progresses in the background.
#pragma once

#include <algorithm>
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

  // The trained tensors of `grads` whose names `select` accepts.
  template <class Params>
  GradientBuckets(Params& grads, const std::function<bool(const std::string&)>& select) {
    Bucket packed;
    auto close_packed = [&] {
      if (packed.parts.empty()) return;
      buckets_.push_back(std::move(packed));
      packed = Bucket{};
    };
    for_each_tensor(grads, [&](const std::string& name, auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        if (role != Role::parameter || !select(name)) return;
        if (T::numel >= kBucketFloats) {
          buckets_.push_back(Bucket{{{t.data(), T::numel}}, {}, T::numel, true});
          return;
        }
        if (packed.floats + T::numel > kBucketFloats) close_packed();
        packed.parts.push_back({t.data(), T::numel});
        packed.floats += T::numel;
      }
    });
    close_packed();
    for (Bucket& b : buckets_)
      if (!b.in_place) b.staging.resize(static_cast<size_t>(b.floats));
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
