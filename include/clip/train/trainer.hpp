// One contrastive training step of a CLIP model on the CPU: forward of both towers, the symmetric
// cross-entropy (contrastive_loss.hpp), backward, gradient clipping, AdamW, and the temperature
// clamp. Every buffer is allocated by the constructor; a step allocates nothing large.
//
//   clip::Trainer<Cfg> trainer(params, {.batch = 256, .micro_batch = 64, .warmup_steps = 500,
//                                       .total_steps = 10000});
//   auto r = trainer.step(images, tokens);   // [B, 3, R, R], [B, T] -> loss, lr, temperature
//
// Gradient accumulation keeps the loss of the whole batch (the contrastive loss couples every
// pair, so summing per-micro-batch losses would be a different objective). With micro_batch < batch:
//   1. forward every micro-batch, keeping only its features (BatchNorm running statistics are
//      left alone in this pass);
//   2. the loss and the feature gradients over the whole batch;
//   3. per micro-batch: forward again (same features, activations kept) and backward with that
//      micro-batch's feature gradients, the other micro-batches' features held fixed.
// The gradients are those of the full-batch step; activation memory is that of one micro-batch.
// (With BatchNorm, a micro-batch normalises with its own statistics, as it would on its own.)
//
// The temperature: logit_scale is clamped to [0, ln 100] after every step (the paper clips the
// temperature at 100).
//
// Data parallel: given a Communicator of W processes (dist/communicator.hpp), each rank passes
// step() its slice of the global batch (dist::batch_slice: rows [first, first + n)); the ranks'
// features are gathered, each computes its rows' share of the loss (contrastive_loss_rows), the
// feature gradients are summed back to their owners (reduce-scatter), and after backward the
// parameter gradients are summed across ranks (dist/gradient_buckets.hpp; the image tower's
// while the text tower runs backward). The loss, the gradients and so the step equal those of
// one process on the whole batch, to rounding. Accumulation works the same way on the rank's
// rows: its micro-batches' features first, one gather, then recompute and backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <optional>
#include <vector>

#include "clip/config/device.hpp"
#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/dist/gradient_buckets.hpp"
#include "clip/dist/sharded_adamw.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/ops/batchnorm_sync.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "clip/train/grad_clip.hpp"
#include "clip/train/schedule.hpp"

namespace clip {

// The largest logit_scale: ln 100, a temperature of 100.
inline constexpr float max_logit_scale = 4.6051701859880914f;

// logit_scale := clamp(logit_scale, 0, ln 100).
inline void clamp_logit_scale(float& logit_scale) { logit_scale = std::clamp(logit_scale, 0.0f, max_logit_scale); }

struct TrainOptions {
  int64_t batch = 0;             // pairs per optimizer step (over all ranks: the global batch)
  int64_t micro_batch = 0;       // pairs per forward/backward (0: the whole batch, or a rank's slice)
  AdamWOptions adam{};           // adam.lr is the base (peak) learning rate
  int64_t warmup_steps = 0;      // linear warmup
  int64_t total_steps = 0;       // cosine decay to 0 at this step (0: constant after warmup)
  float grad_clip_norm = 0.0f;   // clip the global gradient norm to this (0: off)
  bool recompute = false;        // keep only block inputs, re-run blocks during backward
  bool sync_batchnorm = false;   // data parallel: BatchNorm statistics over the global batch
  bool zero1 = false;            // data parallel: AdamW moments sharded across the ranks (ZeRO-1)
};

struct StepResult {
  double loss;        // the contrastive loss of the batch, before the update
  float lr;           // the learning rate of this step
  float temperature;  // exp(logit_scale) used in this step's loss
  float grad_norm;    // the global gradient norm, before clipping
};

// Trainer<Cfg> trains on the CPU; Trainer<Cfg, Device::cuda> (include/clip/cuda/trainer.hpp)
// is the same training step on a GPU.
template <Variant Cfg, Device D = Device::cpu>
class Trainer;

template <Variant Cfg>
class Trainer<Cfg, Device::cpu> {
 public:
  using Net = Clip<Cfg>;
  using Params = typename Net::Params;
  using Visual = typename Net::Visual;
  using Text = typename Net::Text;
  static constexpr int R = Net::R;  // image side
  static constexpr int T = Net::T;  // tokens per caption
  static constexpr int E = Net::E;  // embedding size
  static constexpr int64_t image_floats = int64_t{3} * R * R;

  // Activation memory of one forward/backward of `micro_batch` pairs (both towers), known at
  // compile time from the variant.
  static constexpr int64_t activation_bytes(int64_t micro_batch, bool recompute = false) {
    return int64_t{sizeof(float)} * micro_batch *
           (Visual::TrainActs::floats_per_sample(recompute) + Text::TrainActs::floats_per_sample(recompute));
  }

  Trainer(Params& params, TrainOptions options, Precision precision) : Trainer(params, options, nullptr, precision) {}
  // `comm`: the processes sharing each step (null: this one alone); it must outlive the trainer.
  // precision bf16 is mixed precision as open_clip's amp_bf16: the matrix products of both
  // towers' forward and backward run in bf16 (operands rounded, fp32 sums); the weights (the
  // master copy), the gradients, LayerNorm, softmax, the loss and AdamW stay fp32, and so do
  // checkpoints.
  Trainer(Params& params, TrainOptions options, dist::Communicator* comm = nullptr,
          Precision precision = Precision::fp32)
      : params_(params), options_(normalized(options)), precision_(precision), comm_(comm),
        slice_(dist::batch_slice(options_.batch, communicator().size(), communicator().rank())),
        micro_(std::min(options_.micro_batch, slice_.rows)), grads_(std::make_unique<Params>()),
        optimizer_(options_.zero1 ? nullptr : std::make_unique<AdamW<Params>>(params, options_.adam)),
        sharded_(options_.zero1 ? std::make_unique<dist::ShardedAdamW<Params>>(params, options_.adam, communicator())
                                : nullptr),
        image_acts_(std::make_unique<typename Visual::TrainActs>(micro_, options_.recompute)),
        text_acts_(std::make_unique<typename Text::TrainActs>(micro_, options_.recompute)),
        image_features_(options_.batch * E), text_features_(options_.batch * E), d_image_all_(options_.batch * E),
        d_text_all_(options_.batch * E), d_image_(slice_.rows * E), d_text_(slice_.rows * E),
        scratch_features_(micro_ * E),
        image_grad_sum_(*grads_, [](const std::string& name) { return name.starts_with("visual."); }),
        text_grad_sum_(*grads_, [](const std::string& name) { return !name.starts_with("visual."); }) {
    CLIP_CHECK(options_.batch >= communicator().size(), "a global batch of ", options_.batch, " pairs leaves rank ",
               communicator().size() - 1, " of ", communicator().size(),
               " without a pair: the batch must be at least the number of processes");
    if (options_.sync_batchnorm && dims<Cfg>::is_resnet)
      dist::check_equal_micro_batch_counts(options_.batch, options_.micro_batch, communicator().size());
    zero(*grads_);
  }

  // One optimizer step on `batch` pairs: images [n, 3, R, R] (normalised pixels), tokens [n, T],
  // the n = slice().rows pairs of this rank (with one process: the whole batch).
  // Throws clip::Error, before any weight changes, when the loss or the gradients are not finite
  // (a ResNet's BatchNorm running statistics have then seen the failed batch, except when the
  // loss fails under accumulation, whose first pass leaves them alone). Every rank throws alike:
  // the values checked are the ranks' sums.
  StepResult step(const float* images, const int32_t* tokens) {
    const int64_t n = slice_.rows, M = micro_;
    const float logit_scale = params_.logit_scale[0];
    const MatmulPrecisionScope towers(precision_);  // checked_loss returns to fp32
    float* own_image = image_features_.data() + slice_.first * E;  // [n, E]
    float* own_text = text_features_.data() + slice_.first * E;    // [n, E]
    dist::Communicator& comm = communicator();
    const bool parallel = comm.size() > 1;
    const bool sum_gradients = parallel && !sharded_;  // (ZeRO-1 sums them as it shards them)
    std::optional<BatchNormSync> sync_bn;  // --sync-bn: BatchNorm over the global batch
    if (parallel && options_.sync_batchnorm)
      sync_bn.emplace([&comm](double* data, int64_t n) { comm.all_reduce_sum(data, n); }, comm.rank(), comm.size());
    ContrastiveLoss loss;
    if (M == n) {
      image_forward(images, own_image, n, /*update_running_stats=*/true);
      Text::forward_train(params_, *text_acts_, tokens, own_text, n);
      loss = checked_loss(logit_scale);
      Visual::backward(params_.visual, *image_acts_, d_image_.data(), grads_->visual, n);
      if (sum_gradients) image_grad_sum_.start(comm);  // overlaps the text tower's backward
      Text::backward(params_, *text_acts_, d_text_.data(), *grads_, n);
    } else {
      for (int64_t b = 0; b < n; b += M) {  // 1. features only
        const int64_t m = std::min(M, n - b);
        image_forward(images + b * image_floats, own_image + b * E, m, /*update_running_stats=*/false);
        Text::forward_train(params_, *text_acts_, tokens + b * T, own_text + b * E, m);
      }
      loss = checked_loss(logit_scale);  // 2. the whole batch
      for (int64_t b = 0; b < n; b += M) {  // 3. recompute and backward, micro-batch by micro-batch
        const int64_t m = std::min(M, n - b);
        image_forward(images + b * image_floats, scratch_features_.data(), m, /*update_running_stats=*/true);
        Visual::backward(params_.visual, *image_acts_, d_image_.data() + b * E, grads_->visual, m);
        Text::forward_train(params_, *text_acts_, tokens + b * T, scratch_features_.data(), m);
        Text::backward(params_, *text_acts_, d_text_.data() + b * E, *grads_, m);
      }
      if (sum_gradients) image_grad_sum_.start(comm);
    }
    grads_->logit_scale[0] += loss.d_logit_scale;  // this rank's share; the sum below adds the rest
    if (sum_gradients) {
      text_grad_sum_.start(comm);
      image_grad_sum_.finish();
      text_grad_sum_.finish();
    }

    // With ZeRO-1 the sum is a reduce-scatter: each rank gets its shard of the summed gradients.
    // Otherwise every rank holds the whole sum, and the ranks share the norm's work.
    const auto sum_partials = [&comm](double* data, int64_t count) { comm.all_reduce_sum(data, count); };
    const double norm =
        sharded_ ? sharded_->reduce(*grads_) : gradient_norm(*grads_, comm.rank(), comm.size(), sum_partials);
    if (!std::isfinite(norm)) {
      zero(*grads_);
      CLIP_FAIL("training step ", steps(), ": the gradient norm is ", norm,
                " (NaN or Inf gradients); the weights were not updated. Lower the learning rate or enable "
                "gradient clipping.");
    }
    const float lr = learning_rate(steps());
    if (sharded_) sharded_->update(params_, lr, clip_factor(norm, options_.grad_clip_norm));
    else optimizer_->step(params_, *grads_, lr, clip_factor(norm, options_.grad_clip_norm));
    clamp_logit_scale(params_.logit_scale[0]);
    return {loss.loss, lr, std::exp(logit_scale), static_cast<float>(norm)};
  }

  // The learning rate of 0-based step `step` under this trainer's schedule.
  float learning_rate(int64_t step) const {
    if (options_.total_steps > 0)
      return cosine_lr(step, options_.adam.lr, options_.warmup_steps, options_.total_steps);
    return const_lr(step, options_.adam.lr, options_.warmup_steps);
  }

  int64_t steps() const { return optimizer_ ? optimizer_->steps() : sharded_->steps(); }
  // The optimizer (not with ZeRO-1: see optimizer_state()).
  AdamW<Params>& optimizer() { return *checked_optimizer(); }
  const AdamW<Params>& optimizer() const { return *checked_optimizer(); }

  // The whole optimizer state, for checkpoints; with ZeRO-1 the ranks' shards gathered into a
  // copy (a collective: every rank calls it), to be handed back with scatter_optimizer_state()
  // after it was loaded into, and freed with release_optimizer_state().
  AdamW<Params>& optimizer_state() {
    if (optimizer_) return *optimizer_;
    if (!gathered_) gathered_ = std::make_unique<AdamW<Params>>(params_, options_.adam);
    sharded_->gather(gathered_.get());
    return *gathered_;
  }
  void scatter_optimizer_state() {
    if (sharded_ && gathered_) sharded_->scatter(*gathered_);
  }
  void release_optimizer_state() { gathered_.reset(); }
  // Floats of optimizer state this rank holds (ZeRO-1: its gradient, m and v shards).
  int64_t optimizer_floats() const { return sharded_ ? sharded_->floats_per_rank() : 2 * parameter_count(params_); }
  const TrainOptions& options() const { return options_; }
  Params& params() { return params_; }
  Precision precision() const { return precision_; }
  dist::Communicator& communicator() { return comm_ ? *comm_ : local_; }
  // This rank's rows of the global batch.
  dist::Slice slice() const { return slice_; }

 private:
  Params& params_;
  TrainOptions options_;
  Precision precision_;
  dist::LocalCommunicator local_;  // the communicator when none is given
  dist::Communicator* comm_;       // the processes sharing each step, or null
  dist::Slice slice_;
  int64_t micro_;  // pairs per forward/backward on this rank
  std::unique_ptr<Params> grads_;  // zero between steps (AdamW clears what it consumes)
  std::unique_ptr<AdamW<Params>> optimizer_;             // null with ZeRO-1
  std::unique_ptr<dist::ShardedAdamW<Params>> sharded_;  // ZeRO-1
  std::unique_ptr<AdamW<Params>> gathered_;              // ZeRO-1: optimizer_state()'s copy
  std::unique_ptr<typename Visual::TrainActs> image_acts_;
  std::unique_ptr<typename Text::TrainActs> text_acts_;
  std::vector<float> image_features_, text_features_;  // [B, E]: every rank's, gathered
  std::vector<float> d_image_all_, d_text_all_;        // [B, E]: this rank's share of every row's gradient
  std::vector<float> d_image_, d_text_;                // [n, E]: the sums for this rank's rows
  std::vector<float> scratch_features_;                // [M, E]: recomputed features, not needed again
  dist::GradientBuckets image_grad_sum_, text_grad_sum_;

  AdamW<Params>* checked_optimizer() const {
    CLIP_CHECK(optimizer_, "with ZeRO-1 the optimizer state is sharded across the ranks: use optimizer_state()");
    return optimizer_.get();
  }

  static TrainOptions normalized(TrainOptions o) {
    CLIP_CHECK(o.batch > 0, "a training batch needs at least one pair, got ", o.batch);
    if (o.micro_batch == 0) o.micro_batch = o.batch;
    CLIP_CHECK(o.micro_batch > 0 && o.micro_batch <= o.batch, "the micro-batch (", o.micro_batch,
               ") must be between 1 and the batch (", o.batch, ")");
    CLIP_CHECK(o.adam.lr >= 0, "the learning rate cannot be negative, got ", o.adam.lr);
    CLIP_CHECK(o.warmup_steps >= 0 && o.total_steps >= 0, "warmup and total steps cannot be negative");
    CLIP_CHECK(o.total_steps == 0 || o.total_steps > o.warmup_steps, "the cosine schedule needs more total steps (",
               o.total_steps, ") than warmup steps (", o.warmup_steps, ")");
    CLIP_CHECK(o.grad_clip_norm >= 0, "the gradient clipping norm cannot be negative, got ", o.grad_clip_norm);
    return o;
  }

  void image_forward(const float* images, float* features, int64_t n, bool update_running_stats) {
    if constexpr (dims<Cfg>::is_resnet)
      Visual::forward_train(params_.visual, *image_acts_, images, features, n, update_running_stats);
    else
      Visual::forward_train(params_.visual, *image_acts_, images, features, n);
  }

  // The whole batch's loss and this rank's feature gradients, refused when not finite: gathers
  // every rank's features, computes this rank's share, and sums the shares.
  ContrastiveLoss checked_loss(float logit_scale) {
    const MatmulPrecisionScope fp32(Precision::fp32);
    dist::Communicator& comm = communicator();
    const std::vector<int64_t> counts = dist::slice_counts(options_.batch, comm.size(), E);
    comm.all_gather(image_features_.data(), counts);
    comm.all_gather(text_features_.data(), counts);
    ContrastiveLoss loss;
    try {
      loss = contrastive_loss_rows<E>(image_features_.data(), text_features_.data(), options_.batch, slice_.first,
                                      slice_.rows, logit_scale, d_image_all_.data(), d_text_all_.data());
    } catch (const Error& e) {
      CLIP_FAIL("training step ", steps(), ": ", e.what(), "; the weights were not updated");
    }
    comm.reduce_scatter_sum(d_image_all_.data(), d_image_.data(), counts);
    comm.reduce_scatter_sum(d_text_all_.data(), d_text_.data(), counts);
    comm.all_reduce_sum(&loss.loss, 1);
    CLIP_CHECK(std::isfinite(loss.loss), "training step ", steps(), ": the loss is ", loss.loss,
               "; the weights were not updated. Lower the learning rate or enable gradient clipping.");
    return loss;
  }
};

}  // namespace clip
