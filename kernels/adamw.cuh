// Fused multi-tensor AdamW: one kernel launch per optimizer step over every trained tensor.
//
// The device keeps the model in flat buffers with shared offsets: the fp32 master weights, the
// fp32 gradients, the moments m and v (fp32), and the compute copy S the kernels read (float or
// bf16). The host cuts the trained tensors into chunks once (clip::build_chunk_table,
// include/clip/train/adamw_math.hpp); a thread block takes one chunk, so the step is a single
// launch however many tensors the model has, and every element is read and written once:
//
//   read p, g, m, v -> write p, m, v, g = 0, S(p)
//
// The arithmetic is clip::adamw_element, the function the CPU AdamW's scalar path calls and its
// AVX-512 loop mirrors, with explicitly rounded device intrinsics: in fp32 the master weights and
// moments are bit-identical to the CPU's (tests/cuda/test_cuda_train_ops.cu).
//
// What differs from the CPU AdamW (include/clip/train/adamw.hpp):
// - No quiet blocks. The CPU skips the moments of blocks whose g, m and v are all zero and only
//   decays p there (bandwidth on a CPU); that short path gives the same bits as the full update,
//   so the GPU just runs the full update everywhere.
// - Buffers (BatchNorm running statistics) are left alone because the caller does not list them;
//   their compute copy, if any, is the caller's business. Untrained gaps between tensors are not
//   read or written.
// - The step count, options and learning rate live on the host: the caller forms the step's
//   scalars with clip::adamw_scalars, exactly as AdamW::step does.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/train/adamw_math.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

// The chunk table of a model's trained tensors, on the device. Built once (it depends only on the
// layout); also owns the per-chunk partial sums of gradient_norm (kernels/grad_norm.cuh).
class MultiTensorTable {
 public:
  MultiTensorTable() = default;
  // `trained`: every trained tensor's (offset, numel, decay) in the flat buffers, in visit order.
  // `total_elements` (>= 0) is the flat buffers' size, checked. Uploads and waits for the copy.
  MultiTensorTable(Context& ctx, std::span<const clip::TensorSlice> trained, int64_t total_elements = -1,
                   int64_t chunk = clip::kMultiTensorChunk)
      : host_(clip::build_chunk_table(trained, chunk, total_elements)),
        device_(static_cast<int64_t>(host_.size())),
        partials_(static_cast<int64_t>(host_.size())) {
    CLIP_CHECK(host_.size() < (size_t{1} << 31), "the optimizer's chunk table has ", host_.size(),
               " chunks, more than one launch can take: use a larger chunk size");
    for (const clip::TensorChunk& c : host_) elements_ += c.length;
    device_.upload(host_.data(), static_cast<int64_t>(host_.size()), ctx.stream());
    CLIP_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  }

  const clip::TensorChunk* chunks() const { return device_.data(); }
  int64_t count() const { return static_cast<int64_t>(host_.size()); }
  int64_t elements() const { return elements_; }  // trained elements in all
  double* partials() { return partials_.data(); }  // [count()] scratch of gradient_norm
  const std::vector<clip::TensorChunk>& host_chunks() const { return host_; }

 private:
  std::vector<clip::TensorChunk> host_;
  DeviceBuffer<clip::TensorChunk> device_;
  DeviceBuffer<double> partials_;
  int64_t elements_ = 0;
};

namespace detail {

inline constexpr int kAdamWThreads = 256;

// One block per chunk; threads stride through it, so each warp reads and writes 128 contiguous
// bytes of each array per iteration (coalesced). The chunk's decay group picks the decay factor
// (1 for the no-decay group, as AdamW::step's without_decay). `compute` may alias `p` (S = float)
// or be null, so p is not __restrict__. `p_shifts` (null: none) puts chunk i's master weights
// p_shifts[i] floats after its g, m, v (ZeRO-1 with whole masters: a shard's packed moments, its
// weights in place); `compute_shifts` does the same for its compute copy (ZeRO-1 with sharded
// masters: p packed as g, m, v, its bf16 image in place in the layout).
template <class S>
__global__ void __launch_bounds__(kAdamWThreads)
    adamw_kernel(const clip::TensorChunk* __restrict__ chunks, float* p, float* __restrict__ g, float* __restrict__ m,
                 float* __restrict__ v, S* compute, clip::AdamWScalars s, const int64_t* __restrict__ p_shifts = nullptr,
                 const int64_t* __restrict__ compute_shifts = nullptr) {
  const clip::TensorChunk c = chunks[blockIdx.x];
  if (!c.decay) s.decay = 1.0f;
  float* const pc = p + c.offset + (p_shifts ? p_shifts[blockIdx.x] : 0);
  S* const sc = compute ? compute + c.offset + (compute_shifts ? compute_shifts[blockIdx.x] : 0) : nullptr;
  float* const gc = g + c.offset;
  float* const mc = m + c.offset;
  float* const vc = v + c.offset;
#pragma unroll 4
  for (int i = threadIdx.x; i < c.length; i += kAdamWThreads) {
    float pi = pc[i], gi = gc[i], mi = mc[i], vi = vc[i];
    clip::adamw_element(pi, gi, mi, vi, s);
    gc[i] = gi;  // 0: the gradient is consumed, ready for the next accumulation
    mc[i] = mi;
    vc[i] = vi;
    pc[i] = pi;
    if (sc) sc[i] = from_float<S>(pi);
  }
}

}  // namespace detail

// One AdamW step over every tensor of `table`: master, m, v updated in place, grad zeroed, the
// compute copy written (null: not written; it may be `master` itself when S = float).
// `s` holds the decay group's scalars (clip::adamw_scalars); the no-decay group uses decay = 1.
template <class S>
void adamw_step(Context& ctx, const MultiTensorTable& table, float* master, float* grad, float* m, float* v,
                S* compute, const clip::AdamWScalars& s) {
  static_assert(is_storage_type<S>, "the compute copy is float or bf16");
  if (table.count() == 0) return;
  CLIP_CHECK(master && grad && m && v, "adamw_step needs the master weights, gradients and both moments");
  detail::adamw_kernel<S><<<static_cast<unsigned>(table.count()), detail::kAdamWThreads, 0, ctx.stream()>>>(
      table.chunks(), master, grad, m, v, compute, s);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
