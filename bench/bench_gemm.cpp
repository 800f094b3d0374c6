// GFLOP/s of clip's GEMM (ops/gemm.hpp) against Eigen's as the model ran it before (output
// columns split over the threads, one single-threaded Eigen GEMM each), on the model's shapes,
// at 1 and 2 threads. For each shape and thread count the implementations run back to back, so
// they see about the same machine load. Run with repetitions, interleaved, and read the medians:
//
//   clip-bench-gemm --benchmark_repetitions=9 --benchmark_enable_random_interleaving=true
//                   --benchmark_min_time=0.1 --benchmark_report_aggregates_only=true
//
// Names: <shape>/<impl>/threads:<t>, impl one of
//   new     gemm_nt (nn.Linear weight [N, K]) or gemm_nn (P [K, N]), packing B every call
//   packed  gemm_packed with B packed once outside the timed loop (constant weights)
//   eigen   the Eigen baseline (eigen_gemm below)
//   bf16    gemm_nt / gemm_nn inside a bf16 MatmulPrecisionScope: AMX tiles where the CPU has
//           them (clip::cpu_isa(); CLIP_CPU_ISA=fp32 forces the fallback), both operands
//           converted and packed per call
// All accumulate, y += x B, as the model's products do onto a bias or a residual.
// Convolutions are the row-major NN product y[Cout, pixels] = W[Cout, Cin*k*k] * im2col[Cin*k*k,
// pixels], the layout conv2d.hpp holds them in; here the whole layer is one product with im2col
// in memory, where conv2d.hpp runs it in cache-sized pixel blocks.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <Eigen/Core>

#include "clip/ops/gemm.hpp"

namespace {

enum class Form { nt, nn };

struct Shape {
  const char* name;
  Form form;
  int64_t m, n, k;
};

// ViT-B/32 at batch 8 (M = 8 * 50 tokens) and batch 1, text at batch 32 (M = 32 * 77), and the
// RN50 convolutions (M = Cout, N = pixels: batch 8 at 224 px, and batch 1 for the deep layers).
const Shape shapes[] = {
    {"vit_b8_qkv", Form::nt, 400, 2304, 768},
    {"vit_b8_out", Form::nt, 400, 768, 768},
    {"vit_b8_fc", Form::nt, 400, 3072, 768},
    {"vit_b8_proj", Form::nt, 400, 768, 3072},
    {"vit_b8_patch", Form::nt, 392, 768, 3072},
    {"vit_b1_qkv", Form::nt, 50, 2304, 768},
    {"vit_b1_proj", Form::nt, 50, 768, 3072},
    {"text_b32_qkv", Form::nt, 2464, 1536, 512},
    {"text_b32_out", Form::nt, 2464, 512, 512},
    {"text_b32_fc", Form::nt, 2464, 2048, 512},
    {"text_b32_proj", Form::nt, 2464, 512, 2048},
    {"conv_stem1_3x3_b1", Form::nn, 32, 12544, 27},
    {"conv_stem2_3x3_b1", Form::nn, 32, 12544, 288},
    {"conv_l1_1x1_b8", Form::nn, 64, 25088, 64},
    {"conv_l1_3x3_b8", Form::nn, 64, 25088, 576},
    {"conv_l1_expand_b8", Form::nn, 256, 25088, 64},
    {"conv_l2_3x3_b8", Form::nn, 128, 6272, 1152},
    {"conv_l3_3x3_b8", Form::nn, 256, 1568, 2304},
    {"conv_l4_3x3_b8", Form::nn, 512, 392, 4608},
    {"conv_l4_1x1_b8", Form::nn, 2048, 392, 512},
    {"conv_l4_3x3_b1", Form::nn, 512, 49, 4608},
};

std::vector<float> random_vector(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(gen);
  return v;
}

// The baseline: Eigen's GEMM as the model called it before ops/gemm.hpp (linear.hpp's former
// gemm_accumulate): y[m, n] += x[m, k] * B, output columns split over the threads in multiples
// of 16, one single-threaded Eigen GEMM per thread; products under 2^21 m*n*k, or narrower than
// 64 columns per thread, left to Eigen whole. B is W [n, k] (nt) or P [k, n].
void eigen_gemm(float* y, const float* x, const float* b, int64_t m, int64_t n, int64_t k, bool nt) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
  using ConstStrided = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;
  auto slice = [&](int64_t o0, int64_t o1) {  // columns [o0, o1)
    Strided ys(y + o0, m, o1 - o0, Eigen::OuterStride<>(n));
    ConstStrided xs(x, m, k, Eigen::OuterStride<>(k));
    if (nt)
      ys.noalias() += xs * ConstStrided(b + o0 * k, o1 - o0, k, Eigen::OuterStride<>(k)).transpose();
    else
      ys.noalias() += xs * ConstStrided(b + o0, k, o1 - o0, Eigen::OuterStride<>(n));
  };
  int parts = 1;
#ifdef _OPENMP
  if (m * n * k >= (int64_t{1} << 21) && !omp_in_parallel())
    parts = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n / 64));
#endif
  if (parts <= 1) {
    slice(0, n);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(parts)
  for (int part = 0; part < parts; ++part)
    slice(n * part / parts / 16 * 16, part == parts - 1 ? n : n * (part + 1) / parts / 16 * 16);
}

enum class Impl { fresh, packed, eigen, bf16 };

void run(benchmark::State& state, const Shape& s, Impl impl) {
  const int threads = static_cast<int>(state.range(0));
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  if (threads > 1) {
    state.SkipWithError("built without OpenMP");
    return;
  }
#endif
  const auto x = random_vector(s.m * s.k, 1);
  const auto b = random_vector(s.n * s.k, 2);  // W [n, k] or P [k, n]
  std::vector<float> y(static_cast<size_t>(s.m * s.n), 0.0f);
  const bool nt = s.form == Form::nt;
  clip::PackedMatrix packed;
  if (impl == Impl::packed)
    packed = nt ? clip::PackedMatrix::from_nt(b.data(), s.n, s.k, s.k) : clip::PackedMatrix::from_nn(b.data(), s.k, s.n, s.n);
  const clip::MatmulPrecisionScope precision(impl == Impl::bf16 ? clip::Precision::bf16 : clip::Precision::fp32);
  for (auto _ : state) {
    switch (impl) {
      case Impl::fresh:
      case Impl::bf16:
        if (nt)
          clip::gemm_nt(s.m, s.n, s.k, x.data(), s.k, b.data(), s.k, y.data(), s.n, true);
        else
          clip::gemm_nn(s.m, s.n, s.k, x.data(), s.k, b.data(), s.n, y.data(), s.n, true);
        break;
      case Impl::packed:
        clip::gemm_packed(s.m, x.data(), s.k, packed, y.data(), s.n, true);
        break;
      case Impl::eigen:
        eigen_gemm(y.data(), x.data(), b.data(), s.m, s.n, s.k, nt);
        break;
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2e-9 * double(s.m) * double(s.n) * double(s.k), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  const std::pair<Impl, const char*> impls[] = {{Impl::fresh, "new"}, {Impl::packed, "packed"}, {Impl::eigen, "eigen"},
                                                {Impl::bf16, "bf16"}};
  // Per shape and thread count, the implementations back to back (same machine load).
  for (const Shape& s : shapes)
    for (int threads : {1, 2})
      for (const auto& [impl, impl_name] : impls) {
        const std::string name = std::string(s.name) + "/" + impl_name;
        benchmark::RegisterBenchmark(name.c_str(), [&s, impl = impl](benchmark::State& st) { run(st, s, impl); })
            ->ArgName("threads")
            ->Arg(threads)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
