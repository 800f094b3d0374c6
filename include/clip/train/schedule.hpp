// Learning-rate schedules of CLIP training (open_clip's formulas), as functions of the 0-based
// optimizer step that is about to run:
//
//   warmup (step < warmup):  lr = base * (step + 1) / warmup
//   cosine (after warmup):   lr = base * (1 + cos(pi * e / es)) / 2,  e = step - warmup,
//                            es = total - warmup; steps past `total` stay at 0
//   constant (after warmup): lr = base
//
// The paper warms up for 2,000 steps, then decays to zero with a cosine schedule. The arithmetic
// is in double on the base rate's decimal value (decimal.hpp), as open_clip's Python.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "clip/core/error.hpp"
#include "clip/train/decimal.hpp"

namespace clip {

// Linear warmup from base / warmup (the first step) to base (step warmup - 1).
inline float warmup_lr(int64_t step, float base_lr, int64_t warmup) {
  return static_cast<float>(decimal_value(base_lr) * double(step + 1) / double(warmup));
}

// Warmup, then the base rate for ever.
inline float const_lr(int64_t step, float base_lr, int64_t warmup = 0) {
  CLIP_CHECK(step >= 0 && warmup >= 0, "a schedule needs a non-negative step and warmup, got step ", step,
             " and warmup ", warmup);
  return step < warmup ? warmup_lr(step, base_lr, warmup) : base_lr;
}

// Warmup, then a half cosine from the base rate at step `warmup` down to 0 at step `total`.
inline float cosine_lr(int64_t step, float base_lr, int64_t warmup, int64_t total) {
  CLIP_CHECK(step >= 0 && warmup >= 0, "a schedule needs a non-negative step and warmup, got step ", step,
             " and warmup ", warmup);
  CLIP_CHECK(total > warmup, "a cosine schedule needs more steps (", total, ") than warmup steps (", warmup, ")");
  if (step < warmup) return warmup_lr(step, base_lr, warmup);
  const double e = double(std::min(step, total) - warmup), es = double(total - warmup);
  return static_cast<float>(0.5 * (1.0 + std::cos(std::numbers::pi * e / es)) * decimal_value(base_lr));
}

}  // namespace clip
