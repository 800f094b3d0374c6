// Where a model runs: the CPU back end (Eigen; the reference the tests trust) or the CUDA one
// (kernels/, declared in include/clip/cuda/). The same model types take it as a template
// argument, clip::Model<Cfg, Device::cuda>, and the programs as `--device cpu|cuda`.
#pragma once

#include <string_view>

#include "clip/core/error.hpp"

namespace clip {

enum class Device { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

// What a model's matrix products run in. fp32: every operand and sum in fp32 (the reference the
// tests trust). bf16: operands rounded to bfloat16, products summed in fp32, master weights and
// everything outside the products (LayerNorm, softmax, the loss, AdamW) in fp32. On the GPU the
// CUDA back end also stores activations in bf16; on the CPU the products run on AMX tiles or
// AVX512-BF16 where the CPU has them (ops/cpu_features.hpp).
enum class Precision { fp32, bf16 };

inline const char* precision_name(Precision p) { return p == Precision::bf16 ? "bf16" : "fp32"; }

namespace cuda {
using Precision = clip::Precision;  // the CUDA back end's name for it
}  // namespace cuda

// "cpu" or "cuda" (as the programs' --device takes it).
inline Device parse_device(std::string_view name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda" || name == "gpu") return Device::cuda;
  CLIP_FAIL("unknown device '", name, "': use cpu or cuda");
}

inline Precision parse_precision(std::string_view name) {
  if (name == "bf16") return Precision::bf16;
  if (name == "fp32") return Precision::fp32;
  CLIP_FAIL("unknown precision '", name, "': use bf16 or fp32");
}

}  // namespace clip
