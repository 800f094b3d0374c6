// Synchronised BatchNorm on the GPU (--sync-bn), as clip::BatchNormSync
// (include/clip/ops/batchnorm_sync.hpp) on the CPU: while a BatchNormSyncScope is alive on a
// thread, the train-mode BatchNorm2d (kernels/batchnorm.cuh) that thread enqueues normalise with
// the statistics of every process's batch together, so a ResNet step on W GPUs equals the step of
// one process on the whole batch.
//
// The scope carries only a sum over the processes of DEVICE doubles, in place and ordered on the
// compute stream (the trainer passes its NCCL communicator's all_reduce_sum), and a device table
// the kernels exchange their statistics through (the caller's, capacity_for() doubles): forward
// puts each rank's (count, mean, M2) per channel into its own slot of a zeroed [W, 3, C] table,
// which is summed and merged in rank order (every rank gets the same mean and variance, merged as
// the CPU's finish_statistics merges); backward sums its per-channel [Σ g, Σ g xc] and the count,
// [2C + 1]. The parameter gradients d_gamma, d_beta stay this process's share, summed later with
// the other gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>

#include "clip/core/error.hpp"

namespace clip::cuda {

class BatchNormSyncScope {
 public:
  using Sum = std::function<void(double* device_data, int64_t n)>;  // in place, over every process

  BatchNormSyncScope(Sum sum, int rank, int world, double* table, int64_t capacity)
      : sum_(std::move(sum)), rank_(rank), world_(world), table_(table), capacity_(capacity), outer_(slot()) {
    CLIP_CHECK(world > 0 && rank >= 0 && rank < world, "rank ", rank, " is not in a world of ", world, " processes");
    CLIP_CHECK(table && capacity > 0, "the synchronised BatchNorm needs a device table");
    slot() = this;
  }
  ~BatchNormSyncScope() { slot() = outer_; }
  BatchNormSyncScope(const BatchNormSyncScope&) = delete;
  BatchNormSyncScope& operator=(const BatchNormSyncScope&) = delete;

  // The scope active on this thread, or null.
  static BatchNormSyncScope* current() { return slot(); }

  // Doubles of table a world of W processes needs for BatchNorms of up to `channels` channels.
  static int64_t capacity_for(int world, int64_t channels) {
    return std::max(int64_t{world} * 3 * channels, 2 * channels + 1);
  }

  void sum(double* data, int64_t n) const { sum_(data, n); }
  int rank() const { return rank_; }
  int world() const { return world_; }
  // The table, for a BatchNorm that needs `n` doubles of it.
  double* table(int64_t n) const {
    CLIP_CHECK(n <= capacity_, "the synchronised BatchNorm's table holds ", capacity_, " doubles, a BatchNorm needs ",
               n);
    return table_;
  }

 private:
  Sum sum_;
  int rank_, world_;
  double* table_;
  int64_t capacity_;
  BatchNormSyncScope* outer_;

  static BatchNormSyncScope*& slot() {
    thread_local BatchNormSyncScope* active = nullptr;
    return active;
  }
};

}  // namespace clip::cuda
