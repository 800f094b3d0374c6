// One GPU's execution context: the device, a stream every launcher enqueues on, the cuBLASLt
// handle and workspace, and the cache of GEMM plans (one per product shape, built on first use).
// A Context is created once per model or trainer and passed by reference to every launcher: no
// global device state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/cuda/gemm_plan.hpp"
#include "kernels/check.cuh"

namespace clip::cuda {

// The cuBLASLt objects of one GEMM shape (see GemmKey): built once by gemm.cuh, reused for every
// later product of that shape. Owns its descriptors.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;  // column-major A, B, C, D
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;  // what the chosen algorithm needs (<= the context's workspace)

  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    // Destructors do not throw: a failure to free a descriptor is ignored.
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// Plans by key. Plans are held by pointer so that references stay valid while the map grows.
class GemmPlans {
 public:
  // The plan for `key`, or null when none was built yet.
  GemmPlan* find(const GemmKey& key) {
    const auto it = plans_.find(key);
    return it == plans_.end() ? nullptr : it->second.get();
  }
  GemmPlan& insert(const GemmKey& key, std::unique_ptr<GemmPlan> plan) {
    auto& slot = plans_[key];
    slot = std::move(plan);
    return *slot;
  }
  size_t size() const { return plans_.size(); }
  void clear() { plans_.clear(); }

 private:
  std::unordered_map<GemmKey, std::unique_ptr<GemmPlan>, GemmKeyHash> plans_;
};

class Context {
 public:
  // cuBLASLt's recommended workspace on Hopper is 32 MiB (it lets split-K and stream-K kernels
  // run); smaller GPUs need less but the cost is one allocation.
  static constexpr size_t default_workspace_bytes = size_t{32} << 20;

  explicit Context(int device = 0, size_t workspace_bytes = default_workspace_bytes)
      : device_(device), workspace_bytes_(workspace_bytes) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess)
      CLIP_FAIL("no usable CUDA device: ", cudaGetErrorString(e),
                " (the CUDA path needs an NVIDIA GPU and driver; use Device::cpu otherwise)");
    CLIP_CHECK(count > 0, "no CUDA device on this machine (use Device::cpu)");
    CLIP_CHECK(device >= 0 && device < count, "CUDA device ", device, " does not exist: this machine has ", count,
               " device(s)");
    CLIP_CUDA_CHECK(cudaSetDevice(device));
    try {
      CLIP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      CLIP_CUBLAS_CHECK(cublasLtCreate(&lt_));
      if (workspace_bytes_ > 0) CLIP_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
    } catch (...) {
      release();
      throw;
    }
  }
  ~Context() { release(); }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t lt() const { return lt_; }

  // Device scratch of workspace_bytes(), 256-byte aligned. cuBLASLt uses it during a product; it
  // is stream-ordered, so any launcher on stream() may also use it as scratch between its own
  // kernels (column_sums_accumulate does). Its contents never survive a launcher call.
  void* workspace() { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

  GemmPlans& plans() { return plans_; }

  // Waits for all work on stream() and reports any asynchronous error.
  void synchronize() { CLIP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  void release() noexcept {
    plans_.clear();
    if (workspace_) cudaFree(workspace_);
    if (lt_) cublasLtDestroy(lt_);
    if (stream_) cudaStreamDestroy(stream_);
    workspace_ = nullptr;
    lt_ = nullptr;
    stream_ = nullptr;
  }

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  GemmPlans plans_;
};

}  // namespace clip::cuda
