// ZeRO-1 on the GPU: the CPU's dist::ShardedAdamW (include/clip/dist/sharded_adamw.hpp) for the
// GPU trainer's flat device buffers, with the CPU's cut (dist::shard_plan, laid over the device
// layout by cuda::zero1_plan, include/clip/cuda/zero1_plan.hpp). A rank keeps the moments m, v and
// the summed gradients of its owned floats only; in bf16 training also the fp32 master weights
// of its owned floats only (DeepSpeed's ZeRO-1 and llm.c's as well), since the kernels read the
// bf16 copy; in fp32 the master weights are the weights the kernels read, whole on every rank.
// A step:
//   1. per bucket, the bucket's gradients reduce-scattered: each rank gets the sum over ranks of
//      its slice. A bucket that is one contiguous run of the layout goes from the gradient buffer
//      in place; one that is not (BatchNorm buffers or alignment padding between its tensors) is
//      first copied into one staging bucket. Contiguous buckets of the image tower start as soon
//      as its backward is done (start_early: on the communicator's stream, overlapping the text
//      tower's backward), the rest after the whole backward; the gradient buffer is then zeroed;
//   2. the global gradient norm: each rank's sum of squares over its slices, summed over the
//      ranks (all-reduce of one device double), one square root: the norm of the whole summed
//      gradient, as one process defines it;
//   3. AdamW on the rank's slices with adamw_element (the CPU's arithmetic), then logit_scale's
//      clamp where this rank owns it:
//        whole masters (fp32): the master weights of its slices written in place in the layout
//          (each chunk's layout shift);
//        sharded masters (bf16): the master shard updated, the bf16 image of each element written
//          in place in the compute copy; logit_scale's owner broadcasts the clamped fp32 value
//          into every rank's replicated slot (the loss reads it in fp32);
//   4. per bucket, all-gather of the updated weights: fp32 masters (the fp32 path; they are the
//      compute copy; a contiguous bucket in place), or the bf16 compute copy (half the bytes),
//      each rank's slice padded to whole floats (Zero1Plan::packed_slices).
// Checkpoints: gather() assembles the whole moments (gather_masters() the master weights) into
// host layout buffers (collective), scatter() (load_masters()) takes this rank's slices from them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/cuda/zero1_plan.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/train/adamw_math.hpp"
#include "kernels/adamw.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/grad_norm.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

class ShardedAdamW {
 public:
  // `plan`: zero1_plan of the trained tensors for comm's rank and size; `flat`: the layout's
  // size; `comm`: a device communicator whose compute stream is ctx's; it must outlive this.
  // `shard_masters`: this rank holds the fp32 masters of its owned floats (bf16 training; they
  // start at zero: load_masters() fills them).
  ShardedAdamW(Context& ctx, Zero1Plan plan, int64_t flat, dist::Communicator& comm, bool shard_masters = false)
      : ctx_(ctx), plan_(std::move(plan)), flat_(flat), comm_(comm), shard_masters_(shard_masters),
        p_(shard_masters ? plan_.shard.owned : 0),
        g_(plan_.shard.owned), m_(plan_.shard.owned), v_(plan_.shard.owned), staging_(plan_.shard.largest_bucket()),
        table_(ctx, plan_.owned_slices(), plan_.shard.owned), owned_runs_(plan_.owned_runs()) {
    CLIP_CHECK(plan_.shard.world == comm.size() && plan_.shard.rank == comm.rank(), "the ZeRO-1 plan is for rank ",
               plan_.shard.rank, " of ", plan_.shard.world, ", the communicator's rank ", comm.rank(), " of ",
               comm.size());
    for (const Zero1Plan::Run& r : owned_runs_)
      CLIP_CHECK(r.layout >= 0 && r.layout + r.n <= flat_, "a ZeRO-1 shard run lies outside the device buffers");
    const std::vector<int64_t> shifts = plan_.chunk_shifts(table_.host_chunks());
    shifts_ = DeviceBuffer<int64_t>(static_cast<int64_t>(shifts.size()));
    shifts_.upload(shifts.data(), static_cast<int64_t>(shifts.size()), ctx.stream());
    for (const dist::ShardPlan::Bucket& b : plan_.shard.buckets) {
      bucket_runs_.push_back(plan_.runs(b.first, b.size));
      own_runs_.push_back(plan_.runs(b.first + b.own.first, b.own.rows));
      counts_.push_back(dist::slice_counts(b.size, comm.size()));
      contiguous_.push_back(plan_.contiguous_at(bucket_runs_.size() - 1));
      if (!shard_masters) continue;
      packed_.push_back(plan_.packed_slices(bucket_runs_.size() - 1));
      CLIP_CHECK(packed_.back().floats <= staging_.size(), "a bucket's bf16 slices need more staging than it has");
      std::vector<std::vector<Zero1Plan::Run>> slices;
      for (int q = 0; q < comm.size(); ++q) slices.push_back(plan_.slice_runs(bucket_runs_.size() - 1, q));
      slice_runs_.push_back(std::move(slices));
    }
    early_.assign(plan_.shard.buckets.size(), false);
    started_.assign(plan_.shard.buckets.size(), false);
    p_.zero(ctx.stream());
    g_.zero(ctx.stream());
    m_.zero(ctx.stream());
    v_.zero(ctx.stream());
    ctx.synchronize();  // the shifts' host vector goes out of scope
  }

  // The buckets start_early() may start: `early[i]` says bucket i's gradients are final at that
  // point (Zero1Plan::buckets_within: the image tower's, after its backward). Only a bucket that is
  // one contiguous run of the layout qualifies: it is reduce-scattered from the gradient buffer in
  // place, while a bucket through the one staging would have to wait for the previous one.
  void set_early(const std::vector<bool>& early) {
    CLIP_CHECK(early.size() == plan_.shard.buckets.size(), "a flag per ZeRO-1 bucket: ", plan_.shard.buckets.size(),
               ", got ", early.size());
    for (size_t i = 0; i < early.size(); ++i) early_[i] = early[i] && contiguous_[i] >= 0;
  }
  int64_t early_buckets() const { return std::count(early_.begin(), early_.end(), true); }

  // 1, started early: the early buckets' reduce-scatters from `grad` in place, on the
  // communicator's stream, overlapping the compute stream's later work (the text tower's
  // backward); reduce() waits for them. Every rank starts the same buckets in the same order.
  void start_early(const float* grad) {
    for (size_t i = 0; i < early_.size(); ++i)
      if (early_[i]) {
        pending_.push_back(comm_.start_reduce_scatter_sum(grad + contiguous_[i], g_.data() + plan_.shard.buckets[i].owned_at,
                                                          counts_[i]));
        started_[i] = true;
      }
  }

  // 1 and 2: the ranks' gradients (`grad`, the layout's fp32 gradients, zeroed here) summed into
  // this rank's slices (the buckets not started early: in place when contiguous, else through
  // the staging); *norm (a device double) = the global gradient norm, the same on every rank.
  void reduce(float* grad, double* norm) {
    for (size_t i = 0; i < plan_.shard.buckets.size(); ++i) {
      if (started_[i]) continue;
      const dist::ShardPlan::Bucket& b = plan_.shard.buckets[i];
      if (contiguous_[i] >= 0) {
        comm_.reduce_scatter_sum(grad + contiguous_[i], g_.data() + b.owned_at, counts_[i]);
        continue;
      }
      for (const Zero1Plan::Run& r : bucket_runs_[i]) copy(staging_.data() + r.at, grad + r.layout, r.n);
      comm_.reduce_scatter_sum(staging_.data(), g_.data() + b.owned_at, counts_[i]);
    }
    for (auto& p : pending_) p->wait();  // the compute stream waits (the memset below overwrites their source)
    pending_.clear();
    std::fill(started_.begin(), started_.end(), false);
    CLIP_CUDA_CHECK(cudaMemsetAsync(grad, 0, sizeof(float) * flat_, ctx_.stream()));
    gradient_sum_squares(ctx_, table_, g_.data(), norm);
    comm_.all_reduce_sum(norm, 1);
    square_root(ctx_, norm);
  }

  // 3 and 4, whole masters (fp32): AdamW with the scalars `s` (clip::adamw_scalars, the decay
  // group's) on this rank's slices of `master` (the layout's fp32 weights), logit_scale (at
  // `logit_scale`, its layout offset) clamped where this rank holds it, then every rank's slices
  // gathered into `master`.
  void update(float* master, const clip::AdamWScalars& s, int64_t logit_scale) {
    CLIP_CHECK(!shard_masters_, "these master weights are sharded: update_sharded_masters");
    if (table_.count() > 0) {
      // The compute copy is rebuilt after the gather (null here); each chunk's weights lie at its shift.
      detail::adamw_kernel<float><<<static_cast<unsigned>(table_.count()), detail::kAdamWThreads, 0, ctx_.stream()>>>(
          table_.chunks(), master, g_.data(), m_.data(), v_.data(), static_cast<float*>(nullptr), s, shifts_.data());
      CLIP_CUDA_CHECK(cudaGetLastError());
    }
    if (plan_.owned_position(logit_scale) >= 0) clamp_logit_scale<float>(ctx_, master + logit_scale, nullptr);
    for (size_t i = 0; i < plan_.shard.buckets.size(); ++i) {
      if (contiguous_[i] >= 0) {  // each rank's slice already sits where the gather puts it
        comm_.all_gather(master + contiguous_[i], counts_[i]);
        continue;
      }
      for (const Zero1Plan::Run& r : own_runs_[i]) copy(staging_.data() + plan_.shard.buckets[i].own.first + r.at, master + r.layout, r.n);
      comm_.all_gather(staging_.data(), counts_[i]);
      for (const Zero1Plan::Run& r : bucket_runs_[i]) copy(master + r.layout, staging_.data() + r.at, r.n);
    }
  }

  // 3 and 4, sharded masters (bf16): AdamW on this rank's master shard, its bf16 image into
  // `compute` (the layout's bf16 copy); logit_scale (layout offset `logit_scale`) clamped by its
  // owner, shard and image, and its fp32 value broadcast into `logit_scale_fp32` (every rank's
  // replicated slot); then every rank's slices of `compute` gathered, bucket by bucket, in bf16.
  void update_sharded_masters(bf16* compute, const clip::AdamWScalars& s, int64_t logit_scale, float* logit_scale_fp32) {
    CLIP_CHECK(shard_masters_, "these master weights are whole on every rank: update");
    if (table_.count() > 0) {
      detail::adamw_kernel<bf16><<<static_cast<unsigned>(table_.count()), detail::kAdamWThreads, 0, ctx_.stream()>>>(
          table_.chunks(), p_.data(), g_.data(), m_.data(), v_.data(), compute, s, /*p_shifts=*/nullptr, shifts_.data());
      CLIP_CUDA_CHECK(cudaGetLastError());
    }
    const int owner = plan_.owner(logit_scale);
    if (owner == comm_.rank()) {
      float* mine = p_.data() + plan_.owned_position(logit_scale);
      clamp_logit_scale<bf16>(ctx_, mine, compute + logit_scale);
      CLIP_CUDA_CHECK(cudaMemcpyAsync(logit_scale_fp32, mine, sizeof(float), cudaMemcpyDeviceToDevice, ctx_.stream()));
    }
    comm_.broadcast(logit_scale_fp32, sizeof(float), owner);
    bf16* staging = reinterpret_cast<bf16*>(staging_.data());
    const int rank = comm_.rank();
    for (size_t i = 0; i < plan_.shard.buckets.size(); ++i) {
      const Zero1Plan::PackedSlices& k = packed_[i];
      for (const Zero1Plan::Run& r : slice_runs_[i][rank]) copy(staging + k.first[rank] + r.at, compute + r.layout, r.n);
      comm_.all_gather(staging_.data(), k.counts);
      for (int q = 0; q < comm_.size(); ++q)  // this rank's slice is in place already
        if (q != rank)
          for (const Zero1Plan::Run& r : slice_runs_[i][q]) copy(compute + r.layout, staging + k.first[q] + r.at, r.n);
    }
  }

  // Sharded masters: the whole trained master weights into a host buffer of the layout's size
  // (collective, as gather()); and this rank's slices from one (every rank holds the whole).
  void gather_masters(float* flat) {
    CLIP_CHECK(shard_masters_, "these master weights are whole on every rank: nothing to gather");
    gather_into(p_, flat);
  }
  void load_masters(const float* flat) {
    CLIP_CHECK(shard_masters_, "these master weights are whole on every rank: nothing to load");
    scatter_from(flat, p_);
  }
  bool masters_sharded() const { return shard_masters_; }

  // The whole moments into host buffers of the layout's size (every rank must call; each gets
  // them). Elements no trained tensor covers are left as they are.
  void gather(float* m, float* v) {
    gather_into(m_, m);
    gather_into(v_, v);
  }

  // This rank's slices of the moments from host buffers of the layout's size (every rank holds
  // the whole state, as loaded from a checkpoint).
  void scatter(const float* m, const float* v) {
    scatter_from(m, m_);
    scatter_from(v, v_);
  }

  const Zero1Plan& plan() const { return plan_; }

 private:
  Context& ctx_;
  Zero1Plan plan_;
  int64_t flat_;
  dist::Communicator& comm_;
  bool shard_masters_;
  DeviceBuffer<float> p_;          // sharded masters: this rank's owned floats of the fp32 weights (else empty)
  DeviceBuffer<float> g_, m_, v_;  // this rank's owned floats
  DeviceBuffer<float> staging_;    // one bucket of the flat sequence
  MultiTensorTable table_;         // the owned floats as tensors (AdamW, the norm)
  DeviceBuffer<int64_t> shifts_;   // per chunk of table_: layout offset - owned offset
  std::vector<Zero1Plan::Run> owned_runs_;               // owned floats <-> layout
  std::vector<std::vector<Zero1Plan::Run>> bucket_runs_;  // per bucket: staging <-> layout
  std::vector<std::vector<Zero1Plan::Run>> own_runs_;     // per bucket: its own slice's runs (at: within the slice)
  std::vector<std::vector<int64_t>> counts_;              // per bucket: the ranks' slice sizes
  std::vector<int64_t> contiguous_;                       // per bucket: its layout start when one run, else -1
  std::vector<bool> early_, started_;                     // per bucket: start_early() starts it; has this step
  std::vector<std::unique_ptr<dist::PendingCollective>> pending_;  // the early buckets' reduce-scatters
  // Sharded masters: per bucket, the bf16 gather's padded slices and every rank's slice runs.
  std::vector<Zero1Plan::PackedSlices> packed_;
  std::vector<std::vector<std::vector<Zero1Plan::Run>>> slice_runs_;

  template <class T>
  void copy(T* to, const T* from, int64_t n) {
    CLIP_CUDA_CHECK(cudaMemcpyAsync(to, from, sizeof(T) * n, cudaMemcpyDeviceToDevice, ctx_.stream()));
  }

  void gather_into(const DeviceBuffer<float>& owned, float* host) {
    std::vector<float> bucket(static_cast<size_t>(plan_.shard.largest_bucket()));
    for (size_t i = 0; i < plan_.shard.buckets.size(); ++i) {
      const dist::ShardPlan::Bucket& b = plan_.shard.buckets[i];
      copy(staging_.data() + b.own.first, owned.data() + b.owned_at, b.own.rows);
      comm_.all_gather(staging_.data(), counts_[i]);
      staging_.download(bucket.data(), b.size, ctx_.stream());
      for (const Zero1Plan::Run& r : bucket_runs_[i]) std::copy_n(bucket.data() + r.at, r.n, host + r.layout);
    }
  }

  void scatter_from(const float* host, DeviceBuffer<float>& owned) {
    std::vector<float> mine(static_cast<size_t>(plan_.shard.owned));
    for (const Zero1Plan::Run& r : owned_runs_) std::copy_n(host + r.layout, r.n, mine.data() + r.at);
    owned.upload(mine.data(), plan_.shard.owned, ctx_.stream());
    ctx_.synchronize();
  }
};

}  // namespace clip::cuda
