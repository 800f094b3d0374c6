// --device cpu|cuda and --precision bf16|fp32, shared by clip-embed, clip-zeroshot and clip-train.
// bf16 is honoured on both devices: on the CPU the products run on AMX tiles where the CPU has
// them (else on the fp32 GEMM with bf16-rounded operands: the same numbers, no faster).
// The programs are written once against clip::Model<Cfg, D> / clip::Trainer<Cfg, D>; the device
// becomes a compile-time value here. A build without the CUDA back end (CLIP_WITH_CUDA unset)
// answers --device cuda with an error that says so.
#pragma once

#include <optional>
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
  // --precision: what the matrix products run in. Unset: bf16 on a GPU, fp32 on the CPU (whose
  // bf16 is fast only with AMX tiles, and which the tests trust as the reference).
  std::optional<Precision> requested_precision;

  Precision precision() const {
    return requested_precision.value_or(device == Device::cuda ? Precision::bf16 : Precision::fp32);
  }
};

// The options' values; a bad one is a usage error (exit 2).
inline Device parse_device_option(std::string_view v) {
  if (v == "cpu") return Device::cpu;
  if (v == "cuda") return Device::cuda;
  throw UsageError{"--device takes cpu or cuda, not '" + std::string(v) + "'"};
}
inline Precision parse_precision_option(std::string_view v) {
  if (v == "bf16") return Precision::bf16;
  if (v == "fp32") return Precision::fp32;
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
Model<Cfg, D> make_model(const DeviceChoice& choice) {
  return Model<Cfg, D>(choice.precision());
}

}  // namespace clip::cli
