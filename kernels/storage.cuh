// Storage types of activations and compute copies of weights. S = float is the checking mode
// (results comparable to the CPU path at 1e-5); S = bf16 is the fast mode. Arithmetic always
// happens in fp32: kernels load S, convert with to_float, and round back once with from_float.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <library_types.h>

namespace clip::cuda {

using bf16 = __nv_bfloat16;

template <class S>
inline constexpr bool is_storage_type = std::is_same_v<S, float> || std::is_same_v<S, bf16>;

// S -> fp32 (exact for both types).
template <class S>
__host__ __device__ inline float to_float(S x) {
  static_assert(is_storage_type<S>, "storage types are float and bf16");
  if constexpr (std::is_same_v<S, float>) {
    return x;
  } else {
    return __bfloat162float(x);
  }
}

// fp32 -> S, rounding to nearest even for bf16 (as include/clip/core/bf16.hpp on the host).
template <class S>
__host__ __device__ inline S from_float(float x) {
  static_assert(is_storage_type<S>, "storage types are float and bf16");
  if constexpr (std::is_same_v<S, float>) {
    return x;
  } else {
    return __float2bfloat16_rn(x);
  }
}

// The cudaDataType_t that names S to cuBLASLt.
template <class S>
inline constexpr cudaDataType_t cuda_type = std::is_same_v<S, float> ? CUDA_R_32F : CUDA_R_16BF;

}  // namespace clip::cuda
