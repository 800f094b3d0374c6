// Error checks for the CUDA runtime and cuBLASLt. A failing call throws clip::Error whose message
// holds the call's text, the library's own error string and file:line, so a failure on a GPU
// machine can be read from a test log without a debugger.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "clip/core/error.hpp"

// expr: a CUDA runtime call returning cudaError_t.
#define CLIP_CUDA_CHECK(expr)                                                                     \
  do {                                                                                            \
    const cudaError_t clip_cuda_status_ = (expr);                                                 \
    if (clip_cuda_status_ != cudaSuccess)                                                         \
      CLIP_FAIL("CUDA call failed: ", #expr, ": ", cudaGetErrorName(clip_cuda_status_), " (",     \
                cudaGetErrorString(clip_cuda_status_), ")");                                      \
  } while (0)

// expr: a cuBLAS / cuBLASLt call returning cublasStatus_t.
#define CLIP_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                            \
    const cublasStatus_t clip_cublas_status_ = (expr);                                            \
    if (clip_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                             \
      CLIP_FAIL("cuBLAS call failed: ", #expr, ": ", cublasLtGetStatusName(clip_cublas_status_), \
                " (", cublasLtGetStatusString(clip_cublas_status_), ")");                         \
  } while (0)
