// The precision of the matrix products on the calling thread, as torch.autocast scopes it: one
// model code for fp32 and bf16, the choice made where a forward or a training step starts.
//
//   { clip::MatmulPrecisionScope bf16(clip::Precision::bf16);
//     Clip<Cfg>::encode_image(params, images, features, batch); }   // products in bf16
//
// Inside the scope every gemm_nt / gemm_nn / gemm_tn / gemm_packed (ops/gemm.hpp) rounds its two
// operands to bf16 and sums in fp32; everything else (LayerNorm, softmax, the loss, AdamW, the
// accumulation into y) stays fp32. A thread-local value, so code that calls the GEMM from
// inside its own OpenMP region passes it on to the workers (ops/conv2d.hpp does).
#pragma once

#include "clip/config/device.hpp"

namespace clip {

namespace detail {
inline Precision& thread_matmul_precision() {
  static thread_local Precision precision = Precision::fp32;
  return precision;
}
}  // namespace detail

inline Precision matmul_precision() { return detail::thread_matmul_precision(); }

// Sets the calling thread's product precision for its lifetime; scopes nest.
class MatmulPrecisionScope {
 public:
  explicit MatmulPrecisionScope(Precision p) : previous_(detail::thread_matmul_precision()) {
    detail::thread_matmul_precision() = p;
  }
  ~MatmulPrecisionScope() { detail::thread_matmul_precision() = previous_; }
  MatmulPrecisionScope(const MatmulPrecisionScope&) = delete;
  MatmulPrecisionScope& operator=(const MatmulPrecisionScope&) = delete;

 private:
  Precision previous_;
};

}  // namespace clip
