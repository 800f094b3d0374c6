// The CUDA kernels one family at a time, bf16, at the models' shapes, each against its roofline:
// compute-bound kernels report TFLOP/s and `peak_fraction` of the card's bf16 matrix-product peak
// (measured here: one large cuBLASLt product), memory-bound ones GB/s and `bw_fraction` of the
// measured device-to-device copy bandwidth (cudaMemcpyAsync, bytes read + written).
//
// One pair of cases measures what static shapes are worth: the same LayerNorm kernel (below, one
// body) with C a template constant and with C an argument read at run time, on the same rows.
//
// Families whose header does not exist yet are left out at compile time (__has_include), so this
// program builds as the back end grows. Without a GPU every case reports "no CUDA device: ...".
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/gemm.cuh"
#include "kernels/storage.cuh"
#include "cuda_roofline.cuh"
#if __has_include("kernels/attention.cuh")
#include "kernels/attention.cuh"
#define HAVE_ATTENTION 1
#endif
#if __has_include("kernels/layernorm.cuh")
#include "kernels/layernorm.cuh"
#define HAVE_LAYERNORM 1
#endif
#if __has_include("kernels/activation.cuh")
#include "kernels/activation.cuh"
#define HAVE_ACTIVATION 1
#endif
#if __has_include("kernels/conv2d.cuh") && __has_include("kernels/batchnorm.cuh")
#include "clip/ops/batchnorm.hpp"
#include "kernels/batchnorm.cuh"
#include "kernels/conv2d.cuh"
#define HAVE_RESNET_OPS 1
#endif
#if __has_include("kernels/adamw.cuh")
#include "kernels/adamw.cuh"
#define HAVE_ADAMW 1
#endif

namespace {

using namespace clip_bench;  // why_no_gpu, context, bf16, Context, DeviceBuffer, ... (cuda_roofline.cuh)

// Times `launch` on the context's stream with CUDA events: seconds per call (after 2 warm calls).
template <class F>
void time_gpu(benchmark::State& state, F&& launch, int reps = 10) {
  launch();
  launch();
  context().synchronize();
  EventTimer timer;
  for (auto _ : state) state.SetIterationTime(timer.seconds_per_call(launch, reps));
}

// ---- the two roofs, measured once per process --------------------------------------------------

// Seconds per call: the best of 3 runs of `reps` calls, after one warm call.
double seconds_of(const std::function<void()>& launch, int reps) {
  launch();
  context().synchronize();
  EventTimer timer;
  double best = 1e30;
  for (int r = 0; r < 3; ++r) best = std::min(best, timer.seconds_per_call(launch, reps));
  return best;
}

double peak_tflops() {  // bf16 Y = X W^T, 8192^3
  static const double peak = [] {
    PeakGemm gemm(8192);
    return gemm.tflops(seconds_of([&] { gemm(); }, 10));
  }();
  return peak;
}

double copy_gbps() {  // device-to-device copy of 1 GiB: bytes read + written per second
  static const double bw = [] {
    constexpr int64_t n = int64_t{1} << 30;
    DeviceBuffer<char> a(n), b(n);
    a.zero(context().stream());
    const double s = seconds_of([&] {
      CLIP_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), n, cudaMemcpyDeviceToDevice, context().stream()));
    }, 5);
    return 2.0 * n / s * 1e-9;
  }();
  return bw;
}

void flops_counters(benchmark::State& state, double flops_per_call) {
  state.counters["TFLOP/s"] = benchmark::Counter(1e-12 * flops_per_call, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_fraction"] = benchmark::Counter(1e-12 * flops_per_call / peak_tflops(),
                                                       benchmark::Counter::kIsIterationInvariantRate);
}
void bytes_counters(benchmark::State& state, double bytes_per_call) {
  state.counters["GB/s"] = benchmark::Counter(1e-9 * bytes_per_call, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_fraction"] = benchmark::Counter(1e-9 * bytes_per_call / copy_gbps(),
                                                     benchmark::Counter::kIsIterationInvariantRate);
}

#define REQUIRE_GPU(state)                                           \
  if (const std::string why = why_no_gpu(); !why.empty()) {          \
    state.SkipWithError(why.c_str());                                \
    return;                                                          \
  }

void roof_bf16_gemm(benchmark::State& state) {
  REQUIRE_GPU(state);
  state.counters["TFLOP/s"] = peak_tflops();
  state.counters["copy_GB/s"] = copy_gbps();
  for (auto _ : state) state.SetIterationTime(1.0);
}

// ---- gemm at the models' shapes: Y[m,n] = X[m,k] W[n,k]^T, bf16 in and out -------------------

void gemm_shape(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  auto x = random_buffer<bf16>(m * k), w = random_buffer<bf16>(n * k, 1.0f, 2);
  DeviceBuffer<bf16> y(m * n);
  time_gpu(state, [&] { clip::cuda::gemm_nt<bf16, bf16>(context(), m, n, k, x.data(), k, w.data(), k, y.data(), n); });
  flops_counters(state, 2.0 * m * n * k);
}

// ---- static against run-time shapes: one LayerNorm body, C a constant or an argument -----------

// Cols is std::integral_constant<int, C> (the compiler knows C: loops unroll, the row stays in
// registers) or RuntimeCols (C read from memory). One warp per row, fp32 statistics.
struct RuntimeCols {
  int value;
};
template <class Cols>
__device__ __forceinline__ int cols_of(Cols c) {
  if constexpr (std::is_same_v<Cols, RuntimeCols>) return c.value;
  else return Cols::value;
}

template <class Cols, int MaxPerLane>
__global__ void layernorm_probe(bf16* out, const bf16* in, const bf16* weight, const bf16* bias, int64_t rows,
                                Cols cols) {
  const int C = cols_of(cols);
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const bf16* x = in + row * C;
  float v[MaxPerLane];
  float sum = 0;
#pragma unroll
  for (int i = 0; i < MaxPerLane; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < C ? __bfloat162float(x[c]) : 0.0f;
    sum += v[i];
  }
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float mean = sum / C;
  float var = 0;
#pragma unroll
  for (int i = 0; i < MaxPerLane; ++i) {
    const int c = lane + 32 * i;
    const float d = c < C ? v[i] - mean : 0.0f;
    var += d * d;
  }
  for (int o = 16; o > 0; o /= 2) var += __shfl_xor_sync(0xffffffffu, var, o);
  const float rstd = rsqrtf(var / C + 1e-5f);
#pragma unroll
  for (int i = 0; i < MaxPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < C)
      out[row * C + c] = __float2bfloat16((v[i] - mean) * rstd * __bfloat162float(weight[c]) + __bfloat162float(bias[c]));
  }
}

template <bool Static>
void layernorm_static_vs_runtime(benchmark::State& state) {
  REQUIRE_GPU(state);
  constexpr int C = 768;
  const int64_t rows = state.range(0);
  auto x = random_buffer<bf16>(rows * C), w = random_buffer<bf16>(C, 1.0f, 2), b = random_buffer<bf16>(C, 1.0f, 3);
  DeviceBuffer<bf16> y(rows * C);
  const unsigned blocks = static_cast<unsigned>((rows * 32 + 255) / 256);
  time_gpu(state, [&] {
    // Both instances hold up to 32 x 32 = 1024 channels per row in registers; only how C is known differs.
    if constexpr (Static)
      layernorm_probe<std::integral_constant<int, C>, 32><<<blocks, 256, 0, context().stream()>>>(
          y.data(), x.data(), w.data(), b.data(), rows, {});
    else
      layernorm_probe<RuntimeCols, 32><<<blocks, 256, 0, context().stream()>>>(y.data(), x.data(), w.data(), b.data(),
                                                                                rows, RuntimeCols{C});
    CLIP_CUDA_CHECK(cudaGetLastError());
  });
  bytes_counters(state, 2.0 * rows * C * sizeof(bf16));
}

// ---- the library's element-wise kernels -------------------------------------------------------

#if HAVE_LAYERNORM
template <int C>
void layernorm_forward(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t rows = state.range(0);
  auto x = random_buffer<bf16>(rows * C), w = random_buffer<bf16>(C, 1.0f, 2), b = random_buffer<bf16>(C, 1.0f, 3);
  DeviceBuffer<bf16> y(rows * C);
  DeviceBuffer<float> mean(rows), rstd(rows);
  time_gpu(state, [&] {
    clip::cuda::layernorm_forward<C, bf16>(context(), y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                                           rows);
  });
  bytes_counters(state, 2.0 * rows * C * sizeof(bf16) + 2.0 * rows * sizeof(float));
}
#endif

#if HAVE_ACTIVATION
template <int F>
void bias_quick_gelu_forward(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t rows = state.range(0);
  auto pre = random_buffer<bf16>(rows * F), bias = random_buffer<bf16>(F, 0.01f, 2);
  DeviceBuffer<bf16> act(rows * F);
  // pre += bias in place each call: small bias, values stay finite over the timed calls.
  time_gpu(state, [&] { clip::cuda::bias_quick_gelu_forward<F, bf16>(context(), act.data(), pre.data(), bias.data(), rows); });
  bytes_counters(state, 3.0 * rows * F * sizeof(bf16));  // read pre, write pre and act
}
#endif

// ---- attention (D = 64): the ViT-B/32, text, ViT-B/16 and ViT-L/14 sequence lengths ------------

#if HAVE_ATTENTION
// FLOPs: forward 4 B H T^2 D (q k^T and p v); backward 2.5x that (FlashAttention's count, with the
// recomputed scores); causal halves both.
template <int H, int T, bool Causal>
double attention_flops(int64_t batch, bool backward) {
  const double f = 4.0 * batch * H * double{T} * T * 64 * (Causal ? 0.5 : 1.0);
  return backward ? 2.5 * f : f;
}

template <int H, int T, bool Causal>
void attention_fwd(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t batch = state.range(0);
  constexpr int64_t C = int64_t{H} * 64;
  auto qkv = random_buffer<bf16>(batch * T * 3 * C);
  DeviceBuffer<bf16> out(batch * T * C);
  DeviceBuffer<float> lse(batch * H * T);
  time_gpu(state, [&] {
    clip::cuda::self_attention_forward<H, 64, T, Causal, bf16>(context(), out.data(), lse.data(), qkv.data(), batch, T);
  });
  flops_counters(state, attention_flops<H, T, Causal>(batch, false));
}

template <int H, int T, bool Causal>
void attention_bwd(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t batch = state.range(0);
  constexpr int64_t C = int64_t{H} * 64;
  auto qkv = random_buffer<bf16>(batch * T * 3 * C), d_out = random_buffer<bf16>(batch * T * C, 1.0f, 2);
  DeviceBuffer<bf16> out(batch * T * C), d_qkv(batch * T * 3 * C);
  DeviceBuffer<float> lse(batch * H * T), scratch(batch * H * T);
  clip::cuda::self_attention_forward<H, 64, T, Causal, bf16>(context(), out.data(), lse.data(), qkv.data(), batch, T);
  time_gpu(state, [&] {
    clip::cuda::self_attention_backward<H, 64, T, Causal, bf16>(context(), d_qkv.data(), d_out.data(), qkv.data(),
                                                                out.data(), lse.data(), scratch.data(), batch, T);
  });
  flops_counters(state, attention_flops<H, T, Causal>(batch, true));
}
#endif

// ---- ResNet: a 3x3 convolution (im2col + gemm) and BatchNorm, RN50's layer1 at batch 256 -------

#if HAVE_RESNET_OPS
template <int Cin, int Cout, int K, int Side>
void conv2d_forward(benchmark::State& state) {
  REQUIRE_GPU(state);
  using Conv = clip::cuda::Conv2d<Cin, Cout, K, 1, K / 2, bf16>;
  const int64_t batch = state.range(0);
  auto x = random_buffer<bf16>(Cin * batch * Side * Side), w = random_buffer<bf16>(int64_t{Cout} * Cin * K * K, 0.1f, 2);
  DeviceBuffer<bf16> y(Cout * batch * Side * Side), scratch(std::max<int64_t>(1, Conv::scratch_elements(batch, Side, Side)));
  time_gpu(state, [&] { Conv::forward(context(), y.data(), x.data(), w.data(), batch, Side, Side, scratch.data()); });
  flops_counters(state, 2.0 * batch * Side * Side * Cout * Cin * K * K);
}

template <int C, int Side>
void batchnorm_forward_train(benchmark::State& state) {
  REQUIRE_GPU(state);
  using BN = clip::cuda::BatchNorm2d<C, bf16>;
  const int64_t batch = state.range(0), hw = int64_t{Side} * Side;
  auto x = random_buffer<bf16>(C * batch * hw), gamma = random_buffer<bf16>(C, 1.0f, 2), beta = random_buffer<bf16>(C, 1.0f, 3);
  DeviceBuffer<bf16> y(C * batch * hw);
  DeviceBuffer<float> mean(C), rstd(C), running_mean(C), running_var(C);
  running_mean.zero(context().stream());
  running_var.zero(context().stream());
  time_gpu(state, [&] {
    BN::forward_train(context(), y.data(), mean.data(), rstd.data(), x.data(), gamma.data(), beta.data(),
                      running_mean.data(), running_var.data(), batch, hw, clip::Activation::relu);
  });
  bytes_counters(state, 2.0 * C * batch * hw * sizeof(bf16));  // the ideal: read x once, write y once
}
#endif

#if HAVE_ADAMW
// The fused multi-tensor AdamW over ViT-B/32's parameter count (151.3 M) cut into 768 x 768
// tensors: per element it reads master, grad, m, v and writes them back plus the bf16 copy.
void adamw_step(benchmark::State& state) {
  REQUIRE_GPU(state);
  const int64_t total = state.range(0), tensor = 768 * 768;
  std::vector<clip::TensorSlice> slices;
  for (int64_t o = 0; o < total; o += tensor) slices.push_back({o, std::min(tensor, total - o), true});
  clip::cuda::MultiTensorTable table(context(), slices, total);
  auto master = random_buffer<float>(total, 0.02f), m = random_buffer<float>(total, 1e-3f, 2);
  DeviceBuffer<float> grad(total), v(total);
  grad.zero(context().stream());
  v.zero(context().stream());
  DeviceBuffer<bf16> compute(total);
  const clip::AdamWScalars s = clip::adamw_scalars(1e-5f, 0.9f, 0.98f, 1e-6f, 0.2f, /*step=*/1);
  time_gpu(state, [&] {
    clip::cuda::adamw_step<bf16>(context(), table, master.data(), grad.data(), m.data(), v.data(), compute.data(), s);
  });
  bytes_counters(state, total * (8.0 * sizeof(float) + sizeof(bf16)));
}
#endif

}  // namespace

// The roofs first (every fraction divides by them).
BENCHMARK(roof_bf16_gemm)->Name("roof/bf16_gemm_8192_and_d2d_copy")->UseManualTime()->Iterations(1);

// ViT-B/16 at batch 256 (rows = 256 x 197): qkv, out, fc, proj; ViT-L/14 fc (256 x 257 rows);
// text at batch 256 (256 x 77 rows): qkv and fc.
BENCHMARK(gemm_shape)->Name("gemm_bf16")->UseManualTime()->Unit(benchmark::kMicrosecond)
    ->Args({256 * 197, 2304, 768})->Args({256 * 197, 768, 768})->Args({256 * 197, 3072, 768})
    ->Args({256 * 197, 768, 3072})->Args({256 * 257, 4096, 1024})->Args({256 * 257, 1024, 4096})
    ->Args({256 * 77, 1536, 512})->Args({256 * 77, 2048, 512});

BENCHMARK(layernorm_static_vs_runtime<true>)->Name("layernorm_probe_C768/static")->Arg(256 * 197)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(layernorm_static_vs_runtime<false>)->Name("layernorm_probe_C768/runtime")->Arg(256 * 197)->UseManualTime()->Unit(benchmark::kMicrosecond);

#if HAVE_LAYERNORM
BENCHMARK(layernorm_forward<768>)->Name("layernorm_forward<768>")->Arg(256 * 197)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(layernorm_forward<1024>)->Name("layernorm_forward<1024>")->Arg(256 * 257)->UseManualTime()->Unit(benchmark::kMicrosecond);
#endif
#if HAVE_ACTIVATION
BENCHMARK(bias_quick_gelu_forward<3072>)->Name("bias_quick_gelu_forward<3072>")->Arg(256 * 197)->UseManualTime()->Unit(benchmark::kMicrosecond);
#endif
#if HAVE_ATTENTION
BENCHMARK(attention_fwd<12, 50, false>)->Name("attention_fwd<H12,T50>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_fwd<8, 77, true>)->Name("attention_fwd<H8,T77,causal>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_fwd<12, 197, false>)->Name("attention_fwd<H12,T197>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_fwd<16, 257, false>)->Name("attention_fwd<H16,T257>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_bwd<12, 50, false>)->Name("attention_bwd<H12,T50>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_bwd<8, 77, true>)->Name("attention_bwd<H8,T77,causal>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_bwd<12, 197, false>)->Name("attention_bwd<H12,T197>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(attention_bwd<16, 257, false>)->Name("attention_bwd<H16,T257>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
#endif
#if HAVE_RESNET_OPS
BENCHMARK(conv2d_forward<64, 64, 3, 56>)->Name("conv2d_forward<64,64,3x3,56x56>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(conv2d_forward<64, 256, 1, 56>)->Name("conv2d_forward<64,256,1x1,56x56>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(batchnorm_forward_train<256, 56>)->Name("batchnorm_forward_train<256,56x56>")->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
#endif
#if HAVE_ADAMW
BENCHMARK(adamw_step)->Name("adamw_step_bf16")->Arg(151277313)->UseManualTime()->Unit(benchmark::kMicrosecond);
#endif

BENCHMARK_MAIN();
