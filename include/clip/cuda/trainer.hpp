// clip::Trainer<Cfg, Device::cuda>: the CPU Trainer's training step on a GPU (forward of both
// towers, the contrastive loss, backward, gradient clipping, AdamW, the logit-scale clamp, the
// same schedule). Declarations only (g++-compilable); members in kernels/models/cuda_trainer.cuh.
//
// The host Params given at construction is the key of every device tensor and the target of
// download(): the step updates the device copy only. optimizer() is a HOST mirror of the AdamW
// state (m, v, step count) that download() fills and upload() sends back (checkpoints).
// Micro-batching (TrainOptions::micro_batch < batch) accumulates gradients as the CPU Trainer does.
//
// Data parallel, one process per GPU: given the processes' host communicator (MPI under mpirun),
// the trainer starts an NCCL communicator through it (kernels/dist/nccl_communicator.cuh) and
// every rank passes its slice() of the global batch to step(); see kernels/models/cuda_trainer.cuh.
// With TrainOptions::zero1 the AdamW moments are sharded across the ranks (ZeRO-1), and in bf16
// the fp32 master weights too: download() gathers them (a collective: every rank calls it) and
// upload() takes each rank's slices.
#pragma once

#include <cstdint>
#include <memory>

#include "clip/config/device.hpp"
#include "clip/cuda/zero1_plan.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/trainer.hpp"

namespace clip {

template <Variant Cfg>
class Trainer<Cfg, Device::cuda> {
 public:
  using Net = Clip<Cfg>;
  using Params = typename Net::Params;
  static constexpr int R = Net::R;
  static constexpr int T = Net::T;
  static constexpr int E = Net::E;

  // An estimate: the CPU Trainer's fp32 activation floats (the GPU keeps a similar set, bf16
  // halves most of it) plus the weight, gradient and moment buffers are NOT included.
  static constexpr int64_t activation_bytes(int64_t micro_batch, bool recompute = false) {
    return Trainer<Cfg, Device::cpu>::activation_bytes(micro_batch, recompute);
  }

  // `comm`: the processes sharing each step (null: this GPU alone, no NCCL); every rank calls
  // this at the same point; it must outlive the trainer. A one-process comm still runs the
  // step's collectives through NCCL (the W = 1 check of that path).
  Trainer(Params& host, TrainOptions options, cuda::Precision precision = cuda::Precision::bf16, int device = 0,
          dist::Communicator* comm = nullptr);
  ~Trainer();
  Trainer(Trainer&&) noexcept;

  // One optimizer step on host images [n, 3, R, R] and token ids [n, T], the n = slice().rows
  // pairs of this rank (one process: the whole batch).
  StepResult step(const float* images, const int32_t* tokens);
  dist::Slice slice() const;

  float learning_rate(int64_t step) const;
  int64_t steps() const;
  const TrainOptions& options() const;
  Params& params();                 // the host Params (current after download())
  AdamW<Params>& optimizer();       // host mirror (current after download())

  // device -> host: weights, BatchNorm running statistics (num_batches_tracked is counted on the
  // host already), AdamW m/v and step count, into the host Params and optimizer(). Under ZeRO-1 a
  // collective (the moments are gathered): every rank calls it. download(Params&) is one only
  // under ZeRO-1 in bf16 (the sharded fp32 master weights are gathered).
  void download();
  void download(Params& host);      // weights and running statistics only, into another Params
  // host -> device: the reverse of download() (after loading a checkpoint into params()/optimizer()).
  void upload();

  // Device bytes this rank holds for weights, gradients and optimizer state, and what it would
  // hold without ZeRO-1 (zero1_plan.hpp).
  cuda::DeviceStateBytes state_bytes() const;
  cuda::DeviceStateBytes unsharded_state_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace clip
