// Device memory: DeviceBuffer<T> owns one allocation of n elements; Arena hands out pieces of one
// allocation planned up front, so that a training step allocates nothing.
//
// The arena is used in two passes with the same sequence of take() calls:
//
//   Arena plan = Arena::planner();          // counts bytes, allocates nothing, take() returns null
//   Acts sizing(plan, capacity, training);
//   Arena arena(plan.used());               // one cudaMalloc
//   Acts acts(arena, capacity, training);   // real pointers, 256-byte aligned
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "kernels/check.cuh"

namespace clip::cuda {

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t n = 0) : size_(n) {
    CLIP_CHECK(n >= 0, "a device buffer cannot have ", n, " elements");
    if (n > 0) CLIP_CUDA_CHECK(cudaMalloc(&data_, static_cast<size_t>(n) * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      if (data_) cudaFree(data_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }
  size_t bytes() const { return static_cast<size_t>(size_) * sizeof(T); }

  // Copies n elements from host memory, enqueued on s (host memory must stay alive until the
  // copy is done: synchronize before freeing it, or use pinned memory that outlives the stream).
  void upload(const T* host, int64_t n, cudaStream_t s) {
    CLIP_CHECK(n >= 0 && n <= size_, "cannot upload ", n, " elements into a device buffer of ", size_);
    if (n > 0)
      CLIP_CUDA_CHECK(cudaMemcpyAsync(data_, host, static_cast<size_t>(n) * sizeof(T), cudaMemcpyHostToDevice, s));
  }
  // Copies the first n elements to host memory and waits for the copy (the host reads it next).
  void download(T* host, int64_t n, cudaStream_t s) const {
    CLIP_CHECK(n >= 0 && n <= size_, "cannot download ", n, " elements from a device buffer of ", size_);
    if (n > 0) {
      CLIP_CUDA_CHECK(cudaMemcpyAsync(host, data_, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost, s));
      CLIP_CUDA_CHECK(cudaStreamSynchronize(s));
    }
  }
  // All bytes zero (0.0 for float and bf16), enqueued on s.
  void zero(cudaStream_t s) {
    if (size_ > 0) CLIP_CUDA_CHECK(cudaMemsetAsync(data_, 0, bytes(), s));
  }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

class Arena {
 public:
  static constexpr size_t alignment = 256;  // cuBLASLt's preferred alignment; also a cache sector pair

  // An empty arena: take() of anything but zero elements fails. Assign Arena(bytes) to it.
  Arena() = default;
  // One allocation of `bytes` bytes.
  explicit Arena(size_t bytes) : capacity_(bytes) {
    if (bytes > 0) CLIP_CUDA_CHECK(cudaMalloc(&base_, bytes));
  }
  // A planning arena: take() counts what it would hand out and returns null.
  static Arena planner() {
    Arena a;
    a.planning_ = true;
    return a;
  }

  ~Arena() {
    if (base_) cudaFree(base_);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept
      : base_(std::exchange(o.base_, nullptr)),
        capacity_(std::exchange(o.capacity_, 0)),
        used_(std::exchange(o.used_, 0)),
        planning_(std::exchange(o.planning_, false)) {}
  Arena& operator=(Arena&& o) noexcept {
    if (this != &o) {
      if (base_) cudaFree(base_);
      base_ = std::exchange(o.base_, nullptr);
      capacity_ = std::exchange(o.capacity_, 0);
      used_ = std::exchange(o.used_, 0);
      planning_ = std::exchange(o.planning_, false);
    }
    return *this;
  }

  // n elements of T, 256-byte aligned; null in planning mode. Fails when the arena is full
  // (the planning pass and the real pass took different sizes).
  template <class T>
  T* take(int64_t n) {
    CLIP_CHECK(n >= 0, "cannot take ", n, " elements from an arena");
    const size_t offset = (used_ + alignment - 1) / alignment * alignment;
    const size_t end = offset + static_cast<size_t>(n) * sizeof(T);
    if (planning_) {
      used_ = end;
      return nullptr;
    }
    CLIP_CHECK(end <= capacity_, "the arena of ", capacity_, " bytes is full: ", end,
               " bytes requested (was it planned with the same sizes?)");
    used_ = end;
    return reinterpret_cast<T*>(static_cast<char*>(base_) + offset);
  }

  // Bytes handed out so far (in planning mode: the size to allocate, Arena(planner.used())).
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  bool planning() const { return planning_; }
  // Hands out the same memory again from the start (pointers taken before become reused).
  void reset() { used_ = 0; }

 private:
  void* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
  bool planning_ = false;
};

}  // namespace clip::cuda
