// The CUDA back end's models at batch 256, bf16 storage with fp32 accumulation (fp32 master
// weights when training): inference images/s and captions/s, training samples/s (one whole step:
// both towers forward and backward, the contrastive loss, the global-norm reduction, AdamW), each
// with its achieved TFLOP/s against the card's measured bf16 matrix-product peak (the
// `bf16_gemm_peak` case, one large cuBLASLt product, measured first in the same process).
//
// FLOPs are clip::dims<Cfg>::{vision,text}::forward_flops() (matrix products, 2 per multiply-add);
// a training step counts 3x the forward of both towers. Captions put end-of-text at the last
// position, so all 77 positions run, as in bench/pytorch_gpu.py. bench/gpu_check.sh runs this
// beside bench/pytorch_gpu.py; bench/gpu_check_table.py prints both as one table.
//
// Built with -Dgpu_check=true for the variants -Dvariants names (CLIP_BENCH_<VARIANT>=1 each):
// every one instantiates its whole CUDA model, which costs compile time. Without a GPU every case
// reports "no CUDA device: ..." as its error.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "clip/clip.hpp"
#include "clip/train/init.hpp"
#include "clip/train/trainer.hpp"
#include "kernels/clip_cuda.cuh"
#include "cuda_roofline.cuh"

#if !defined(CLIP_BENCH_VIT_B_32) && !defined(CLIP_BENCH_VIT_B_16) && !defined(CLIP_BENCH_VIT_L_14) && \
    !defined(CLIP_BENCH_RN50)
#define CLIP_BENCH_VIT_B_32 1  // built by hand without -D: the smallest model
#endif

namespace {

using namespace clip_bench;  // why_no_gpu, context, bf16, Context, DeviceBuffer, ... (cuda_roofline.cuh)

template <class T>
DeviceBuffer<T> upload(const std::vector<T>& host) {
  DeviceBuffer<T> d(static_cast<int64_t>(host.size()));
  d.upload(host.data(), d.size(), context().stream());
  return d;
}

std::vector<float> random_images(int64_t n) {
  std::vector<float> images(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& v : images) v = normal(rng);
  return images;
}

template <class Cfg>
std::vector<int32_t> full_captions(int64_t batch) {
  constexpr int T = Cfg::context_length;
  std::vector<int32_t> tokens(batch * T);
  std::mt19937 rng(2);
  std::uniform_int_distribution<int32_t> id(1, Cfg::vocab_size - 3);
  for (int64_t b = 0; b < batch; ++b) {
    tokens[b * T] = Cfg::vocab_size - 2;  // start of text
    for (int t = 1; t < T - 1; ++t) tokens[b * T + t] = id(rng);
    tokens[b * T + T - 1] = Cfg::vocab_size - 1;  // end of text
  }
  return tokens;
}

// The bf16 peak (PeakGemm), TFLOP/s: the best of 5 runs of 10 products (of the
// benchmark's iterations when `state` is given).
double run_peak(benchmark::State* state, int64_t n) {
  PeakGemm once(n);
  for (int i = 0; i < 3; ++i) once();  // plan, warm clocks
  context().synchronize();
  EventTimer timer;
  double best = 0;
  if (state) {
    for (auto _ : *state) {
      const double s = timer.seconds_per_call(once, 10);
      state->SetIterationTime(s);
      best = std::max(best, once.tflops(s));
    }
  } else {
    for (int r = 0; r < 5; ++r) best = std::max(best, once.tflops(timer.seconds_per_call(once, 10)));
  }
  return best;
}

// The peak every other case divides by: measured once per process (by the peak case if it ran).
double& peak_tflops() {
  static double peak = 0;
  return peak;
}
double measured_peak() {
  if (peak_tflops() == 0) peak_tflops() = run_peak(nullptr, 8192);
  return peak_tflops();
}

void bf16_gemm_peak(benchmark::State& state) {
  if (const std::string why = why_no_gpu(); !why.empty()) return state.SkipWithError(why.c_str());
  const int64_t n = state.range(0);
  const double best = run_peak(&state, n);
  if (n == 8192) peak_tflops() = best;
  state.counters["TFLOP/s"] = benchmark::Counter(2e-12 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["best_TFLOP/s"] = best;
}

void report(benchmark::State& state, double flops_per_item, int64_t batch) {
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["TFLOP/s"] = benchmark::Counter(1e-12 * flops_per_item * batch,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  // A fraction of the peak: the rate divided by the peak (kIsIterationInvariantRate, scaled).
  state.counters["peak_fraction"] = benchmark::Counter(1e-12 * flops_per_item * batch / measured_peak(),
                                                       benchmark::Counter::kIsIterationInvariantRate);
}

// One initialised host copy per variant, shared by its cases (ViT-L/14's 428 M parameters take
// seconds to draw). The nets upload from it and never write it back.
template <class Cfg>
typename clip::Clip<Cfg>::Params* random_params() {
  static const std::unique_ptr<typename clip::Clip<Cfg>::Params> params = [] {
    auto p = std::make_unique<typename clip::Clip<Cfg>::Params>();
    clip::init_params<Cfg>(*p, /*seed=*/0);
    return p;
  }();
  return params.get();
}

template <class Cfg>
void encode_images(benchmark::State& state) {
  if (const std::string why = why_no_gpu(); !why.empty()) return state.SkipWithError(why.c_str());
  constexpr int R = Cfg::image_resolution;
  const int64_t batch = state.range(0);
  measured_peak();
  Context& ctx = context();
  auto params = random_params<Cfg>();
  clip::cuda::ClipNet<Cfg, bf16> net(ctx, *params, batch);
  auto images = upload(random_images(batch * 3 * R * R));
  DeviceBuffer<bf16> features(batch * Cfg::embed_dim);
  net.encode_image(images.data(), features.data(), batch);  // plans the products
  ctx.synchronize();
  for (auto _ : state) {
    net.encode_image(images.data(), features.data(), batch);
    ctx.synchronize();
  }
  report(state, clip::dims<Cfg>::vision::forward_flops(), batch);
}

template <class Cfg>
void encode_text(benchmark::State& state) {
  if (const std::string why = why_no_gpu(); !why.empty()) return state.SkipWithError(why.c_str());
  constexpr int T = Cfg::context_length;
  const int64_t batch = state.range(0);
  measured_peak();
  Context& ctx = context();
  auto params = random_params<Cfg>();
  clip::cuda::ClipNet<Cfg, bf16> net(ctx, *params, batch);
  const std::vector<int32_t> host_tokens = full_captions<Cfg>(batch);
  const auto tb = clip::cuda::TextBatch::from_host(host_tokens.data(), batch, T, Cfg::vocab_size);
  auto tokens = upload(host_tokens);
  auto pool = upload(tb.pool);
  DeviceBuffer<bf16> features(batch * Cfg::embed_dim);
  net.encode_text(tokens.data(), pool.data(), tb.positions, features.data(), batch);
  ctx.synchronize();
  for (auto _ : state) {
    net.encode_text(tokens.data(), pool.data(), tb.positions, features.data(), batch);
    ctx.synchronize();
  }
  report(state, clip::dims<Cfg>::text::forward_flops(), batch);
}

template <class Cfg>
void train_step(benchmark::State& state) {
  if (const std::string why = why_no_gpu(); !why.empty()) return state.SkipWithError(why.c_str());
  constexpr int R = Cfg::image_resolution, T = Cfg::context_length;
  const int64_t batch = state.range(0);
  measured_peak();
  Context& ctx = context();
  auto params = random_params<Cfg>();
  clip::TrainOptions options;
  options.batch = batch;
  options.adam.lr = 1e-5f;  // small: the weights stay in their initial range while timing
  clip::cuda::TrainNet<Cfg, bf16> trainer(ctx, *params, options);
  const std::vector<int32_t> host_tokens = full_captions<Cfg>(batch);
  const auto tb = clip::cuda::TextBatch::from_host(host_tokens.data(), batch, T, Cfg::vocab_size);
  auto images = upload(random_images(batch * 3 * R * R));
  auto tokens = upload(host_tokens);
  auto pool = upload(tb.pool);
  benchmark::DoNotOptimize(trainer.step(images.data(), tokens.data(), pool.data(), tb.positions));  // plans
  ctx.synchronize();
  double loss = 0;
  for (auto _ : state) {
    loss = trainer.step(images.data(), tokens.data(), pool.data(), tb.positions).loss;  // synchronises
    ctx.synchronize();
  }
  state.counters["loss"] = loss;
  report(state, 3.0 * (clip::dims<Cfg>::vision::forward_flops() + clip::dims<Cfg>::text::forward_flops()), batch);
}

}  // namespace

constexpr int64_t kBatch = 256;

BENCHMARK(bf16_gemm_peak)->Arg(8192)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

#if CLIP_BENCH_VIT_B_32
BENCHMARK(encode_images<clip::variants::ViT_B_32>)->Name("ViT-B-32_image")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_text<clip::variants::ViT_B_32>)->Name("ViT-B-32_text")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(train_step<clip::variants::ViT_B_32>)->Name("ViT-B-32_train")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
#if CLIP_BENCH_VIT_B_16
BENCHMARK(encode_images<clip::variants::ViT_B_16>)->Name("ViT-B-16_image")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
#if CLIP_BENCH_VIT_L_14
BENCHMARK(encode_images<clip::variants::ViT_L_14>)->Name("ViT-L-14_image")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_text<clip::variants::ViT_L_14>)->Name("ViT-L-14_text")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
// RN50 needs the ResNet tower (kernels/models/modified_resnet.cuh, helper 7).
#if CLIP_BENCH_RN50 && __has_include("kernels/models/modified_resnet.cuh")
BENCHMARK(encode_images<clip::variants::RN50>)->Name("RN50_image")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(train_step<clip::variants::RN50>)->Name("RN50_train")->Arg(kBatch)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

BENCHMARK_MAIN();
