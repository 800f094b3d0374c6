// --device cpu|cuda and --precision bf16|fp32, shared by clip-embed, clip-zeroshot and clip-train.
// The programs are written once against clip::Model<Cfg, D> / clip::Trainer<Cfg, D>; the device
// becomes a compile-time value here. A build without the CUDA back end (CLIP_WITH_CUDA unset)
// answers --device cuda with an error that says so.
#pragma once

#include <string>
#include <string_view>

#include "clip/config/device.hpp"
#include "clip/core/error.hpp"
#include "clip/models/clip_model.hpp"
#include "cli.hpp"
#if CLIP_WITH_CUDA
#include "clip/cuda/model.hpp"
#include "clip/cuda/trainer.hpp"
#endif

namespace clip::cli {

struct DeviceChoice {
  Device device = Device::cpu;
  cuda::Precision precision = cuda::Precision::bf16;  // what --device cuda stores activations in
};

// The options' values; a bad one is a usage error (exit 2).
inline Device parse_device_option(std::string_view v) {
  if (v == "cpu") return Device::cpu;
  if (v == "cuda") return Device::cuda;
  throw UsageError{"--device takes cpu or cuda, not '" + std::string(v) + "'"};
}
inline cuda::Precision parse_precision_option(std::string_view v) {
  if (v == "bf16") return cuda::Precision::bf16;
  if (v == "fp32") return cuda::Precision::fp32;
  throw UsageError{"--precision takes bf16 or fp32, not '" + std::string(v) + "'"};
}

// Calls f.template operator()<D>() with the chosen device as a compile-time value.
template <class F>
decltype(auto) with_device(Device device, F&& f) {
  if (device == Device::cuda) {
#if CLIP_WITH_CUDA
    return f.template operator()<Device::cuda>();
#else
    CLIP_FAIL("this program was built without the CUDA back end (meson found no nvcc or CUDA libraries; "
              "configure with -Dcuda=enabled to see why)");
#endif
  }
  return f.template operator()<Device::cpu>();
}

// A model on the chosen device, weights not loaded yet.
template <class Cfg, Device D>
Model<Cfg, D> make_model([[maybe_unused]] const DeviceChoice& choice) {
  if constexpr (D == Device::cuda) return Model<Cfg, D>(choice.precision);
  else return Model<Cfg, D>();
}

}  // namespace clip::cli
