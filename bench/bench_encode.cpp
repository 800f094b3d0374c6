// CPU encoding throughput: images/s (or captions/s) and GFLOP/s of the matrix products, for
// ViT-B/32 and RN50 images at batch 1 and 8 and for 77-position captions at batch 32; the *_bf16
// cases run the same encoders with bf16 products (Precision::bf16).
// bench/pytorch_side_by_side.py runs these cases interleaved with the same models in PyTorch.
#include <benchmark/benchmark.h>

#include <memory>
#include <random>
#include <vector>

#include "clip/clip.hpp"

namespace {

// Weights do not change the speed, but they must be finite and not denormal: draw them.
template <class Params>
std::unique_ptr<Params> random_params() {
  auto params = std::make_unique<Params>();
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  clip::for_each_tensor(*params, [&](const std::string&, auto& t, clip::Role role) {
    if constexpr (clip::is_counter_v<decltype(t)>) {
      t.value = 0;
    } else if (role == clip::Role::buffer) {
      t.fill(1.0f);  // BatchNorm running statistics: a positive variance
    } else {
      for (float& v : t.values) v = normal(rng);
    }
  });
  return params;
}

template <class Cfg, clip::Precision P = clip::Precision::fp32>
void encode_images(benchmark::State& state) {
  using Net = clip::Clip<Cfg>;
  constexpr int R = Cfg::image_resolution;
  const int64_t batch = state.range(0);
  auto params = random_params<typename Net::Params>();
  std::vector<float> images(batch * 3 * R * R), features(batch * Cfg::embed_dim);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& v : images) v = normal(rng);
  for (auto _ : state) {
    Net::encode_image(*params, images.data(), features.data(), batch, P);
    benchmark::DoNotOptimize(features.data());
  }
  const double flops = clip::dims<Cfg>::vision::forward_flops();
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * flops * batch, benchmark::Counter::kIsIterationInvariantRate);
}

// Full-length captions: the end-of-text token sits at the last position, so all 77 positions run.
template <class Cfg, clip::Precision P = clip::Precision::fp32>
void encode_text(benchmark::State& state) {
  using Net = clip::Clip<Cfg>;
  constexpr int T = Cfg::context_length;
  const int64_t batch = state.range(0);
  auto params = random_params<typename Net::Params>();
  std::vector<int32_t> tokens(batch * T);
  std::mt19937 rng(2);
  std::uniform_int_distribution<int32_t> id(1, Cfg::vocab_size - 3);
  for (int64_t b = 0; b < batch; ++b) {
    tokens[b * T] = Cfg::vocab_size - 2;  // start of text
    for (int t = 1; t < T - 1; ++t) tokens[b * T + t] = id(rng);
    tokens[b * T + T - 1] = Cfg::vocab_size - 1;  // end of text
  }
  std::vector<float> features(batch * Cfg::embed_dim);
  for (auto _ : state) {
    Net::encode_text(*params, tokens.data(), features.data(), batch, P);
    benchmark::DoNotOptimize(features.data());
  }
  const double flops = clip::dims<Cfg>::text::forward_flops();
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * flops * batch, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

using clip::variants::RN50;
using clip::variants::ViT_B_32;

BENCHMARK(encode_images<ViT_B_32>)->Name("ViT-B-32_image")->Arg(1)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_images<RN50>)->Name("RN50_image")->Arg(1)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_text<ViT_B_32>)->Name("ViT-B-32_text")->Arg(32)->Unit(benchmark::kMillisecond)->UseRealTime();
// Products in bf16 (AMX tiles where the CPU has them: clip::cpu_isa()).
constexpr auto bf16 = clip::Precision::bf16;
BENCHMARK(encode_images<ViT_B_32, bf16>)->Name("ViT-B-32_image_bf16")->Arg(8)->Arg(32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_images<RN50, bf16>)->Name("RN50_image_bf16")->Arg(32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(encode_text<ViT_B_32, bf16>)->Name("ViT-B-32_text_bf16")->Arg(32)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
