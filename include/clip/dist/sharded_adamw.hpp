// ZeRO stage 1 (Rajbhandari et al. 2020): AdamW with its moments sharded across the ranks.
//
// The trained tensors, in visit order, form one flat sequence of P floats, cut into buckets of
// kBucketFloats; each bucket is split across the W ranks (shard_plan.hpp, the cut the GPU
// trainer shares), and a rank keeps the moments (m, v) and the summed gradients of its slices
// only: 3P/W floats instead of the 2P of the moments alone. A step:
//   1. per bucket, reduce-scatter of the gradients: each rank gets the sum over ranks of its slice;
//   2. the global gradient norm from every rank's slices (one all-reduce of a double);
//   3. AdamW on the rank's slices, with the element arithmetic of AdamW::step (adamw.hpp), so
//      the same gradients give the same bits;
//   4. per bucket, all-gather of the updated weights.
// It moves the same bytes as summing the gradients with all-reduce (a reduce-scatter and an
// all-gather), so it costs no time, only saves memory. Checkpoints see the whole state:
// gather() assembles it into an AdamW (collective) and scatter() takes a rank's slices from one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/dist/shard_plan.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"

namespace clip::dist {

template <class Params>
class ShardedAdamW {
 public:
  static constexpr int64_t kBucketFloats = kShardBucketFloats;  // 16 MiB of the flat sequence

  ShardedAdamW(const Params& like, AdamWOptions options, Communicator& comm) : options_(options), comm_(comm) {
    CLIP_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1,
               "AdamW needs betas in [0, 1), got beta1 ", options.beta1, " and beta2 ", options.beta2);
    CLIP_CHECK(options.eps > 0, "AdamW needs a positive eps, got ", options.eps);
    std::vector<int64_t> numels;
    for_each_tensor(like, [&](const std::string& name, const auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        if (role != Role::parameter) return;
        tensors_.push_back({total_, T::numel, AdamW<Params>::decays(name, T::rank)});
        numels.push_back(T::numel);
        total_ += T::numel;
      }
    });
    // Buckets, this rank's slice of each, and the tensor pieces the slices cover: the cut the
    // GPU trainer shares (shard_plan.hpp).
    const ShardPlan plan = shard_plan(numels, comm_.size(), comm_.rank(), kBucketFloats);
    buckets_ = plan.buckets;
    pieces_ = plan.pieces;
    owned_ = plan.owned;
    g_.assign(static_cast<size_t>(owned_), 0.0f);
    m_.assign(static_cast<size_t>(owned_), 0.0f);
    v_.assign(static_cast<size_t>(owned_), 0.0f);
    staging_.resize(static_cast<size_t>(std::min(kBucketFloats, total_)));
  }

  // 1 and 2: sums the ranks' gradients into this rank's slices (and zeroes `grads`); returns
  // the global gradient norm, the same on every rank.
  double reduce(Params& grads) {
    const std::vector<float*> g = pointers(grads);
    for (const Bucket& b : buckets_) {
      copy_range(g, b.first, b.size, staging_.data(), /*to_flat=*/true);
      comm_.reduce_scatter_sum(staging_.data(), g_.data() + b.owned_at, slice_counts(b.size, comm_.size()));
    }
    zero(grads);
    double sq = 0;
    for (float x : g_) sq += double(x) * x;
    comm_.all_reduce_sum(&sq, 1);
    return std::sqrt(sq);
  }

  // 3 and 4: AdamW at learning rate `lr` on this rank's slices (gradients times `grad_scale`),
  // then every rank's updated weights into `params`.
  void update(Params& params, float lr, float grad_scale = 1.0f) {
    const std::vector<float*> p = pointers(params);
    ++steps_;
    const AdamWScalars with_decay = adamw_scalars(lr, options_.beta1, options_.beta2, options_.eps,
                                                  options_.weight_decay, steps_, grad_scale);
    AdamWScalars without_decay = with_decay;
    without_decay.decay = 1.0f;
    for (const Piece& k : pieces_) {
      const AdamWScalars& s = tensors_[k.tensor].decays ? with_decay : without_decay;
      detail::adamw_update(p[k.tensor] + k.begin, g_.data() + k.at, m_.data() + k.at,
                           v_.data() + k.at, k.n, s);
    }
    all_gather(p, /*from=*/nullptr);
  }

  // The whole optimizer state into `full` (every rank must call; `full` may be null on ranks
  // that do not need it).
  void gather(AdamW<Params>* full) {
    std::vector<float*> m, v;
    if (full) m = pointers(full->m()), v = pointers(full->v()), full->set_steps(steps_);
    gather_into(m, m_);
    gather_into(v, v_);
  }

  // This rank's slices of the moments (and the step count) from a whole state.
  void scatter(const AdamW<Params>& full) {
    const std::vector<float*> m = pointers(const_cast<Params&>(full.m())), v = pointers(const_cast<Params&>(full.v()));
    for (const Piece& k : pieces_) {
      std::copy_n(m[k.tensor] + k.begin, k.n, m_.data() + k.at);
      std::copy_n(v[k.tensor] + k.begin, k.n, v_.data() + k.at);
    }
    steps_ = full.steps();
  }

  int64_t steps() const { return steps_; }
  const AdamWOptions& options() const { return options_; }
  // Floats this rank keeps (its gradient, m and v slices), and what unsharded AdamW keeps (m, v).
  int64_t floats_per_rank() const { return 3 * owned_; }
  int64_t unsharded_floats() const { return 2 * total_; }

 private:
  struct TensorInfo {
    int64_t offset, numel;
    bool decays;
  };
  using Bucket = ShardPlan::Bucket;
  using Piece = ShardPlan::Piece;  // at: within g_, m_, v_

  AdamWOptions options_;
  Communicator& comm_;
  std::vector<TensorInfo> tensors_;
  std::vector<Bucket> buckets_;
  std::vector<Piece> pieces_;
  std::vector<float> g_, m_, v_;  // this rank's slices
  std::vector<float> staging_;    // one bucket
  int64_t total_ = 0, owned_ = 0, steps_ = 0;

  static std::vector<float*> pointers(Params& params) { return trained_tensor_data(params); }

  // Copies the flat range [first, first + n) between the tensors `t` and `flat`.
  void copy_range(const std::vector<float*>& t, int64_t first, int64_t n, float* flat, bool to_flat) const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const int64_t lo = std::max(tensors_[i].offset, first), hi = std::min(tensors_[i].offset + tensors_[i].numel, first + n);
      if (lo >= hi) continue;
      float* tensor = t[i] + (lo - tensors_[i].offset);
      if (to_flat) std::copy(tensor, tensor + (hi - lo), flat + (lo - first));
      else std::copy(flat + (lo - first), flat + (hi - first), tensor);
    }
  }

  // Per bucket: this rank's slice (of the tensors `t`, or of `from` when given) gathered from
  // every rank into `t`.
  void all_gather(const std::vector<float*>& t, const float* from) {
    for (const Bucket& b : buckets_) {
      float* slice = staging_.data() + b.own.first;
      if (from) std::copy_n(from + b.owned_at, b.own.rows, slice);
      else copy_range(t, b.first + b.own.first, b.own.rows, slice, /*to_flat=*/true);
      comm_.all_gather(staging_.data(), slice_counts(b.size, comm_.size()));
      if (!t.empty()) copy_range(t, b.first, b.size, staging_.data(), /*to_flat=*/false);
    }
  }

  void gather_into(const std::vector<float*>& t, const std::vector<float>& owned) { all_gather(t, owned.data()); }
};

}  // namespace clip::dist
