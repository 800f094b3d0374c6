// Gradient clipping by the global L2 norm, as include/clip/train/grad_clip.hpp (PyTorch's
// clip_grad_norm_), and the temperature clamp of clip::Trainer (include/clip/train/trainer.hpp).
//
// The norm is a deterministic two-stage reduction over the optimizer's chunk table (the trained
// tensors only; buffers are not gradients):
//   1. one block per chunk sums g^2 in double (each thread a fixed strided subset, then a fixed
//      tree across the block) into partials[chunk];
//   2. one block adds the partials in a fixed order and writes sqrt(total) as a double.
// Same inputs, same bits, whatever the launch timing. Double, as the CPU: the sum of ~10^8
// squares in float would lose digits the clipping threshold can see. (The CPU's chunks are 16K
// elements, the table's 64K, so the partials are grouped differently: agreement is to ~1e-15
// relative, not bit for bit.)
//
// The clip factor itself is the CPU's host function clip::clip_factor(norm, max_norm); the host
// reads the norm back (it checks it is finite and reports it, as clip::Trainer::step) and hands
// the factor to adamw_step through AdamWScalars::grad_scale, which saves a pass over the
// gradients. scale_gradients does the same scaling in place for other uses.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "kernels/adamw.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace detail {

inline constexpr int kNormThreads = 256;

// op-reduction of one value per thread over the block, in a fixed order (a shuffle tree in each
// warp, then thread 0 over the warps' results in warp order), returned to every thread. Safe to
// call several times in a row (it synchronises before reusing its shared memory).
template <int Threads, class T, class Op>
__device__ inline T block_all_reduce(T x, Op op) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "a block is whole warps, at most 1024 threads");
  __shared__ T warp_results[Threads / 32];
  __shared__ T result;
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(0xffffffffu, x, o));
  __syncthreads();  // earlier readers of warp_results / result are done
  if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = warp_results[0];
    for (int w = 1; w < Threads / 32; ++w) r = op(r, warp_results[w]);
    result = r;
  }
  __syncthreads();
  return result;
}

struct Plus {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Stage 1: partials[chunk] = sum of g^2 over the chunk.
static __global__ void __launch_bounds__(kNormThreads)
    sum_squares_kernel(const clip::TensorChunk* __restrict__ chunks, const float* __restrict__ g,
                       double* __restrict__ partials) {
  const clip::TensorChunk c = chunks[blockIdx.x];
  const float* gc = g + c.offset;
  double sum = 0;
  for (int i = threadIdx.x; i < c.length; i += kNormThreads) {
    const double x = gc[i];
    sum = fma(x, x, sum);
  }
  sum = block_all_reduce<kNormThreads>(sum, Plus{});
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Stage 2: *norm = sqrt(sum of the partials) (Root), or the sum itself.
template <bool Root>
__global__ void __launch_bounds__(kNormThreads)
    finish_norm_kernel(const double* __restrict__ partials, int64_t count, double* __restrict__ norm) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kNormThreads) sum += partials[i];
  sum = block_all_reduce<kNormThreads>(sum, Plus{});
  if (threadIdx.x == 0) *norm = Root ? sqrt(sum) : sum;
}

static __global__ void square_root_kernel(double* x) { *x = sqrt(*x); }

static __global__ void scale_kernel(const clip::TensorChunk* __restrict__ chunks, float* __restrict__ g, float factor) {
  const clip::TensorChunk c = chunks[blockIdx.x];
  float* gc = g + c.offset;
  for (int i = threadIdx.x; i < c.length; i += kNormThreads) gc[i] = __fmul_rn(gc[i], factor);
}

// The CPU's max_logit_scale (trainer.hpp): ln 100, a temperature of 100.
inline constexpr float kMaxLogitScale = 4.6051701859880914f;

template <class S>
__global__ void clamp_logit_scale_kernel(float* master, S* compute) {
  // fminf/fmaxf as std::clamp(x, 0, max) for finite x; a NaN stays NaN as with std::clamp
  // (the trainer has refused non-finite gradients before the step, so it does not arise).
  const float x = *master;
  const float y = x < 0.0f ? 0.0f : (kMaxLogitScale < x ? kMaxLogitScale : x);
  *master = y;
  if (compute) *compute = from_float<S>(y);
}

}  // namespace detail

namespace detail {
template <bool Root>
void sum_squares(Context& ctx, MultiTensorTable& table, const float* grad, double* out) {
  CLIP_CHECK(out, "gradient_norm needs a device double for the result");
  if (table.count() == 0) {
    CLIP_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), ctx.stream()));
    return;
  }
  sum_squares_kernel<<<static_cast<unsigned>(table.count()), kNormThreads, 0, ctx.stream()>>>(table.chunks(), grad,
                                                                                                table.partials());
  CLIP_CUDA_CHECK(cudaGetLastError());
  finish_norm_kernel<Root><<<1, kNormThreads, 0, ctx.stream()>>>(table.partials(), table.count(), out);
  CLIP_CUDA_CHECK(cudaGetLastError());
}
}  // namespace detail

// *norm (device double) = sqrt(sum of g^2) over every tensor of the table. Uses the table's
// partials as scratch, so one table serves one norm at a time (stream order).
inline void gradient_norm(Context& ctx, MultiTensorTable& table, const float* grad, double* norm) {
  detail::sum_squares<true>(ctx, table, grad, norm);
}

// *sum (device double) = sum of g^2 over the table, without the root: ZeRO-1 adds the ranks'
// sums before one square_root (the norm of the whole gradient, as one process takes it).
inline void gradient_sum_squares(Context& ctx, MultiTensorTable& table, const float* grad, double* sum) {
  detail::sum_squares<false>(ctx, table, grad, sum);
}

inline void square_root(Context& ctx, double* x) {
  detail::square_root_kernel<<<1, 1, 0, ctx.stream()>>>(x);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// grad *= factor on every tensor of the table (clip::scale_gradients).
inline void scale_gradients(Context& ctx, const MultiTensorTable& table, float* grad, float factor) {
  if (table.count() == 0) return;
  detail::scale_kernel<<<static_cast<unsigned>(table.count()), detail::kNormThreads, 0, ctx.stream()>>>(
      table.chunks(), grad, factor);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// logit_scale := clamp(logit_scale, 0, ln 100) after the optimizer step (clip::clamp_logit_scale),
// on the fp32 master; the compute copy (null: none) is refreshed from it, since adamw_step wrote
// it from the unclamped value.
template <class S>
void clamp_logit_scale(Context& ctx, float* master_logit_scale, S* compute_logit_scale) {
  static_assert(is_storage_type<S>, "the compute copy is float or bf16");
  CLIP_CHECK(master_logit_scale, "clamp_logit_scale needs the master logit_scale");
  detail::clamp_logit_scale_kernel<S><<<1, 1, 0, ctx.stream()>>>(master_logit_scale, compute_logit_scale);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
