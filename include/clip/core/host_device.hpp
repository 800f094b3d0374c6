// CLIP_HOST_DEVICE marks scalar math that the CPU ops and the CUDA kernels share, so that both
// back ends compute an element the same way. Under g++ it expands to nothing.
#pragma once

#if defined(__CUDACC__)
#define CLIP_HOST_DEVICE __host__ __device__
#else
#define CLIP_HOST_DEVICE
#endif
