// BatchNorm2d (eps 1e-5, momentum 0.1) over channel-major activations [C, B, H, W], fused with
// the optional residual add and ReLU that follow it in a ResNet, mirroring
// include/clip/ops/batchnorm.hpp (forward_eval, forward_train, backward). The per-element
// formulas are clip::bn_math (include/clip/ops/conv_index.hpp), shared with the host test.
//
// In [C, B, H, W] a channel's values of the whole batch are one contiguous row of
// count = B H W values, so the train-mode kernels give each channel one block: the block's
// reductions (mean, then squared deviations; backward's two sums) are deterministic, need no
// atomics or second launch, and the same block then writes the row.
// Statistics accumulate in double per thread (as the CPU accumulates the batch mean and M2 in
// double); the elementwise math is fp32 on S loads.
//
// Under a BatchNormSyncScope (kernels/batchnorm_sync.cuh, --sync-bn) the statistics are every
// process's: forward splits into stats_kernel (this rank's count, mean, M2 into its slot of the
// table), the scope's sum over the processes, and merged_train_kernel (the ranks' parts merged in
// rank order as the CPU's finish_statistics, then the train kernel's remaining work); backward
// into sums_kernel (this rank's sums; d_gamma, d_beta += its share), the sum, and
// input_gradient_kernel (d_x from the summed sums and count). One process in a scope computes
// exactly what it computes without one.
#pragma once

#include <algorithm>
#include <cstdint>

#include "clip/core/error.hpp"
#include "clip/ops/batchnorm.hpp"  // clip::Activation
#include "clip/ops/conv_index.hpp"
#include "kernels/batchnorm_sync.cuh"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

namespace bn_detail {
inline constexpr int kRowThreads = 512;  // threads of a per-channel block
inline constexpr int kEltThreads = 256;

// The sum of v over the block (every thread gets it). `shared` holds 32 doubles.
__device__ inline double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  for (int i = 0; i < warps; ++i) total += shared[i];  // the same order in every thread
  return total;
}

// Eval: y = act(x alpha + beta [+ r]) with the running statistics; grid (pixels, C).
template <class S>
__global__ void eval_kernel(S* y, const S* x, const S* gamma, const S* beta, const float* running_mean,
                            const float* running_var, int64_t count, bool relu, const S* residual) {
  const int c = blockIdx.y;
  const bn_math::Affine f = bn_math::affine(to_float(gamma[c]), to_float(beta[c]), running_mean[c],
                                            bn_math::invstd(running_var[c]));
  const int64_t row = int64_t{c} * count;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    const float v = to_float(x[row + i]);
    y[row + i] = from_float<S>(residual ? bn_math::apply_residual(v, f, to_float(residual[row + i]), relu)
                                        : bn_math::apply(v, f, relu));
  }
}

// The end of train mode for channel c of one block, once its batch statistics are known (mean
// m, squared deviations m2 over n values): the saved mean and invstd, the running statistics
// (unbiased variance), then y = act(bn(x) [+ r]).
template <class S>
__device__ void apply_train_statistics(int c, double m, double m2, double n, S* y, float* save_mean, float* save_rstd,
                                       const S* x, const S* gamma, const S* beta, float* running_mean,
                                       float* running_var, int64_t count, bool relu, const S* residual, bool update) {
  const int64_t row = int64_t{c} * count;
  const float mean = static_cast<float>(m), var = static_cast<float>(m2 / n);
  const float inv = bn_math::invstd(var);
  if (threadIdx.x == 0) {
    save_mean[c] = mean;
    save_rstd[c] = inv;
    if (update) {
      running_mean[c] = bn_math::running_update(running_mean[c], mean);
      running_var[c] = bn_math::running_update(running_var[c], static_cast<float>(m2 / (n - 1)));
    }
  }
  const bn_math::Affine f = bn_math::affine(to_float(gamma[c]), to_float(beta[c]), mean, inv);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float v = to_float(x[row + i]);
    y[row + i] = from_float<S>(residual ? bn_math::apply_residual(v, f, to_float(residual[row + i]), relu)
                                        : bn_math::apply(v, f, relu));
  }
}

// Train: one block per channel. Batch mean and biased variance (two passes, in double), saved
// mean / invstd, running statistics (unbiased variance), then y = act(bn(x) [+ r]).
template <class S>
__global__ void train_kernel(S* y, float* save_mean, float* save_rstd, const S* x, const S* gamma, const S* beta,
                             float* running_mean, float* running_var, int64_t count, bool relu, const S* residual,
                             bool update) {
  __shared__ double shared[32];
  const int c = blockIdx.x;
  const int64_t row = int64_t{c} * count;
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += to_float(x[row + i]);
  const double m = block_sum(s, shared) / double(count);
  double sq = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double d = to_float(x[row + i]) - m;
    sq += d * d;
  }
  sq = block_sum(sq, shared);
  apply_train_statistics(c, m, sq, double(count), y, save_mean, save_rstd, x, gamma, beta, running_mean, running_var,
                         count, relu, residual, update);
}

// Backward: one block per channel. g = masked d_y; d_beta += Σ g, d_gamma += invstd Σ g (x - mean);
// d_x = alpha g + k (x - mean) + k0; d_residual = g. Each element is read before it is written by
// the same thread, so d_x may alias x or d_y and d_residual may alias d_y.
template <class S>
__global__ void backward_kernel(S* d_x, float* d_gamma, float* d_beta, const S* d_y, const S* x, const S* y,
                                const float* save_mean, const float* save_rstd, const S* gamma, const S* beta,
                                int64_t count, bn_math::Mask mask, S* d_residual) {
  __shared__ double shared[32];
  const int c = blockIdx.x;
  const int64_t row = int64_t{c} * count;
  const float mean = save_mean[c], inv = save_rstd[c];
  const bn_math::Affine f = bn_math::affine(to_float(gamma[c]), to_float(beta[c]), mean, inv);
  auto grad = [&](int64_t i, float xv) {
    return bn_math::masked_gradient(to_float(d_y[row + i]), xv, mask == bn_math::Mask::output ? to_float(y[row + i]) : 0.0f,
                                    f, mask);
  };
  double sg = 0, sgx = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float xv = to_float(x[row + i]);
    const float g = grad(i, xv);
    sg += g;
    sgx += double(g) * (xv - mean);
  }
  sg = block_sum(sg, shared);
  sgx = block_sum(sgx, shared);
  if (threadIdx.x == 0) {
    d_beta[c] += static_cast<float>(sg);
    d_gamma[c] += static_cast<float>(sgx * inv);
  }
  const bn_math::InputGradient k = bn_math::input_gradient(f.alpha, inv, sg, sgx, count);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float xv = to_float(x[row + i]);
    const float g = grad(i, xv);
    if (d_residual) d_residual[row + i] = from_float<S>(g);
    d_x[row + i] = from_float<S>(bn_math::d_input(g, xv, mean, f.alpha, k));
  }
}
// --sync-bn, forward step 1: this rank's (count, mean, M2) of channel blockIdx.x into own
// [3, C] (its slot of the table), the two passes of train_kernel.
template <class S>
__global__ void stats_kernel(double* own, const S* x, int64_t count, int C) {
  __shared__ double shared[32];
  const int c = blockIdx.x;
  const int64_t row = int64_t{c} * count;
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += to_float(x[row + i]);
  const double m = block_sum(s, shared) / double(count);
  double sq = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double d = to_float(x[row + i]) - m;
    sq += d * d;
  }
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) {
    own[c] = double(count);
    own[C + c] = m;
    own[2 * C + c] = sq;
  }
}

// (n, mean, m2) += a part of nb values with mean mb and squared deviations m2b: the CPU's
// BatchNorm2d::merge (include/clip/ops/batchnorm.hpp), operation for operation.
__device__ inline void merge_part(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  const double total = n + nb, delta = mb - mean;
  mean += delta * nb / total;
  m2 += m2b + delta * delta * n * nb / total;
  n = total;
}

// --sync-bn, forward step 3 (after the sum): every rank's part merged in rank order (a part with
// no values skipped, the first taken as is), then train_kernel's saved and running statistics
// and output.
template <class S>
__global__ void merged_train_kernel(S* y, float* save_mean, float* save_rstd, const double* table, int world, int C,
                                    const S* x, const S* gamma, const S* beta, float* running_mean, float* running_var,
                                    int64_t count, bool relu, const S* residual, bool update) {
  const int c = blockIdx.x;
  double n = 0, m = 0, m2 = 0;
  for (int r = 0; r < world; ++r) {
    const double* part = table + int64_t{r} * 3 * C;
    if (part[c] <= 0) continue;
    if (n == 0) n = part[c], m = part[C + c], m2 = part[2 * C + c];
    else merge_part(n, m, m2, part[c], part[C + c], part[2 * C + c]);
  }
  apply_train_statistics(c, m, m2, n, y, save_mean, save_rstd, x, gamma, beta, running_mean, running_var, count,
                         relu, residual, update);
}

// --sync-bn, backward step 1: backward_kernel's sums (d_beta, d_gamma += this rank's share) into
// table [Σ g (C), Σ g xc (C), count].
template <class S>
__global__ void sums_kernel(double* table, float* d_gamma, float* d_beta, const S* d_y, const S* x, const S* y,
                            const float* save_mean, const float* save_rstd, const S* gamma, const S* beta,
                            int64_t count, bn_math::Mask mask, int C) {
  __shared__ double shared[32];
  const int c = blockIdx.x;
  const int64_t row = int64_t{c} * count;
  const float mean = save_mean[c], inv = save_rstd[c];
  const bn_math::Affine f = bn_math::affine(to_float(gamma[c]), to_float(beta[c]), mean, inv);
  double sg = 0, sgx = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float xv = to_float(x[row + i]);
    const float g = bn_math::masked_gradient(to_float(d_y[row + i]), xv,
                                             mask == bn_math::Mask::output ? to_float(y[row + i]) : 0.0f, f, mask);
    sg += g;
    sgx += double(g) * (xv - mean);
  }
  sg = block_sum(sg, shared);
  sgx = block_sum(sgx, shared);
  if (threadIdx.x == 0) {
    d_beta[c] += static_cast<float>(sg);
    d_gamma[c] += static_cast<float>(sgx * inv);
    table[c] = sg;
    table[C + c] = sgx;
    if (c == 0) table[2 * C] = double(count);
  }
}

// --sync-bn, backward step 3 (after the sum): backward_kernel's second pass with the summed sums
// and count. Each element is read before it is written by the same thread (aliasing as there).
template <class S>
__global__ void input_gradient_kernel(S* d_x, const double* table, const S* d_y, const S* x, const S* y,
                                      const float* save_mean, const float* save_rstd, const S* gamma, const S* beta,
                                      int64_t count, bn_math::Mask mask, int C, S* d_residual) {
  const int c = blockIdx.x;
  const int64_t row = int64_t{c} * count;
  const float mean = save_mean[c], inv = save_rstd[c];
  const bn_math::Affine f = bn_math::affine(to_float(gamma[c]), to_float(beta[c]), mean, inv);
  const bn_math::InputGradient k =
      bn_math::input_gradient(f.alpha, inv, table[c], table[C + c], static_cast<int64_t>(table[2 * C]));
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float xv = to_float(x[row + i]);
    const float g = bn_math::masked_gradient(to_float(d_y[row + i]), xv,
                                             mask == bn_math::Mask::output ? to_float(y[row + i]) : 0.0f, f, mask);
    if (d_residual) d_residual[row + i] = from_float<S>(g);
    d_x[row + i] = from_float<S>(bn_math::d_input(g, xv, mean, f.alpha, k));
  }
}
}  // namespace bn_detail

template <int C, class S>
struct BatchNorm2d {
  static_assert(C > 0, "a BatchNorm needs a positive channel count");
  static_assert(C <= 65535, "eval-mode BatchNorm puts channels on the grid's y dimension");
  static_assert(is_storage_type<S>, "a BatchNorm stores float or bf16 activations");

  // Eval mode: y [C, B, H, W] = act(bn(x) [+ residual]) with the running statistics. y may be x.
  static void forward_eval(Context& ctx, S* y, const S* x, const S* gamma, const S* beta, const float* running_mean,
                           const float* running_var, int64_t batch, int64_t hw, Activation act,
                           const S* residual = nullptr) {
    const int64_t count = batch * hw;
    CLIP_CHECK(count > 0, "a BatchNorm needs values, got a batch of ", batch, " with ", hw, " pixels");
    const int64_t per_channel = (count + bn_detail::kEltThreads - 1) / bn_detail::kEltThreads;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(per_channel, 1024)), C);
    bn_detail::eval_kernel<S><<<grid, bn_detail::kEltThreads, 0, ctx.stream()>>>(
        y, x, gamma, beta, running_mean, running_var, count, act == Activation::relu, residual);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }

  // Train mode: batch statistics (biased variance) normalise x; save_mean / save_rstd [C] keep
  // them for backward; running_mean / running_var [C] are updated (momentum 0.1, unbiased
  // variance) unless update_running_stats is false. num_batches_tracked is the caller's (host).
  static void forward_train(Context& ctx, S* y, float* save_mean, float* save_rstd, const S* x, const S* gamma,
                            const S* beta, float* running_mean, float* running_var, int64_t batch, int64_t hw,
                            Activation act, const S* residual = nullptr, bool update_running_stats = true) {
    const int64_t count = batch * hw;
    CLIP_CHECK(count > 1, "train-mode BatchNorm needs more than one value per channel, got ", count);
    if (const BatchNormSyncScope* sync = BatchNormSyncScope::current()) {  // every process's statistics
      const int64_t n = int64_t{sync->world()} * 3 * C;
      double* table = sync->table(n);
      CLIP_CUDA_CHECK(cudaMemsetAsync(table, 0, sizeof(double) * n, ctx.stream()));
      bn_detail::stats_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
          table + int64_t{sync->rank()} * 3 * C, x, count, C);
      CLIP_CUDA_CHECK(cudaGetLastError());
      sync->sum(table, n);
      bn_detail::merged_train_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
          y, save_mean, save_rstd, table, sync->world(), C, x, gamma, beta, running_mean, running_var, count,
          act == Activation::relu, residual, update_running_stats);
      CLIP_CUDA_CHECK(cudaGetLastError());
      return;
    }
    bn_detail::train_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
        y, save_mean, save_rstd, x, gamma, beta, running_mean, running_var, count, act == Activation::relu, residual,
        update_running_stats);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }

  // Backward of train-mode y = act(bn(x) [+ residual]): d_x assigned (may alias x or d_y);
  // d_gamma, d_beta += (fp32); the ReLU's mask from y (y not null) or recomputed from x (y null:
  // the forward must have had no residual); d_residual (null: skipped; may alias d_y) = the
  // residual's gradient, the masked d_y.
  static void backward(Context& ctx, S* d_x, float* d_gamma, float* d_beta, const S* d_y, const S* x, const S* y,
                       const float* save_mean, const float* save_rstd, const S* gamma, const S* beta, int64_t batch,
                       int64_t hw, Activation act, S* d_residual = nullptr) {
    const int64_t count = batch * hw;
    CLIP_CHECK(count > 1, "train-mode BatchNorm needs more than one value per channel, got ", count);
    const bn_math::Mask mask = act == Activation::none ? bn_math::Mask::none
                               : y                     ? bn_math::Mask::output
                                                       : bn_math::Mask::input;
    if (const BatchNormSyncScope* sync = BatchNormSyncScope::current()) {  // every process's sums and count
      const int64_t n = 2 * int64_t{C} + 1;
      double* table = sync->table(n);
      bn_detail::sums_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
          table, d_gamma, d_beta, d_y, x, y, save_mean, save_rstd, gamma, beta, count, mask, C);
      CLIP_CUDA_CHECK(cudaGetLastError());
      sync->sum(table, n);
      bn_detail::input_gradient_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
          d_x, table, d_y, x, y, save_mean, save_rstd, gamma, beta, count, mask, C, d_residual);
      CLIP_CUDA_CHECK(cudaGetLastError());
      return;
    }
    bn_detail::backward_kernel<S><<<C, bn_detail::kRowThreads, 0, ctx.stream()>>>(
        d_x, d_gamma, d_beta, d_y, x, y, save_mean, save_rstd, gamma, beta, count, mask, d_residual);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace clip::cuda
