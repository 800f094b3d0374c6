// What bench/bench_cuda_kernels.cu and bench/bench_cuda_models.cu share, so that both divide by
// the same roof measured the same way: the GPU check, the process's one Context, device-made
// random operands, CUDA-event timing, and the card's bf16 matrix-product peak (one large
// cuBLASLt product, Y[n,n] = X[n,n] W[n,n]^T, 2 n^3 FLOPs).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/gemm.cuh"
#include "kernels/storage.cuh"

namespace clip_bench {

using clip::cuda::bf16;
using clip::cuda::Context;
using clip::cuda::DeviceBuffer;

// Why no CUDA device can run the benchmarks, or "" when one can.
inline std::string why_no_gpu() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(e);
  if (count == 0) return "no CUDA device: none found";
  return "";
}

// One context for the whole process: plans cached across cases, as a program would keep them.
inline Context& context() {
  static Context ctx(0);
  return ctx;
}

// Uniform values in [-scale, scale), made on the device (a hash of the index: the host would take
// seconds for the largest operands). Any finite input times the same; zeros could take fast paths.
template <class T>
__global__ void fill_random(T* x, int64_t n, float scale, uint32_t seed) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed * 0x9e3779b9u ^ static_cast<uint32_t>(i >> 32);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);  // [0, 1)
    x[i] = clip::cuda::from_float<T>(scale * (2.0f * u - 1.0f));
  }
}
template <class T>
DeviceBuffer<T> random_buffer(int64_t n, float scale = 1.0f, uint32_t seed = 1) {
  DeviceBuffer<T> d(n);
  fill_random<T><<<1024, 256, 0, context().stream()>>>(d.data(), n, scale, seed);
  CLIP_CUDA_CHECK(cudaGetLastError());
  return d;
}

// A pair of CUDA events on the context's stream: seconds per call of `reps` back-to-back launches.
class EventTimer {
 public:
  EventTimer() {
    CLIP_CUDA_CHECK(cudaEventCreate(&start_));
    CLIP_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  template <class F>
  double seconds_per_call(F&& launch, int reps) {
    const cudaStream_t stream = context().stream();
    CLIP_CUDA_CHECK(cudaEventRecord(start_, stream));
    for (int i = 0; i < reps; ++i) launch();
    CLIP_CUDA_CHECK(cudaEventRecord(stop_, stream));
    CLIP_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    CLIP_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3 / reps;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// The peak's product: Y[n,n] = X[n,n] W[n,n]^T in bf16 through the library's cuBLASLt path.
struct PeakGemm {
  int64_t n;
  DeviceBuffer<bf16> x, w, y;

  explicit PeakGemm(int64_t n_)
      : n(n_), x(random_buffer<bf16>(n_ * n_)), w(random_buffer<bf16>(n_ * n_, 1.0f, 2)), y(n_ * n_) {}
  void operator()() {
    clip::cuda::gemm_nt<bf16, bf16>(context(), n, n, n, x.data(), n, w.data(), n, y.data(), n);
  }
  // TFLOP/s at `seconds` per product.
  double tflops(double seconds) const { return 2.0 * n * n * n / seconds * 1e-12; }
};

}  // namespace clip_bench
