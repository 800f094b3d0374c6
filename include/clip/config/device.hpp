// Where a model runs: the CPU back end (Eigen; the reference the tests trust) or the CUDA one
// (kernels/, declared in include/clip/cuda/). The same model types take it as a template
// argument, clip::Model<Cfg, Device::cuda>, and the programs as `--device cpu|cuda`.
#pragma once

#include <string_view>

#include "clip/core/error.hpp"

namespace clip {

enum class Device { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

namespace cuda {
// What the CUDA back end stores activations and compute weights in: bf16 (fp32 accumulation and
// fp32 master weights) for speed, fp32 for checking against the CPU.
enum class Precision { fp32, bf16 };
}  // namespace cuda

// "cpu" or "cuda" (as the programs' --device takes it).
inline Device parse_device(std::string_view name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda" || name == "gpu") return Device::cuda;
  CLIP_FAIL("unknown device '", name, "': use cpu or cuda");
}

inline cuda::Precision parse_precision(std::string_view name) {
  if (name == "bf16") return cuda::Precision::bf16;
  if (name == "fp32") return cuda::Precision::fp32;
  CLIP_FAIL("unknown precision '", name, "': use bf16 or fp32");
}

}  // namespace clip
