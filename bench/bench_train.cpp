// CPU training throughput: image-text pairs per second and GFLOP/s of one whole training step
// (forward and backward of both towers, the contrastive loss, AdamW) for ViT-B/32 and RN50.
// Captions put end-of-text at the last position, so all 77 positions run, as in PyTorch.
// bench/pytorch_side_by_side.py runs these cases interleaved with the same step in PyTorch.
#include <benchmark/benchmark.h>

#include <memory>
#include <random>
#include <vector>

#include "clip/clip.hpp"
#include "clip/train/init.hpp"
#include "clip/train/trainer.hpp"

namespace {

template <class Cfg, clip::Precision P = clip::Precision::fp32>
void train_step(benchmark::State& state) {
  constexpr int R = Cfg::image_resolution, T = Cfg::context_length;
  const int64_t batch = state.range(0);
  auto params = std::make_unique<typename clip::Clip<Cfg>::Params>();
  clip::init_params<Cfg>(*params, /*seed=*/0);
  clip::TrainOptions options;
  options.batch = batch;
  options.adam.lr = 1e-5f;  // small: the weights stay in their initial range while timing
  clip::Trainer<Cfg> trainer(*params, options, P);

  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> images(batch * 3 * R * R);
  for (float& v : images) v = normal(rng);
  std::uniform_int_distribution<int32_t> id(1, Cfg::vocab_size - 3);
  std::vector<int32_t> tokens(batch * T);
  for (int64_t b = 0; b < batch; ++b) {
    tokens[b * T] = Cfg::vocab_size - 2;  // start of text
    for (int t = 1; t < T - 1; ++t) tokens[b * T + t] = id(rng);
    tokens[b * T + T - 1] = Cfg::vocab_size - 1;  // end of text
  }

  for (auto _ : state) benchmark::DoNotOptimize(trainer.step(images.data(), tokens.data()));
  // A training step costs the forward pass three times (forward, and backward's two products).
  const double flops = 3.0 * (clip::dims<Cfg>::vision::forward_flops() + clip::dims<Cfg>::text::forward_flops());
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * flops * batch, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

using clip::variants::RN50;
using clip::variants::ViT_B_32;

BENCHMARK(train_step<ViT_B_32>)->Name("ViT-B-32_train")->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(train_step<RN50>)->Name("RN50_train")->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();
// Mixed precision (bf16 products, fp32 master weights and AdamW), as open_clip's amp_bf16.
BENCHMARK(train_step<ViT_B_32, clip::Precision::bf16>)->Name("ViT-B-32_train_bf16")->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
