// Synchronised BatchNorm for data-parallel training (--sync-bn): while a BatchNormSync is alive
// on a thread, the train-mode BatchNorms that thread runs (BatchNorm2d::finish_statistics and
// backward) normalise with the statistics of every process's batch together, so a ResNet step on
// W processes equals the step of one process on the whole batch. Without one, each process uses
// its own batch's statistics (as PyTorch's DistributedDataParallel does by default).
//
// The scope carries only a sum over the processes (the trainer passes its Communicator's
// all_reduce): the ops stay below the distributed layer and know nothing of MPI. Statistics
// travel as each rank's (count, mean, M2) in its own slot of a zeroed [W, 3, C] table, summed,
// then merged in rank order, so every rank gets bit-identical mean and variance.
//
//   { clip::BatchNormSync sync(sum, rank, world);  Visual::forward_train(...); ... }
#pragma once

#include <cstdint>
#include <functional>
#include <utility>

namespace clip {

class BatchNormSync {
 public:
  using Sum = std::function<void(double* data, int64_t n)>;  // in place, over every process

  BatchNormSync(Sum sum, int rank, int world) : sum_(std::move(sum)), rank_(rank), world_(world), outer_(slot()) {
    slot() = this;
  }
  ~BatchNormSync() { slot() = outer_; }
  BatchNormSync(const BatchNormSync&) = delete;
  BatchNormSync& operator=(const BatchNormSync&) = delete;

  // The scope active on this thread, or null.
  static BatchNormSync* current() { return slot(); }

  void sum(double* data, int64_t n) const { sum_(data, n); }
  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  Sum sum_;
  int rank_, world_;
  BatchNormSync* outer_;

  static BatchNormSync*& slot() {
    thread_local BatchNormSync* active = nullptr;
    return active;
  }
};

}  // namespace clip
