// The CUDA runtime answers: a device is found and a kernel runs (or the test says why not).
#include <cuda_runtime.h>

#include <boost/test/unit_test.hpp>

#include "cuda/gpu.hpp"

namespace {
__global__ void add_one(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += 1.0f;
}
}  // namespace

BOOST_AUTO_TEST_CASE(a_kernel_runs) {
  constexpr int n = 1000;
  float* d = nullptr;
  BOOST_REQUIRE(cudaMalloc(&d, n * sizeof(float)) == cudaSuccess);
  BOOST_REQUIRE(cudaMemset(d, 0, n * sizeof(float)) == cudaSuccess);
  add_one<<<(n + 255) / 256, 256>>>(d, n);
  float host[n];
  BOOST_REQUIRE(cudaMemcpy(host, d, sizeof host, cudaMemcpyDeviceToHost) == cudaSuccess);
  cudaFree(d);
  for (float v : host) BOOST_TEST(v == 1.0f);
}
