// The NCCL communicator (kernels/dist/nccl_communicator.cuh) at world size 1, one process: its
// collectives on device buffers, ordered against the compute stream, and the GPU Trainer's step
// through it (features gathered, the loss by rows with its feature-gradient reduce-scatter and
// loss sum, gradients summed in buckets over NCCL) against the step without any communicator
// (the single-matrix loss): losses, gradient norms, first moments (0.1 x the gradients after one
// step) and weights equal to rounding, fp32 and bf16, whole batch and micro-batches. Several GPUs
// cannot be tested here (one process, one device); the code above the communicator is the same
// for any world size, and the rows loss for other slices (first > 0, n < B) is checked against the
// CPU's contrastive_loss_rows in test_cuda_train_ops.cu. RN-tiny with sync_batchnorm (--sync-bn)
// through NCCL runs the synchronised BatchNorm (its statistics summed over NCCL) against the plain
// step, which it must equal at world size 1. ZeRO-1 (TrainOptions::zero1: the gradients
// reduce-scattered into the shard, the norm from the shards, AdamW on the shard, the weights
// all-gathered) at world size 1 against the plain step, with a checkpoint round trip after step 1
// (download() gathers the moments, a new trainer's upload() scatters them) and the gathered state
// (m, v, step count) against the plain trainer's; at world size 1 ZeRO-1's image-tower buckets
// start their reduce-scatters after the image backward (start_reduce_scatter_sum), as on several. In bf16 ZeRO-1 also shards the fp32 master
// weights (each rank its owned floats; BatchNorm buffers and logit_scale fp32 on every rank): the
// checkpoint round trip then gathers and scatters the masters too, the downloaded weights must be
// the fp32 masters (not their bf16 copy), and the device memory the trainer reports must be the
// sharded arithmetic (zero1_plan.hpp) of this layout. The bf16 gather across several ranks (the
// other ranks' slices copied back) is emulated on the host in test_cuda_host_zero1.cpp.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/gpu.hpp"
#include "clip/clip.hpp"
#include "clip/core/bf16.hpp"
#include "clip/cuda/replicated_masters.hpp"
#include "clip/cuda/weight_layout.hpp"
#include "clip/cuda/zero1_plan.hpp"
#include "clip/dist/communicator.hpp"
#include "clip/train/init.hpp"
#include "flat_params.hpp"
#include "golden_variants.hpp"
#include "kernels/clip_cuda.cuh"
#include "kernels/dist/nccl_communicator.cuh"
#include "numeric.hpp"

namespace {

using clip::test::RNTiny;
using clip::test::ViTTiny;

std::vector<float> ramp(int64_t n, float start) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = start + 0.25f * static_cast<float>(i % 97) - 3.0f * static_cast<float>(i % 5);
  return v;
}

struct World1 {
  clip::dist::LocalCommunicator host;
  clip::cuda::Context ctx{0};
  clip::cuda::NcclCommunicator nccl{host, 0, ctx.stream(), 60.0};
};

// Host -> device on the compute stream; the collectives must wait for these copies (ordering).
template <class T>
clip::cuda::DeviceBuffer<T> on_device(World1& w, const std::vector<T>& host) {
  clip::cuda::DeviceBuffer<T> d(static_cast<int64_t>(host.size()));
  d.upload(host.data(), static_cast<int64_t>(host.size()), w.ctx.stream());
  return d;
}

template <class T>
std::vector<T> on_host(World1& w, const clip::cuda::DeviceBuffer<T>& d) {
  std::vector<T> out(static_cast<size_t>(d.size()));
  d.download(out.data(), d.size(), w.ctx.stream());
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(nccl_collectives_at_world_size_one) {
  World1 w;
  BOOST_TEST(w.nccl.rank() == 0);
  BOOST_TEST(w.nccl.size() == 1);
  BOOST_TEST(w.nccl.describe() == "NCCL, 1 process");
  const int64_t n = (int64_t{1} << 20) + 37;  // not a multiple of anything NCCL chunks by

  // All-reduce (float, double, started and waited): the sum over one rank is the data itself.
  const std::vector<float> values = ramp(n, 1.5f);
  auto data = on_device(w, values);
  w.nccl.all_reduce_sum(data.data(), n);
  BOOST_TEST(on_host(w, data) == values);
  const std::vector<double> doubles = {1e300, -2.5, 0.1, 3.0};
  auto d_doubles = on_device(w, doubles);
  w.nccl.all_reduce_sum(d_doubles.data(), 4);
  BOOST_TEST(on_host(w, d_doubles) == doubles);
  auto started = on_device(w, values);
  auto pending = w.nccl.start_all_reduce_sum(started.data(), n);
  pending->wait();
  BOOST_TEST(on_host(w, started) == values);

  // All-gather in place, reduce-scatter out of place (a real copy at W = 1), broadcast of bytes.
  auto gathered = on_device(w, values);
  w.nccl.all_gather(gathered.data(), clip::dist::slice_counts(n, 1));
  BOOST_TEST(on_host(w, gathered) == values);
  auto send = on_device(w, values);
  clip::cuda::DeviceBuffer<float> recv(n);
  recv.zero(w.ctx.stream());
  w.nccl.reduce_scatter_sum(send.data(), recv.data(), clip::dist::slice_counts(n, 1));
  BOOST_TEST(on_host(w, recv) == values);
  // Started (ZeRO-1's early buckets): the compute stream's work before it is what it reads, and
  // what the compute stream does after wait() sees its result.
  clip::cuda::DeviceBuffer<float> early(n);
  early.zero(w.ctx.stream());
  auto scattering = w.nccl.start_reduce_scatter_sum(send.data(), early.data(), clip::dist::slice_counts(n, 1));
  scattering->wait();
  BOOST_TEST(on_host(w, early) == values);
  BOOST_CHECK_THROW(w.nccl.start_reduce_scatter_sum(send.data(), early.data(), {n, 0}), clip::Error);
  const std::vector<float> small = ramp(7, -1.0f);
  auto bytes = on_device(w, small);
  w.nccl.broadcast(bytes.data(), 7 * sizeof(float), 0);
  BOOST_TEST(on_host(w, bytes) == small);
  w.nccl.barrier();

  // Wrong count tables and roots are refused with a message, not sent to NCCL.
  BOOST_CHECK_THROW(w.nccl.all_gather(gathered.data(), {n, n}), clip::Error);
  BOOST_CHECK_THROW(w.nccl.reduce_scatter_sum(send.data(), recv.data(), {-1}), clip::Error);
  BOOST_CHECK_THROW(w.nccl.broadcast(bytes.data(), 4, 1), clip::Error);
}

BOOST_AUTO_TEST_CASE(nccl_timeout_comes_from_the_environment) {
  ::setenv("CLIP_NCCL_TIMEOUT", "12.5", 1);
  BOOST_TEST(clip::cuda::NcclCommunicator::timeout_from_env() == 12.5);
  ::setenv("CLIP_NCCL_TIMEOUT", "soon", 1);
  BOOST_CHECK_THROW(clip::cuda::NcclCommunicator::timeout_from_env(), clip::Error);
  ::setenv("CLIP_NCCL_TIMEOUT", "-3", 1);
  BOOST_CHECK_THROW(clip::cuda::NcclCommunicator::timeout_from_env(), clip::Error);
  ::unsetenv("CLIP_NCCL_TIMEOUT");
  BOOST_TEST(clip::cuda::NcclCommunicator::timeout_from_env() == clip::cuda::NcclCommunicator::kDefaultTimeoutSeconds);
}

namespace {

using Values = clip::test::TensorValues;

struct Run {
  std::vector<double> losses;
  std::vector<float> norms;
  Values first_moments;  // after step 1: 0.1 x the (unclipped) gradients
  Values weights;        // after the last step
  Values m, v;           // the optimizer state after the last step (download())
  int64_t optimizer_steps = 0;
  clip::cuda::DeviceStateBytes state;  // what the (last) trainer reports holding
};

// `steps` steps of batch 8 from init_params(7), with or without the NCCL communicator.
template <class Cfg = ViTTiny>
Run train(bool through_nccl, clip::cuda::Precision precision, int64_t micro, int steps, bool sync_bn = false,
          bool zero1 = false) {
  using Params = typename clip::Clip<Cfg>::Params;
  using Trainer = clip::Trainer<Cfg, clip::Device::cuda>;
  auto params = std::make_unique<Params>();
  clip::init_params<Cfg>(*params, 7);
  clip::TrainOptions o;
  o.batch = 8;
  o.micro_batch = micro;
  o.adam.lr = 1e-3f;
  o.sync_batchnorm = sync_bn;
  o.zero1 = zero1;
  clip::dist::LocalCommunicator host;
  auto trainer = std::make_unique<Trainer>(*params, o, precision, 0, through_nccl ? &host : nullptr);
  BOOST_TEST(trainer->slice().first == 0);
  BOOST_TEST(trainer->slice().rows == 8);
  Run out;
  std::vector<float> images;
  std::vector<int32_t> tokens;
  for (int s = 0; s < steps; ++s) {
    clip::test::random_batch<Cfg>(images, tokens, o.batch, 300 + s);
    const clip::StepResult r = trainer->step(images.data(), tokens.data());
    out.losses.push_back(r.loss);
    out.norms.push_back(r.grad_norm);
    if (s == 0) {
      trainer->download();
      out.first_moments = clip::test::tensor_values(trainer->optimizer().m());
      if (zero1) {  // a checkpoint round trip: the gathered state scattered into a new trainer
        auto m = std::make_unique<Params>(trainer->optimizer().m());
        auto v = std::make_unique<Params>(trainer->optimizer().v());
        const int64_t done = trainer->optimizer().steps();
        trainer.reset();
        trainer = std::make_unique<Trainer>(*params, o, precision, 0, &host);
        trainer->optimizer().m() = *m;
        trainer->optimizer().v() = *v;
        trainer->optimizer().set_steps(done);
        trainer->upload();
      }
    }
  }
  trainer->download();
  out.state = trainer->state_bytes();
  out.weights = clip::test::tensor_values(*params);
  out.m = clip::test::tensor_values(trainer->optimizer().m());
  out.v = clip::test::tensor_values(trainer->optimizer().v());
  out.optimizer_steps = trainer->optimizer().steps();
  return out;
}

// Each tensor's largest difference relative to its largest magnitude.
double worst_relative(const Values& a, const Values& b) {
  double worst = 0;
  for (const auto& [name, x] : a) {
    const std::vector<float>& y = b.at(name);
    double err = 0, scale = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      err = std::max(err, std::abs(double(x[i]) - y[i]));
      scale = std::max(scale, std::abs(double(x[i])));
    }
    if (scale > 0) worst = std::max(worst, err / scale);
  }
  return worst;
}

template <class Cfg = ViTTiny>
void expect_same(clip::cuda::Precision precision, int64_t micro, const std::string& what, bool sync_bn = false) {
  const Run plain = train<Cfg>(false, precision, micro, 3, sync_bn);
  const Run nccl = train<Cfg>(true, precision, micro, 3, sync_bn);
  double loss = 0, norm = 0;
  for (size_t s = 0; s < plain.losses.size(); ++s) {
    loss = std::max(loss, std::abs(plain.losses[s] - nccl.losses[s]) / plain.losses[s]);
    norm = std::max(norm, std::abs(double(plain.norms[s]) - nccl.norms[s]) / plain.norms[s]);
  }
  const double gradients = worst_relative(plain.first_moments, nccl.first_moments);
  const double weights = worst_relative(plain.weights, nccl.weights);
  BOOST_TEST_MESSAGE(what << ": loss " << loss << ", gradient norm " << norm << ", gradients (first moments) "
                          << gradients << ", weights " << weights << " (relative, over 3 steps)");
  // One process through NCCL adds no sum (over one rank) but takes the loss by rows (n = B: the
  // same formulas as the single-matrix loss, other summation orders), and cuBLASLt may pick its
  // algorithms per call: rounding rather than bit equality. In bf16 the feature gradients are
  // rounded to bf16 after those different fp32 orders, so one of them may land one bf16 step
  // (2^-8 relative) apart and carry that into the gradients and, through AdamW, the weights; a
  // lost row, a double count or a missing conversion is off by far more.
  const bool fp32 = precision == clip::cuda::Precision::fp32;
  BOOST_TEST(loss <= (fp32 ? 1e-6 : 1e-5), what << ": loss");
  BOOST_TEST(norm <= (fp32 ? 1e-5 : 1e-3), what << ": gradient norm");
  BOOST_TEST(gradients <= (fp32 ? 1e-5 : 1e-2), what << ": gradients");
  BOOST_TEST(weights <= (fp32 ? 1e-5 : 1e-3), what << ": weights");
}

// ZeRO-1 through NCCL at world size 1 against the plain step (the rows loss and the bf16
// tolerances as above; in bf16 the sharded masters' bf16 image is gathered). With
// `reference_through_nccl` the reference is the step through NCCL without ZeRO-1: the same rows
// loss, so only the optimizer's path differs (RN-tiny in bf16, whose BatchNorm backward has not
// been compared with the single-matrix loss's rounding in bf16).
template <class Cfg = ViTTiny>
void expect_same_zero1(int64_t micro, const std::string& what,
                       clip::cuda::Precision precision = clip::cuda::Precision::fp32,
                       bool reference_through_nccl = false) {
  const Run plain = train<Cfg>(reference_through_nccl, precision, micro, 3);
  const Run zero1 = train<Cfg>(true, precision, micro, 3, false, true);
  double loss = 0, norm = 0;
  for (size_t s = 0; s < plain.losses.size(); ++s) {
    loss = std::max(loss, std::abs(plain.losses[s] - zero1.losses[s]) / plain.losses[s]);
    norm = std::max(norm, std::abs(double(plain.norms[s]) - zero1.norms[s]) / plain.norms[s]);
  }
  const double gradients = worst_relative(plain.first_moments, zero1.first_moments);
  const double weights = worst_relative(plain.weights, zero1.weights);
  const double m = worst_relative(plain.m, zero1.m), v = worst_relative(plain.v, zero1.v);
  BOOST_TEST_MESSAGE(what << ": loss " << loss << ", gradient norm " << norm << ", gradients " << gradients
                          << ", weights " << weights << ", m " << m << ", v " << v << " (relative, over 3 steps)");
  const bool fp32 = precision == clip::cuda::Precision::fp32;
  BOOST_TEST(loss <= (fp32 ? 1e-6 : 1e-5), what << ": loss");
  BOOST_TEST(norm <= (fp32 ? 1e-5 : 1e-3), what << ": gradient norm");
  BOOST_TEST(gradients <= (fp32 ? 1e-5 : 1e-2), what << ": gradients (the gathered first moments after step 1)");
  BOOST_TEST(weights <= (fp32 ? 1e-5 : 1e-3), what << ": weights");
  BOOST_TEST(m <= (fp32 ? 1e-5 : 1e-2), what << ": first moments after the checkpoint round trip and 2 more steps");
  BOOST_TEST(v <= (fp32 ? 2e-5 : 2e-2), what << ": second moments after the checkpoint round trip and 2 more steps");
  BOOST_TEST(zero1.optimizer_steps == plain.optimizer_steps, what << ": optimizer step count");

  // The memory the trainer reports: at world size 1 the shard is every trained element.
  auto keys = std::make_unique<typename clip::Clip<Cfg>::Params>();
  const clip::cuda::WeightLayout layout(*keys);
  const int64_t trained = layout.parameter_elements();
  const int64_t kept = clip::cuda::replicated_masters(layout, {"logit_scale"}).size;
  const clip::cuda::DeviceStateBytes want = clip::cuda::device_state_bytes(
      layout.size(), !fp32, trained, std::min(clip::dist::kShardBucketFloats, trained), fp32 ? -1 : kept);
  BOOST_TEST(zero1.state.master == want.master, what << ": fp32 masters held whole");
  BOOST_TEST(zero1.state.master_shard == want.master_shard, what << ": fp32 master shard");
  BOOST_TEST(zero1.state.total() == want.total(), what << ": device state bytes");
  BOOST_TEST(plain.state.master == 4 * layout.size(), what << ": the plain trainer's whole masters");
  if (fp32) return;
  // The downloaded weights are the fp32 masters: after 3 AdamW steps almost none is a bf16 value
  // (their bf16 copy would be all of them).
  int64_t exact = 0, all = 0;
  for (const auto& [name, x] : zero1.weights)
    for (float w : x) exact += w == clip::round_to_bf16(w), ++all;
  BOOST_TEST(exact < all / 4, what << ": " << exact << " of " << all << " downloaded weights are bf16 values");
}

}  // namespace

BOOST_AUTO_TEST_CASE(trainer_step_with_zero1_through_nccl_equals_the_plain_step_fp32) {
  expect_same_zero1(8, "ZeRO-1 fp32, whole batch");
  expect_same_zero1(3, "ZeRO-1 fp32, micro-batches 3 + 3 + 2");
  expect_same_zero1<RNTiny>(8, "ZeRO-1 RN-tiny fp32 (BatchNorm buffers between the trained tensors)");
}

BOOST_AUTO_TEST_CASE(trainer_step_with_zero1_through_nccl_equals_the_plain_step_bf16) {
  // Sharded fp32 masters, the bf16 copy gathered.
  expect_same_zero1(8, "ZeRO-1 bf16, whole batch", clip::cuda::Precision::bf16);
  expect_same_zero1(3, "ZeRO-1 bf16, micro-batches 3 + 3 + 2", clip::cuda::Precision::bf16);
  expect_same_zero1<RNTiny>(8, "ZeRO-1 RN-tiny bf16 (BatchNorm buffers fp32 on every rank)",
                            clip::cuda::Precision::bf16, /*reference_through_nccl=*/true);
}

BOOST_AUTO_TEST_CASE(trainer_step_through_nccl_equals_the_plain_step_fp32) {
  expect_same(clip::cuda::Precision::fp32, 8, "fp32, whole batch");
  expect_same(clip::cuda::Precision::fp32, 3, "fp32, micro-batches 3 + 3 + 2");
}

BOOST_AUTO_TEST_CASE(trainer_step_through_nccl_equals_the_plain_step_bf16) {
  expect_same(clip::cuda::Precision::bf16, 8, "bf16, whole batch (features gathered as bf16)");
}

BOOST_AUTO_TEST_CASE(resnet_step_with_sync_bn_through_nccl_equals_the_plain_step) {
  expect_same<RNTiny>(clip::cuda::Precision::fp32, 8, "RN-tiny fp32, --sync-bn, whole batch", true);
  expect_same<RNTiny>(clip::cuda::Precision::fp32, 4, "RN-tiny fp32, --sync-bn, micro-batches 4 + 4", true);
}
