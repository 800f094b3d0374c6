// One contrastive training step on the GPU: cuda::TrainNet<Cfg, S> on device batches (for
// benchmarks and programs that keep batches on the device), and the definitions of
// clip::Trainer<Cfg, Device::cuda> (include/clip/cuda/trainer.hpp) over it. Semantics are the CPU
// Trainer's (include/clip/train/trainer.hpp): same loss, AdamW groups and arithmetic, schedule,
// clipping, logit-scale clamp, gradient accumulation, and refusal of non-finite losses or
// gradients before any update.
//
// Everything stays on the device. The loss is helper h5's GPU contrastive loss
// (kernels/contrastive_loss.cuh: features S in, feature gradients S out, the double loss, and
// logit_scale's gradient added to its slot on the device). The gradient norm, AdamW and the
// clamp are h5's multi-tensor kernels (kernels/adamw.cuh, grad_norm.cuh) over one chunk table of
// the trained tensors (buffers are not in it), built once from the weight layout; AdamW's element
// update is the CPU's adamw_element (adamw_math.hpp).
//
// One synchronisation per step: after backward and the gradient norm, ONE copy of 24 bytes
// brings the loss (double), the norm (double) and the logit_scale the loss used (float) to a
// pinned host buffer. The host refuses a non-finite loss or norm there (the gradients are zeroed,
// no weight has moved), computes the clip factor and enqueues AdamW and the clamp; step() returns
// without waiting for them (the next step, download() and the read-back are ordered after them
// on the same stream). A zero or non-finite feature norm makes the GPU loss NaN (the CPU names the
// row instead): refused the same way. The one exception is a ResNet under accumulation: its loss is
// read before the second pass (a second synchronisation), because the CPU leaves BatchNorm's
// running statistics alone when the loss of an accumulated batch fails, and the second pass
// updates them.
//
// Gradient accumulation (micro_batch < batch), as the CPU Trainer: (1) every micro-batch's
// features, activations overwritten, running statistics left alone; (2) the loss and the feature
// gradients of the whole batch; (3) per micro-batch, forward again (running statistics updated)
// and backward with its rows of the feature gradients. Activations are planned for one micro-batch.
// Nothing is allocated inside a step (cuBLASLt plans are cached per shape on first use).
//
// Data parallel, one process per GPU (given a device Communicator, kernels/dist/): each rank
// passes its slice of the global batch (dist::batch_slice), as the CPU Trainer, and the loss is
// the CPU Trainer's, step for step: its features go into its rows of the [B, E] buffers, which
// are gathered; the GPU contrastive_loss_rows computes the rank's rows' logits against all B
// columns both ways (logits [n, B] per rank, dist::logits_per_rank, never [B, B]), its share of
// the loss and of logit_scale's gradient, and its share of every row's feature gradients (fp32),
// which are reduce-scattered to their owners; the loss shares are summed (all-reduce of one
// double). The parameter gradients are summed in buckets of the flat gradient buffer
// (dist::GradientBuckets::flat_ranges, the CPU's bucket cuts), the image tower's started as soon
// as its backward is done (on the communicator's stream, overlapping the text tower's backward);
// logit_scale's shares are summed with them. With TrainOptions::sync_batchnorm (--sync-bn), a
// ResNet's BatchNorms use every rank's batch statistics (kernels/batchnorm_sync.cuh, its table
// summed over NCCL), as the CPU Trainer under BatchNormSync; the ranks must then run as many
// micro-batches (checked at construction, as the CPU). With TrainOptions::zero1 (--zero1) the
// gradients are not all-reduced: kernels/dist/sharded_adamw.cuh reduce-scatters them into this
// rank's shard (the CPU's cut, dist::shard_plan; the image tower's contiguous buckets as soon as
// its backward is done, overlapping the text tower's, the rest after backward), takes the global
// norm from the shards, and AdamW updates the shard's master weights, whose moments only this
// rank holds. In bf16 the fp32 masters of the trained tensors are sharded as well (no whole
// fp32 buffer: the rank holds its owned floats; BatchNorm buffers and logit_scale stay fp32 on
// every rank, logit_scale broadcast by its owner): AdamW writes the bf16 image of its shard and
// the bf16 copy is all-gathered. In fp32 the masters are the weights the kernels read, whole on every rank:
// AdamW writes the rank's slices of them and they are all-gathered. The step's semantics
// (clipping, clamp, schedule, refusals) do not change; download()/upload() gather and scatter the
// moments, and in bf16 the master weights.
//
// Which loss: one GPU without a communicator keeps the single-matrix contrastive_loss (L formed
// once, column statistics by a column kernel); the rows variant at n = B would form L twice (Lr
// and Lc = L^T). Any communicator, even of one process, takes the rows path, so that the NCCL
// test at world size 1 (tests/cuda/test_cuda_nccl.cu) runs on one GPU the code that several GPUs
// run, against the single-matrix step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/config/dims.hpp"
#include "clip/cuda/trainer.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/dist/gradient_buckets.hpp"
#include "clip/dist/step_traffic.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/adamw_math.hpp"
#include "clip/train/decimal.hpp"
#include "clip/train/grad_clip.hpp"
#include "clip/train/schedule.hpp"
#include "clip/train/trainer.hpp"
#include "kernels/adamw.cuh"
#include "kernels/batchnorm_sync.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/contrastive_loss.cuh"
#include "kernels/device_buffer.cuh"
#if CLIP_WITH_NCCL
#include "kernels/dist/nccl_communicator.cuh"
#endif
#include "kernels/dist/sharded_adamw.cuh"
#include "kernels/grad_norm.cuh"
#include "kernels/linear.cuh"  // convert
#include "kernels/models/cuda_model.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace trainer_detail {

// What one step reads back, in one copy: device slots filled by the step's kernels, mirrored by
// a pinned host buffer of the same layout (pinned: the copy is a real async DMA).
struct StepReadback {
  double loss;         // the contrastive loss (contrastive_loss's loss_exact)
  double norm;         // the global gradient norm (gradient_norm)
  float logit_scale;   // the master logit_scale the loss used (before AdamW moves it)
};
static_assert(sizeof(StepReadback) == 3 * sizeof(double), "the read-back is three 8-byte slots");

class PinnedReadback {
 public:
  PinnedReadback() { CLIP_CUDA_CHECK(cudaMallocHost(&p_, sizeof(StepReadback))); }
  ~PinnedReadback() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedReadback(const PinnedReadback&) = delete;
  PinnedReadback& operator=(const PinnedReadback&) = delete;
  StepReadback* get() { return p_; }

 private:
  StepReadback* p_ = nullptr;
};

}  // namespace trainer_detail

template <Variant Cfg, class S>
class TrainNet {
 public:
  using Params = typename Clip<Cfg>::Params;
  static constexpr int R = Clip<Cfg>::R, T = Clip<Cfg>::T, E = Clip<Cfg>::E;
  static constexpr int64_t image_floats = int64_t{3} * R * R;
  // BatchNorm running statistics live in the image tower of the ResNets only.
  static constexpr bool has_running_stats = dims<Cfg>::is_resnet;

  // Activations are planned for one micro-batch (options.micro_batch, 0: the whole batch).
  // `comm`: the processes sharing each step, a device communicator on ctx's GPU whose compute
  // stream is ctx.stream() (null: this one alone, no collective at all); it must outlive this.
  TrainNet(Context& ctx, Params& host, TrainOptions options, dist::Communicator* comm = nullptr)
      : ctx_(ctx), options_(checked(options)), comm_(comm),
        slice_(dist::batch_slice(options_.batch, comm ? comm->size() : 1, comm ? comm->rank() : 0)),
        micro_(std::min(options_.micro_batch, slice_.rows)),
        net_(ctx, host, host, micro_, /*training=*/true, options_.recompute, master_placement(options_, comm)),
        m_(options_.zero1 ? 0 : net_.weights().size()), v_(options_.zero1 ? 0 : net_.weights().size()),
        features_(2 * options_.batch * E), d_features_(2 * options_.batch * E),
        logits_(dist::logits_per_rank(options_.batch, comm ? comm->size() : 1, comm ? comm->rank() : 0)),
        loss_arena_(comm ? ContrastiveLossRowsScratch<E>::bytes(options_.batch, logits_.rows)
                         : ContrastiveLossScratch<E>::bytes(options_.batch)),
        readback_(sizeof(trainer_detail::StepReadback) / sizeof(double)) {
    if (comm) {
      rows_scratch_.emplace(loss_arena_, options_.batch, logits_.rows);
      d_share_ = DeviceBuffer<float>(2 * options_.batch * E);
      if constexpr (!std::is_same_v<S, float>) d_own_ = DeviceBuffer<float>(2 * slice_.rows * E);
    } else {
      whole_scratch_.emplace(loss_arena_, options_.batch);
    }
    m_.zero(ctx.stream());
    v_.zero(ctx.stream());
    readback_.zero(ctx.stream());
    // The chunk table: trained tensors only (buffers are not trained), in visit order.
    std::vector<clip::TensorSlice> trained;
    for (const WeightEntry& e : net_.weights().layout().entries())
      if (e.role == Role::parameter) trained.push_back({e.offset, e.numel, clip::adamw_decays(e.name, e.rank)});
    table_ = MultiTensorTable(ctx, trained, net_.weights().size());
    CLIP_CHECK(!options_.zero1 || comm_, "ZeRO-1 (--zero1) shards the optimizer across the processes of a "
               "communicator: the GPU trainer needs one (a one-process communicator runs it at world size 1)");
    if (comm_) {
      CLIP_CHECK(options_.batch >= comm_->size(), "a global batch of ", options_.batch, " pairs leaves rank ",
                 comm_->size() - 1, " of ", comm_->size(), " without a pair: the batch must be at least the number of processes");
      if (options_.zero1) {
        auto& W = net_.weights();
        zero1_.emplace(ctx, zero1_plan(trained, comm_->size(), comm_->rank()), W.size(), *comm_, W.masters_sharded());
        std::vector<bool> visual;  // per trained tensor: the image tower's (final after image_backward)
        for (const WeightEntry& e : W.layout().entries())
          if (e.role == Role::parameter) visual.push_back(e.name.starts_with("visual."));
        zero1_->set_early(zero1_->plan().buckets_within(visual));
        if (W.masters_sharded()) {  // the shard's fp32 masters from the host weights
          std::vector<float> flat(static_cast<size_t>(W.size()));
          W.layout().pack(host, flat.data());
          zero1_->load_masters(flat.data());
        }
      } else {
        plan_gradient_sums();
      }
      if constexpr (has_running_stats)
        if (options_.sync_batchnorm) {
          dist::check_equal_micro_batch_counts(options_.batch, options_.micro_batch, comm_->size());
          bn_table_ = DeviceBuffer<double>(BatchNormSyncScope::capacity_for(comm_->size(), kWidestBatchNorm));
        }
    }
    ctx.synchronize();
  }

  // One optimizer step on a device batch: images [n, 3, R, R] fp32, ids [n, T], pool positions [n]
  // and positions = max(pool) + 1 (TextBatch::from_host), the n = slice().rows pairs of this rank
  // (one process: the whole batch). Under accumulation each micro-batch's text runs max(its
  // pool) + 1 positions when host_pool (the same [n] positions on the host) is given, otherwise
  // the whole slice's `positions` (same values, more work).
  StepResult step(const float* d_images, const int32_t* d_tokens, const int32_t* d_pool, int64_t positions,
                  const int32_t* host_pool = nullptr) {
    const int64_t B = slice_.rows, M = micro_;  // this rank's rows (the rest of the step says B for them)
    const int64_t first = slice_.first, global = options_.batch;
    std::optional<BatchNormSyncScope> sync_bn;  // --sync-bn: BatchNorm over the global batch
    if (bn_table_.size() > 0)
      sync_bn.emplace([this](double* data, int64_t n) { comm_->all_reduce_sum(data, n); }, comm_->rank(),
                      comm_->size(), bn_table_.data(), bn_table_.size());
    auto& W = net_.weights();
    Params& p = net_.keys();
    S* img = features_.data() + first * E;             // this rank's rows of [global, E]
    S* txt = features_.data() + (global + first) * E;
    S* d_img = d_features_.data() + first * E;
    S* d_txt = d_features_.data() + (global + first) * E;

    // The temperature of this step's loss, before AdamW moves it: into its read-back slot.
    CLIP_CUDA_CHECK(cudaMemcpyAsync(&slots()->logit_scale, W.master(p.logit_scale), sizeof(float),
                                    cudaMemcpyDeviceToDevice, ctx_.stream()));
    if (M == B) {
      net_.image_forward_train(d_images, img, B, /*update_running_stats=*/true);
      net_.text_forward_train(d_tokens, d_pool, positions, txt, B);
      loss(global);
      net_.image_backward(d_img, B);
      start_image_gradient_sums();  // overlaps the text tower's backward
      net_.text_backward(d_txt, B);
    } else {
      for (int64_t b = 0; b < B; b += M) {  // 1. features only
        const int64_t n = std::min(M, B - b);
        net_.image_forward_train(d_images + b * image_floats, img + b * E, n, /*update_running_stats=*/false);
        net_.text_forward_train(d_tokens + b * T, d_pool + b, micro_positions(host_pool, b, n, positions),
                                txt + b * E, n);
      }
      loss(global);  // 2. the whole batch
      if constexpr (has_running_stats) {
        // The CPU refuses a failed loss before pass 3 touches the running statistics.
        read_back();
        check_loss();
      }
      for (int64_t b = 0; b < B; b += M) {  // 3. recompute and backward, micro-batch by micro-batch
        // The recomputed features overwrite the first pass's (equal; the loss has read them).
        const int64_t n = std::min(M, B - b);
        net_.image_forward_train(d_images + b * image_floats, img + b * E, n, /*update_running_stats=*/true);
        net_.image_backward(d_img + b * E, n);
        net_.text_forward_train(d_tokens + b * T, d_pool + b, micro_positions(host_pool, b, n, positions),
                                txt + b * E, n);
        net_.text_backward(d_txt + b * E, n);
      }
      start_image_gradient_sums();
    }
    start_gradient_sums(text_sums_);  // logit_scale's among them
    finish_gradient_sums();

    // The global norm of the trained tensors' gradients (logit_scale's included), then the one
    // read-back of the step. ZeRO-1: the gradients reduce-scattered into the shard, the norm
    // from every rank's shard.
    if (zero1_) zero1_->reduce(W.grad_data(), &slots()->norm);
    else gradient_norm(ctx_, table_, W.grad_data(), &slots()->norm);
    read_back();
    check_loss();
    const trainer_detail::StepReadback r = *host_;
    if (!std::isfinite(r.norm)) {
      zero_gradients();
      CLIP_FAIL("training step ", steps_, ": the gradient norm is ", r.norm,
                " (NaN or Inf gradients); the weights were not updated. Lower the learning rate or enable "
                "gradient clipping.");
    }
    const float lr = learning_rate(steps_);
    adamw(lr, clip::clip_factor(r.norm, options_.grad_clip_norm));  // ZeRO-1: the clamp included
    if (!zero1_)
      clamp_logit_scale<S>(ctx_, W.master(p.logit_scale), DeviceWeights<S>::separate_copy ? W.w(p.logit_scale) : nullptr);
    return {r.loss, lr, std::exp(r.logit_scale), static_cast<float>(r.norm)};
  }

  float learning_rate(int64_t step) const {
    if (options_.total_steps > 0) return clip::cosine_lr(step, options_.adam.lr, options_.warmup_steps, options_.total_steps);
    return clip::const_lr(step, options_.adam.lr, options_.warmup_steps);
  }
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }
  const TrainOptions& options() const { return options_; }
  dist::Slice slice() const { return slice_; }
  // The logits this rank forms per step: [n, B] under a communicator, [B, B] without.
  dist::LogitShape logits_per_rank() const { return logits_; }
  ClipNet<Cfg, S>& net() { return net_; }

  // The weights and BatchNorm running statistics into a host Params (ZeRO-1 in bf16: the master
  // shards gathered, a collective every rank calls), and from one (ZeRO-1 in bf16: this rank's
  // slices of the masters taken, the bf16 copy converted from the host's fp32).
  void weights_to_host(Params& host) {
    auto& W = net_.weights();
    if (!W.masters_sharded()) return W.download(ctx_, host);
    std::vector<float> flat(static_cast<size_t>(W.size()), 0.0f);
    zero1_->gather_masters(flat.data());
    W.download_replicated(ctx_, flat.data());
    W.layout().unpack(flat.data(), host);
  }
  void weights_from_host(const Params& host) {
    auto& W = net_.weights();
    W.upload(ctx_, host);
    if (!W.masters_sharded()) return;
    std::vector<float> flat(static_cast<size_t>(W.size()));
    W.layout().pack(host, flat.data());
    zero1_->load_masters(flat.data());
  }

  // The whole moments m, v into host buffers of the layout's size (ZeRO-1: gathered from the
  // ranks, a collective every rank calls), and back (ZeRO-1: this rank's slices taken).
  void moments_to_host(float* m, float* v) {
    if (zero1_) return zero1_->gather(m, v);
    const int64_t n = net_.weights().size();
    m_.download(m, n, ctx_.stream());
    v_.download(v, n, ctx_.stream());
  }
  void moments_from_host(const float* m, const float* v) {
    if (zero1_) return zero1_->scatter(m, v);
    const int64_t n = net_.weights().size();
    m_.upload(m, n, ctx_.stream());
    v_.upload(v, n, ctx_.stream());
    ctx_.synchronize();
  }

  // The device memory this rank holds for weights, gradients and the optimizer state
  // (zero1_plan.hpp's arithmetic), and what it would hold without ZeRO-1.
  DeviceStateBytes state_bytes() const {
    const auto& W = net_.weights();
    if (!zero1_) return device_state_bytes(W.size(), DeviceWeights<S>::separate_copy);
    return device_state_bytes(W.size(), DeviceWeights<S>::separate_copy, zero1_->plan().shard.owned,
                              zero1_->plan().shard.largest_bucket(), W.masters_sharded() ? W.master_floats() : -1);
  }
  DeviceStateBytes unsharded_state_bytes() const {
    return device_state_bytes(net_.weights().size(), DeviceWeights<S>::separate_copy);
  }

 private:
  Context& ctx_;
  TrainOptions options_;
  dist::Communicator* comm_;           // null: one process, no collective
  dist::Slice slice_;                  // this rank's rows of the global batch
  int64_t micro_;                      // pairs per forward/backward on this rank
  ClipNet<Cfg, S> net_;
  DeviceBuffer<float> m_, v_;         // the moments (empty under ZeRO-1: zero1_ holds this rank's)
  MultiTensorTable table_;
  DeviceBuffer<S> features_;           // [2, B, E] image then text
  DeviceBuffer<S> d_features_;         // [2, B, E] their gradients (a rank's own rows only, under a communicator)
  dist::LogitShape logits_;            // the logits a step forms here
  Arena loss_arena_;                   // the contrastive loss's scratch, planned for them
  std::optional<ContrastiveLossScratch<E>> whole_scratch_;     // no communicator: [B, B]
  std::optional<ContrastiveLossRowsScratch<E>> rows_scratch_;  // a communicator: [n, B]
  DeviceBuffer<float> d_share_;        // [2, B, E] this rank's share of every row's feature gradients
  DeviceBuffer<float> d_own_;          // [2, n, E] their sums for its rows, before bf16 (S = bf16 only)
  DeviceBuffer<double> readback_;      // device StepReadback (3 slots)
  trainer_detail::PinnedReadback pinned_;
  trainer_detail::StepReadback* host_ = pinned_.get();
  int64_t steps_ = 0;
  // Ranges of the flat gradient buffer summed across ranks as one collective each (the buckets of
  // dist::GradientBuckets): the image tower's, then the rest.
  using Range = dist::GradientBuckets::FlatRange;
  std::vector<Range> image_sums_, text_sums_;
  std::vector<std::unique_ptr<dist::PendingCollective>> pending_;
  DeviceBuffer<double> bn_table_;      // --sync-bn (a ResNet under a communicator): the statistics' table
  std::optional<ShardedAdamW> zero1_;  // --zero1 (under a communicator): the sharded optimizer

  trainer_detail::StepReadback* slots() { return reinterpret_cast<trainer_detail::StepReadback*>(readback_.data()); }

  // A ResNet's widest BatchNorm: the last stage's 4 x 8 x width channels.
  static constexpr int64_t kWidestBatchNorm = int64_t{32} * Cfg::vision_width;


  // ZeRO-1 in bf16 shards the fp32 masters too; logit_scale stays fp32 on every rank (the loss
  // reads it). In fp32 the masters are the weights the kernels read: whole.
  static MasterPlacement master_placement(const TrainOptions& o, const dist::Communicator* comm) {
    if (!o.zero1 || !comm || !DeviceWeights<S>::separate_copy) return {};
    return {true, {"logit_scale"}};
  }

  static TrainOptions checked(TrainOptions o) {
    CLIP_CHECK(o.batch > 0, "a training batch needs at least one pair, got ", o.batch);
    if (o.micro_batch == 0) o.micro_batch = o.batch;
    CLIP_CHECK(o.micro_batch > 0 && o.micro_batch <= o.batch, "the micro-batch (", o.micro_batch,
               ") must be between 1 and the batch (", o.batch, ")");
    CLIP_CHECK(o.adam.lr >= 0, "the learning rate cannot be negative, got ", o.adam.lr);
    CLIP_CHECK(o.adam.beta1 >= 0 && o.adam.beta1 < 1 && o.adam.beta2 >= 0 && o.adam.beta2 < 1,
               "AdamW needs betas in [0, 1), got beta1 ", o.adam.beta1, " and beta2 ", o.adam.beta2);
    CLIP_CHECK(o.adam.eps > 0, "AdamW needs a positive eps, got ", o.adam.eps);
    CLIP_CHECK(o.adam.weight_decay >= 0, "AdamW needs a non-negative weight decay, got ", o.adam.weight_decay);
    CLIP_CHECK(o.warmup_steps >= 0 && o.total_steps >= 0, "warmup and total steps cannot be negative");
    CLIP_CHECK(o.total_steps == 0 || o.total_steps > o.warmup_steps, "the cosine schedule needs more total steps (",
               o.total_steps, ") than warmup steps (", o.warmup_steps, ")");
    CLIP_CHECK(o.grad_clip_norm >= 0, "the gradient clipping norm cannot be negative, got ", o.grad_clip_norm);
    return o;
  }

  // The whole batch's loss (into the read-back slot) and this rank's feature gradients; logit_scale's
  // gradient (this rank's share) is added to its slot (gradients are zero between steps). Nothing
  // is checked here. With a communicator, as the CPU Trainer's checked_loss: every rank's features
  // are gathered (S moved as floats: a gather only copies), the rank's share is computed by rows,
  // the feature gradients are reduce-scattered to their owners and the loss shares summed.
  void loss(int64_t B) {
    auto& W = net_.weights();
    Params& p = net_.keys();
    if (!comm_) {
      contrastive_loss<E, S>(ctx_, *whole_scratch_, features_.data(), features_.data() + B * E, B,
                             W.master(p.logit_scale), d_features_.data(), d_features_.data() + B * E, /*loss=*/nullptr,
                             W.g(p.logit_scale), &slots()->loss);
      return;
    }
    static_assert((E * sizeof(S)) % sizeof(float) == 0, "a feature row must be a whole number of floats");
    const std::vector<int64_t> gather_counts =
        dist::slice_counts(B, comm_->size(), static_cast<int64_t>(E * sizeof(S) / sizeof(float)));
    comm_->all_gather(reinterpret_cast<float*>(features_.data()), gather_counts);
    comm_->all_gather(reinterpret_cast<float*>(features_.data() + B * E), gather_counts);
    const int64_t first = slice_.first, n = slice_.rows;
    float* share_img = d_share_.data();
    float* share_txt = d_share_.data() + B * E;
    contrastive_loss_rows<E, S>(ctx_, *rows_scratch_, features_.data(), features_.data() + B * E, B, first, n,
                                W.master(p.logit_scale), share_img, share_txt, /*loss=*/nullptr, W.g(p.logit_scale),
                                &slots()->loss);
    const std::vector<int64_t> counts = dist::slice_counts(B, comm_->size(), E);
    S* own_img = d_features_.data() + first * E;
    S* own_txt = d_features_.data() + (B + first) * E;
    if constexpr (std::is_same_v<S, float>) {
      comm_->reduce_scatter_sum(share_img, own_img, counts);
      comm_->reduce_scatter_sum(share_txt, own_txt, counts);
    } else {  // summed in fp32, rounded once to S
      comm_->reduce_scatter_sum(share_img, d_own_.data(), counts);
      comm_->reduce_scatter_sum(share_txt, d_own_.data() + n * E, counts);
      convert<S, float>(ctx_, own_img, d_own_.data(), n * E);
      convert<S, float>(ctx_, own_txt, d_own_.data() + n * E, n * E);
    }
    comm_->all_reduce_sum(&slots()->loss, 1);  // a NaN share (a bad feature row) makes it NaN everywhere
  }

  // The image tower's gradients (names "visual.") and the rest, as ranges of the flat buffer cut
  // as the CPU Trainer's buckets; buffers are not trained, so not summed.
  void plan_gradient_sums() {
    std::vector<dist::GradientBuckets::FlatTensor> image, text;
    for (const WeightEntry& e : net_.weights().layout().entries()) {
      if (e.role != Role::parameter) continue;
      const bool visual = e.name.starts_with("visual.");
      image.push_back({e.offset, e.numel, visual});
      text.push_back({e.offset, e.numel, !visual});
    }
    image_sums_ = dist::GradientBuckets::flat_ranges(std::move(image));
    text_sums_ = dist::GradientBuckets::flat_ranges(std::move(text));
    pending_.reserve(image_sums_.size() + text_sums_.size());
  }

  // The image tower's gradient sums, started once its backward is done. ZeRO-1: its contiguous
  // buckets' reduce-scatters (sharded_adamw.cuh's start_early); the rest after backward.
  void start_image_gradient_sums() {
    if (zero1_) return zero1_->start_early(net_.weights().grad_data());
    start_gradient_sums(image_sums_);
  }

  void start_gradient_sums(const std::vector<Range>& ranges) {
    if (!comm_ || zero1_) return;  // ZeRO-1 reduce-scatters the rest after backward (zero1_->reduce)
    float* g = net_.weights().grad_data();
    for (const Range& r : ranges) pending_.push_back(comm_->start_all_reduce_sum(g + r.first, r.n));
  }

  // The compute stream waits for every sum (the host does not).
  void finish_gradient_sums() {
    for (auto& p : pending_) p->wait();
    pending_.clear();
  }

  // The micro-batch [b, b + n)'s text positions: max(pool) + 1 over its rows when the host pool
  // is known, else the whole batch's.
  static int64_t micro_positions(const int32_t* host_pool, int64_t b, int64_t n, int64_t whole) {
    if (!host_pool) return whole;
    int64_t most = 1;
    for (int64_t i = b; i < b + n; ++i) most = std::max<int64_t>(most, int64_t{host_pool[i]} + 1);
    return std::min(most, whole);
  }

  // The step's one device -> host copy, and the wait for it.
  void read_back() {
    CLIP_CUDA_CHECK(cudaMemcpyAsync(host_, readback_.data(), sizeof(trainer_detail::StepReadback),
                                    cudaMemcpyDeviceToHost, ctx_.stream()));
    ctx_.synchronize();
  }

  // After read_back(): refuses a non-finite loss as the CPU Trainer does. Backward may already
  // have run on its NaN feature gradients: every gradient is zeroed first, so that the next step
  // starts from zero as it would on the CPU.
  void check_loss() {
    const double value = host_->loss;
    if (std::isfinite(value)) return;
    zero_gradients();
    CLIP_FAIL("training step ", steps_, ": the loss is ", value,
              " (a zero or non-finite feature norm gives NaN); the weights were not updated. Lower the learning "
              "rate or enable gradient clipping.");
  }

  void zero_gradients() {
    auto& W = net_.weights();
    CLIP_CUDA_CHECK(cudaMemsetAsync(W.grad_data(), 0, sizeof(float) * W.size(), ctx_.stream()));
    ctx_.synchronize();
  }

  // The CPU AdamW::step's scalars (adamw_scalars), then one kernel over the chunk table; the
  // compute copy is written only where it is a separate (bf16) buffer.
  void adamw(float lr, float grad_scale) {
    ++steps_;
    const AdamWOptions& o = options_.adam;
    const clip::AdamWScalars s = clip::adamw_scalars(lr, o.beta1, o.beta2, o.eps, o.weight_decay, steps_, grad_scale);
    auto& W = net_.weights();
    if (zero1_) {
      Params& p = net_.keys();
      const int64_t logit_scale = W.layout().offset(p.logit_scale);
      if constexpr (DeviceWeights<S>::separate_copy) {
        if (W.masters_sharded()) return zero1_->update_sharded_masters(W.compute_data(), s, logit_scale, W.master(p.logit_scale));
      }
      zero1_->update(W.master_data(), s, logit_scale);
      W.refresh_compute_copy(ctx_);  // the gathered weights into the bf16 copy (nothing for fp32)
      return;
    }
    adamw_step<S>(ctx_, table_, W.master_data(), W.grad_data(), m_.data(), v_.data(),
                  DeviceWeights<S>::separate_copy ? W.compute_data() : nullptr, s);
  }
};

}  // namespace clip::cuda

namespace clip {

template <Variant Cfg>
struct Trainer<Cfg, Device::cuda>::Impl {
  Params& host;
  cuda::Precision precision;
  cuda::Context ctx;
  std::unique_ptr<dist::Communicator> nccl;  // the step's collectives (null: one GPU, none)
  std::unique_ptr<cuda::TrainNet<Cfg, float>> net32;
  std::unique_ptr<cuda::TrainNet<Cfg, cuda::bf16>> net16;
  AdamW<Params> mirror;
  cuda::DeviceBuffer<float> images;
  cuda::DeviceBuffer<int32_t> ids, pool;
  std::vector<int32_t> host_pool;  // [B] pool positions of the current batch (its upload's source)

  Impl(Params& h, TrainOptions options, cuda::Precision p, int device, dist::Communicator* host_comm)
      : host(h), precision(p), ctx(device), nccl(make_nccl(host_comm, device, ctx.stream())), mirror(h, options.adam),
        images(options.batch * 3 * R * R), ids(options.batch * T), pool(options.batch),
        host_pool(static_cast<size_t>(std::max<int64_t>(options.batch, 0))) {
    if (p == cuda::Precision::fp32) net32 = std::make_unique<cuda::TrainNet<Cfg, float>>(ctx, h, options, nccl.get());
    else net16 = std::make_unique<cuda::TrainNet<Cfg, cuda::bf16>>(ctx, h, options, nccl.get());
  }

  static std::unique_ptr<dist::Communicator> make_nccl(dist::Communicator* host_comm, int device, cudaStream_t stream) {
    if (!host_comm) return nullptr;
#if CLIP_WITH_NCCL
    return std::make_unique<cuda::NcclCommunicator>(*host_comm, device, stream);
#else
    (void)device, (void)stream;
    CLIP_FAIL("this build has no NCCL (not found when it was configured): the GPU trains in one process only");
#endif
  }

  template <class F>
  decltype(auto) with(F&& f) {
    if (net32) return f(*net32);
    return f(*net16);
  }
};

template <Variant Cfg>
Trainer<Cfg, Device::cuda>::Trainer(Params& host, TrainOptions options, cuda::Precision precision, int device,
                                    dist::Communicator* comm)
    : impl_(std::make_unique<Impl>(host, options, precision, device, comm)) {}
template <Variant Cfg>
Trainer<Cfg, Device::cuda>::~Trainer() = default;
template <Variant Cfg>
Trainer<Cfg, Device::cuda>::Trainer(Trainer&&) noexcept = default;

template <Variant Cfg>
StepResult Trainer<Cfg, Device::cuda>::step(const float* images, const int32_t* tokens) {
  Impl& I = *impl_;
  const int64_t B = slice().rows;
  // TextBatch::from_host's work into the Impl's own vector (no allocation in a step). The previous
  // step's upload from it is done: every step waits for its read-back, which follows the upload.
  check_token_ids(tokens, B * T, Cfg::vocab_size);
  int64_t positions = 1;
  for (int64_t b = 0; b < B; ++b) {
    I.host_pool[b] = static_cast<int32_t>(pool_position(tokens + b * T, T));
    positions = std::max<int64_t>(positions, I.host_pool[b] + 1);
  }
  I.images.upload(images, B * 3 * R * R, I.ctx.stream());
  I.ids.upload(tokens, B * T, I.ctx.stream());
  I.pool.upload(I.host_pool.data(), B, I.ctx.stream());
  return I.with([&](auto& net) {
    return net.step(I.images.data(), I.ids.data(), I.pool.data(), positions, I.host_pool.data());
  });
}

template <Variant Cfg>
float Trainer<Cfg, Device::cuda>::learning_rate(int64_t step) const {
  return impl_->with([&](auto& net) { return net.learning_rate(step); });
}
template <Variant Cfg>
dist::Slice Trainer<Cfg, Device::cuda>::slice() const {
  return impl_->with([](auto& net) { return net.slice(); });
}
template <Variant Cfg>
int64_t Trainer<Cfg, Device::cuda>::steps() const {
  return impl_->with([](auto& net) { return net.steps(); });
}
template <Variant Cfg>
const TrainOptions& Trainer<Cfg, Device::cuda>::options() const {
  return impl_->with([](auto& net) -> const TrainOptions& { return net.options(); });
}
template <Variant Cfg>
typename Trainer<Cfg, Device::cuda>::Params& Trainer<Cfg, Device::cuda>::params() {
  return impl_->host;
}
template <Variant Cfg>
AdamW<typename Trainer<Cfg, Device::cuda>::Params>& Trainer<Cfg, Device::cuda>::optimizer() {
  return impl_->mirror;
}

template <Variant Cfg>
void Trainer<Cfg, Device::cuda>::download(Params& target) {
  Impl& I = *impl_;
  I.with([&](auto& net) { net.weights_to_host(target); });
}

template <Variant Cfg>
void Trainer<Cfg, Device::cuda>::download() {
  Impl& I = *impl_;
  I.with([&](auto& net) {
    auto& W = net.net().weights();
    net.weights_to_host(I.host);
    std::vector<float> m(static_cast<size_t>(W.size())), v(m.size());
    net.moments_to_host(m.data(), v.data());  // ZeRO-1: gathered, every rank calls
    W.layout().unpack(m.data(), I.mirror.m());
    W.layout().unpack(v.data(), I.mirror.v());
    I.mirror.set_steps(net.steps());
  });
}

template <Variant Cfg>
void Trainer<Cfg, Device::cuda>::upload() {
  Impl& I = *impl_;
  I.with([&](auto& net) {
    auto& W = net.net().weights();
    net.weights_from_host(I.host);
    std::vector<float> m(static_cast<size_t>(W.size())), v(m.size());
    W.layout().pack(std::as_const(I.mirror).m(), m.data());
    W.layout().pack(std::as_const(I.mirror).v(), v.data());
    net.moments_from_host(m.data(), v.data());  // ZeRO-1: this rank's slices
    net.set_steps(I.mirror.steps());
  });
}

template <Variant Cfg>
cuda::DeviceStateBytes Trainer<Cfg, Device::cuda>::state_bytes() const {
  return impl_->with([](auto& net) { return net.state_bytes(); });
}
template <Variant Cfg>
cuda::DeviceStateBytes Trainer<Cfg, Device::cuda>::unsharded_state_bytes() const {
  return impl_->with([](auto& net) { return net.unsharded_state_bytes(); });
}

}  // namespace clip
