// GPU tests run only where a CUDA device answers. Elsewhere the whole test program prints why
// and exits with 77, which meson reports as SKIP (never as a pass). Every GPU test program
// includes this header once.
#pragma once

#include <cstdlib>
#include <iostream>
#include <string>

#include <boost/test/unit_test.hpp>
#include <cuda_runtime.h>

namespace clip::test {

// Why no CUDA device can run the tests here, or an empty string when one can.
inline std::string why_no_gpu() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return std::string("no usable CUDA device: ") + cudaGetErrorString(e);
  if (count == 0) return "no CUDA device on this machine";
  return "";
}

struct RequireGpu {
  void setup() {
    const std::string why = why_no_gpu();
    if (why.empty()) return;
    std::cout << "SKIPPED (GPU test, cannot run here): " << why << std::endl;
    std::exit(77);
  }
};
BOOST_TEST_GLOBAL_FIXTURE(RequireGpu);

}  // namespace clip::test
