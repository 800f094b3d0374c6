// AdamW's arithmetic, shared by the CPU optimizer (adamw.hpp) and the CUDA one
// (kernels/adamw.cuh), so that both back ends update an element with the same operations in the
// same order and give the same bits:
//
//   grad = g * grad_scale                                   (gradient clipping, read on the fly)
//   m    = fma(grad, 1 - beta1, m * beta1)                   PyTorch's vectorised lerp/add(alpha)
//   v    = (v * beta2) + ((1 - beta2) * grad * grad)         every product rounded before the add
//   p    = (p * decay) + (neg_step * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   g    = 0                                                 the gradient is consumed
//
// Compilers fuse a * b + c into one FMA unless told not to (GCC's -ffp-contract=fast default,
// nvcc's -fmad=true default), which rounds once instead of twice and would differ from PyTorch's
// separate kernels. On the device every operation is an explicitly rounded intrinsic (__fmul_rn,
// __fadd_rn, __fdiv_rn, __fsqrt_rn, __fmaf_rn), which nvcc never fuses; on the host each product
// passes through an empty asm statement that hides its origin from GCC (detail::rounded). IEEE
// division and square root are correctly rounded on both, so the results are bit-identical.
//
// The step's scalars are formed once per step in double from the decimal values of the options
// (decimal.hpp) and rounded to float, as PyTorch does with Python floats (adamw_scalars).
//
// The multi-tensor chunk table: the CUDA optimizer and gradient norm run ONE kernel over every
// trained tensor of a flat parameter buffer. The host cuts each tensor (offset, numel, decay
// group) into chunks of at most kMultiTensorChunk elements; a thread block takes one chunk.
// Buffers (BatchNorm running statistics) are simply not in the list, so they are never touched.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/core/host_device.hpp"
#include "clip/train/decimal.hpp"

namespace clip {

// The scalars of one step (see the formula at the top of the file), rounded to float once.
struct AdamWScalars {
  float decay;       // 1 - lr * wd, or 1 for the no-decay group
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float neg_step;    // -lr / (1 - beta1^t)
  float bc2_sqrt;    // sqrt(1 - beta2^t)
  float eps;
  float grad_scale;  // gradient clipping's factor (1: none)
};

// The scalars of step `step` (1-based: the step being taken, after the increment) at learning
// rate `lr`, for the weight-decay group; the no-decay group is the same with decay = 1.
inline AdamWScalars adamw_scalars(float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                  float grad_scale = 1.0f) {
  const double lr_d = decimal_value(lr), wd = decimal_value(weight_decay);
  const double b1 = decimal_value(beta1), b2 = decimal_value(beta2);
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  return {static_cast<float>(1.0 - lr_d * wd),
          static_cast<float>(b1),
          static_cast<float>(1.0 - b1),
          static_cast<float>(b2),
          static_cast<float>(1.0 - b2),
          static_cast<float>(-(lr_d / bc1)),
          static_cast<float>(std::sqrt(bc2)),
          eps,
          grad_scale};
}

namespace detail {

// A value the compiler must round before it is used: GCC contracts a * b + c into one FMA
// (-ffp-contract=fast is its default), which would round differently from PyTorch's separate
// p * (1 - lr wd) and the addcdiv that follows it. The empty asm hides the value's origin.
// Works for float and for SIMD vectors (the AVX-512 loop in adamw.hpp).
template <class V>
inline V rounded(V x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (sizeof(V) == sizeof(float)) asm("" : "+x"(x));
  else asm("" : "+v"(x));
#endif
  return x;
}

// Single float operations, each rounded on its own (never fused with a neighbour).
CLIP_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return rounded(a * b);
#endif
}
CLIP_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return rounded(a + b);
#endif
}
CLIP_HOST_DEVICE inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return rounded(a / b);
#endif
}
CLIP_HOST_DEVICE inline float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return rounded(std::sqrt(a));
#endif
}
CLIP_HOST_DEVICE inline float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace detail

// One element's AdamW update, in place (g is left at zero). The CPU's AVX-512 loop
// (detail::adamw_update in adamw.hpp) performs exactly these operations 16 lanes at a time;
// tests/test_cuda_host_train_ops.cpp checks the two agree bit for bit.
CLIP_HOST_DEVICE inline void adamw_element(float& p, float& g, float& m, float& v, const AdamWScalars& s) {
  using namespace detail;
  const float grad = mul_rn(g, s.grad_scale);
  g = 0.0f;
  m = fma_rn(grad, s.one_minus_beta1, mul_rn(m, s.beta1));
  v = add_rn(mul_rn(v, s.beta2), mul_rn(mul_rn(s.one_minus_beta2, grad), grad));
  const float denom = add_rn(div_rn(sqrt_rn(v), s.bc2_sqrt), s.eps);
  p = add_rn(mul_rn(p, s.decay), div_rn(mul_rn(s.neg_step, m), denom));
}

// ---- The multi-tensor chunk table -------------------------------------------------------------

// Elements per chunk: 64K floats = 256 KiB of each of p, g, m, v, enough work for one thread
// block to stream at full bandwidth, small enough that a 150M-parameter model gives ~2300 blocks.
inline constexpr int64_t kMultiTensorChunk = int64_t{1} << 16;

// A trained tensor in the flat buffers (master, grad, m, v and the compute copy share offsets).
struct TensorSlice {
  int64_t offset;  // first element
  int64_t numel;   // elements (0: nothing to do)
  bool decay;      // in the weight-decay group (adamw_decays)
};

// One block's work: elements [offset, offset + length) of the flat buffers, all in one tensor.
struct TensorChunk {
  int64_t offset;
  int32_t length;  // 1 .. chunk size
  int32_t decay;   // 1: weight-decay group, 0: not
};

// Cuts every tensor into chunks of at most `chunk` elements, tensor by tensor in the given order
// (visit order), so each element of each listed tensor is in exactly one chunk. `total` (when
// >= 0) is the flat buffers' size, which every tensor must fit in. Tensors must not overlap: an
// element updated twice in one step would be wrong, silently.
inline std::vector<TensorChunk> build_chunk_table(std::span<const TensorSlice> tensors,
                                                  int64_t chunk = kMultiTensorChunk, int64_t total = -1) {
  CLIP_CHECK(chunk > 0 && chunk <= (int64_t{1} << 30), "the chunk size must be in [1, 2^30], got ", chunk);
  std::vector<TensorSlice> sorted;
  sorted.reserve(tensors.size());
  int64_t count = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorSlice& t = tensors[i];
    CLIP_CHECK(t.offset >= 0 && t.numel >= 0, "tensor ", i, " of the optimizer's table has offset ", t.offset,
               " and ", t.numel, " elements; both must be non-negative");
    CLIP_CHECK(total < 0 || t.offset + t.numel <= total, "tensor ", i, " of the optimizer's table ends at element ",
               t.offset + t.numel, ", past the end of the flat buffers (", total, " elements)");
    if (t.numel == 0) continue;
    sorted.push_back(t);
    count += (t.numel + chunk - 1) / chunk;
  }
  std::sort(sorted.begin(), sorted.end(), [](const TensorSlice& a, const TensorSlice& b) { return a.offset < b.offset; });
  for (size_t i = 1; i < sorted.size(); ++i)
    CLIP_CHECK(sorted[i - 1].offset + sorted[i - 1].numel <= sorted[i].offset, "the optimizer's tensors at offsets ",
               sorted[i - 1].offset, " (", sorted[i - 1].numel, " elements) and ", sorted[i].offset,
               " overlap: each element must belong to one tensor");

  std::vector<TensorChunk> table;
  table.reserve(static_cast<size_t>(count));
  for (const TensorSlice& t : tensors)
    for (int64_t begin = 0; begin < t.numel; begin += chunk)
      table.push_back({t.offset + begin, static_cast<int32_t>(std::min(chunk, t.numel - begin)), t.decay ? 1 : 0});
  return table;
}

}  // namespace clip
