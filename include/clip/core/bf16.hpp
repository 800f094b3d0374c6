// bfloat16 on the host: the rounding the GPU's __float2bfloat16_rn does, for CPU emulation of the
// bf16 path in tests ("within twice the error of the same computation rounded to bf16 on the
// CPU") and for converting weights. A bf16 is the upper 16 bits of an fp32: same exponent range,
// 8 significant bits.
#pragma once

#include <bit>
#include <cstdint>

namespace clip {

// The fp32 whose upper half is `bits` (exact).
inline float bf16_bits_to_float(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

// fp32 -> bf16 bits, round to nearest, ties to even (as __float2bfloat16_rn). Overflow rounds to
// infinity; every NaN becomes the canonical NaN 0x7fff (as CUDA's host conversion does), never
// rounding into infinity.
inline uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  // Adding 0x7fff plus the lowest kept bit rounds half-way cases to the even neighbour; a carry
  // out of the significand correctly bumps the exponent (to infinity past the largest finite).
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}

// x rounded to the nearest bf16, returned as fp32.
inline float round_to_bf16(float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); }

}  // namespace clip
