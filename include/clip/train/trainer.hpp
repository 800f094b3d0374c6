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
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <vector>

#include "clip/config/device.hpp"
#include "clip/config/dims.hpp"
#include "clip/core/error.hpp"
#include "clip/models/clip_model.hpp"
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
  int64_t batch = 0;             // pairs per optimizer step
  int64_t micro_batch = 0;       // pairs per forward/backward (0: the whole batch)
  AdamWOptions adam{};           // adam.lr is the base (peak) learning rate
  int64_t warmup_steps = 0;      // linear warmup
  int64_t total_steps = 0;       // cosine decay to 0 at this step (0: constant after warmup)
  float grad_clip_norm = 0.0f;   // clip the global gradient norm to this (0: off)
  bool recompute = false;        // keep only block inputs, re-run blocks during backward
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

  // precision bf16 is mixed precision as open_clip's amp_bf16: the matrix products of both
  // towers' forward and backward run in bf16 (operands rounded, fp32 sums); the weights (the
  // master copy), the gradients, LayerNorm, softmax, the loss and AdamW stay fp32, and so do
  // checkpoints.
  Trainer(Params& params, TrainOptions options, Precision precision = Precision::fp32)
      : params_(params), options_(normalized(options)), precision_(precision), grads_(std::make_unique<Params>()),
        optimizer_(params, options_.adam),
        image_acts_(std::make_unique<typename Visual::TrainActs>(options_.micro_batch, options_.recompute)),
        text_acts_(std::make_unique<typename Text::TrainActs>(options_.micro_batch, options_.recompute)),
        image_features_(options_.batch * E), text_features_(options_.batch * E), d_image_(options_.batch * E),
        d_text_(options_.batch * E), scratch_features_(options_.micro_batch * E) {
    zero(*grads_);
  }

  // One optimizer step on `batch` pairs: images [B, 3, R, R] (normalised pixels), tokens [B, T].
  // Throws clip::Error, before any weight changes, when the loss or the gradients are not finite
  // (a ResNet's BatchNorm running statistics have then seen the failed batch, except when the
  // loss fails under accumulation, whose first pass leaves them alone).
  StepResult step(const float* images, const int32_t* tokens) {
    const int64_t B = options_.batch, M = options_.micro_batch;
    const float logit_scale = params_.logit_scale[0];
    const MatmulPrecisionScope towers(precision_);  // checked_loss returns to fp32
    ContrastiveLoss loss;
    if (M == B) {
      image_forward(images, image_features_.data(), B, /*update_running_stats=*/true);
      Text::forward_train(params_, *text_acts_, tokens, text_features_.data(), B);
      loss = checked_loss(logit_scale);
      Visual::backward(params_.visual, *image_acts_, d_image_.data(), grads_->visual, B);
      Text::backward(params_, *text_acts_, d_text_.data(), *grads_, B);
    } else {
      for (int64_t b = 0; b < B; b += M) {  // 1. features only
        const int64_t n = std::min(M, B - b);
        image_forward(images + b * image_floats, image_features_.data() + b * E, n, /*update_running_stats=*/false);
        Text::forward_train(params_, *text_acts_, tokens + b * T, text_features_.data() + b * E, n);
      }
      loss = checked_loss(logit_scale);  // 2. the whole batch
      for (int64_t b = 0; b < B; b += M) {  // 3. recompute and backward, micro-batch by micro-batch
        const int64_t n = std::min(M, B - b);
        image_forward(images + b * image_floats, scratch_features_.data(), n, /*update_running_stats=*/true);
        Visual::backward(params_.visual, *image_acts_, d_image_.data() + b * E, grads_->visual, n);
        Text::forward_train(params_, *text_acts_, tokens + b * T, scratch_features_.data(), n);
        Text::backward(params_, *text_acts_, d_text_.data() + b * E, *grads_, n);
      }
    }
    grads_->logit_scale[0] += loss.d_logit_scale;

    const double norm = gradient_norm(*grads_);
    if (!std::isfinite(norm)) {
      zero(*grads_);
      CLIP_FAIL("training step ", optimizer_.steps(), ": the gradient norm is ", norm,
                " (NaN or Inf gradients); the weights were not updated. Lower the learning rate or enable "
                "gradient clipping.");
    }
    const float lr = learning_rate(optimizer_.steps());
    optimizer_.step(params_, *grads_, lr, clip_factor(norm, options_.grad_clip_norm));
    clamp_logit_scale(params_.logit_scale[0]);
    return {loss.loss, lr, std::exp(logit_scale), static_cast<float>(norm)};
  }

  // The learning rate of 0-based step `step` under this trainer's schedule.
  float learning_rate(int64_t step) const {
    if (options_.total_steps > 0)
      return cosine_lr(step, options_.adam.lr, options_.warmup_steps, options_.total_steps);
    return const_lr(step, options_.adam.lr, options_.warmup_steps);
  }

  int64_t steps() const { return optimizer_.steps(); }
  AdamW<Params>& optimizer() { return optimizer_; }
  const AdamW<Params>& optimizer() const { return optimizer_; }
  const TrainOptions& options() const { return options_; }
  Params& params() { return params_; }
  Precision precision() const { return precision_; }

 private:
  Params& params_;
  TrainOptions options_;
  Precision precision_;
  std::unique_ptr<Params> grads_;  // zero between steps (AdamW clears what it consumes)
  AdamW<Params> optimizer_;
  std::unique_ptr<typename Visual::TrainActs> image_acts_;
  std::unique_ptr<typename Text::TrainActs> text_acts_;
  std::vector<float> image_features_, text_features_;  // [B, E]
  std::vector<float> d_image_, d_text_;                // [B, E]
  std::vector<float> scratch_features_;                // [M, E]: recomputed features, not needed again

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

  // The whole batch's loss and feature gradients, refused when not finite.
  ContrastiveLoss checked_loss(float logit_scale) {
    const MatmulPrecisionScope fp32(Precision::fp32);
    ContrastiveLoss loss;
    try {
      loss = contrastive_loss<E>(image_features_.data(), text_features_.data(), options_.batch, logit_scale,
                                 d_image_.data(), d_text_.data());
    } catch (const Error& e) {
      CLIP_FAIL("training step ", optimizer_.steps(), ": ", e.what(), "; the weights were not updated");
    }
    CLIP_CHECK(std::isfinite(loss.loss), "training step ", optimizer_.steps(), ": the loss is ", loss.loss,
               "; the weights were not updated. Lower the learning rate or enable gradient clipping.");
    return loss;
  }
};

}  // namespace clip
