// Single-precision GEMM for the model's matrix products, row-major throughout:
//
//   gemm_nt:     y[M, N] (+)= x[M, K] * W^T   W stored [N, K]: a PyTorch nn.Linear weight
//   gemm_nn:     y[M, N] (+)= x[M, K] * P     P stored [K, N]: visual.proj / text_projection, or a
//                                             convolution as W[Cout, Cin*k*k] * im2col[Cin*k*k, pixels]
//   gemm_packed: y[M, N] (+)= x[M, K] * B     B packed once by PackedMatrix from either layout
//   gemm_tn:     y[M, N] (+)= x^T * P         x stored [K, M]: weight gradients dW = dY^T X and
//                                             the im2col gradient W^T dY of backward passes
//
// Every matrix has a leading dimension (row stride, in floats) so callers can address column
// slices (one head of a fused QKV output, a block of im2col columns). `accumulate` is beta:
// false writes y = x B, true adds x B to what y holds (a bias or a residual put there first).
// y must not overlap x or B.
//
// Why not Eigen: its GEMM leaves 25-40% of the FMA peak unused on these shapes. This is the
// GotoBLAS/BLIS scheme, written for AVX-512 and row-major output:
//
//   for jc in N by NC:                   one column block
//     for pc in K by KC:                 one depth block
//       pack B[pc:+KC, jc:+NC]           B block, KC x NC as NR-wide panels (1 MiB, stays in L2);
//                                        skipped for PackedMatrix
//       for ir in M by MR:
//         pack x[ir:+MR, pc:+KC]         A panel, MR x KC (14 KiB, stays in L1)
//         for jr in NC by NR:            B panels stream from L2, in address order
//           micro-kernel: y[MR, NR] (+)= A panel [MR, KC] * B panel [KC, NR]
//
// The micro-kernel keeps a 14 x 32 tile of y in 28 zmm registers. Per k it loads two vectors
// of B (32 consecutive columns of y) and broadcasts 14 values of A from the L1 panel: 28 FMAs,
// 14 cycles on the two FMA ports, with 16 loads (well under 3 per cycle). The broadcast side
// (A, 14 floats per k) is the one kept in L1 and the vector side (B, 128 bytes per k) streams
// from L2, as BLIS does on Skylake-X; the other order (a 32 KiB B panel in L1 under streaming A)
// measured slower, the 48 KiB L1 being too small for both. Alone, with its operands in L1/L2,
// the kernel runs at ~97% of the FMA peak. Row-major y makes N the vector direction: a tile row
// is two cache lines.
//
// Edges: rows are spread evenly over ceil(M / 14) panels (M = 400 is 29 panels of 13-14 rows,
// not 28 of 14 and one of 8), K over ceil(K / KC) equal depth blocks (576 = 3 x 192), and a last
// column panel narrower than 32 uses masked loads and stores of y (B is zero-padded).
//
// Packing B reads W or P from L3 or memory at ~0.35 ns per float (the bandwidth of one core):
// ~6% of the time at M = 400, ~30% at M = 50. PackedMatrix packs constant weights once and
// removes that. (Software prefetch of the next block's source into L2 during the current block
// measured slower: it competes with the B stream for fill buffers and for L2.)
//
// Threads: a static split of y into one rectangle per thread, each thread packing its own
// panels into its own thread_local buffers. There is no shared state and no waiting inside, so
// a thread slowed by other work on the machine delays only its own rectangle (the shared-pack
// schemes of Eigen and BLIS spin-wait and collapse under load, see linear.hpp). Splitting M
// makes each thread pack all of B, splitting N makes each pack all of x: the split is chosen to
// repack less (B costs ~2.5x x per float: it comes from memory, x from cache). Dynamic chunks
// (3 per thread) measured no better on idle cores and pay for the extra packing. Like every
// OpenMP fork-join, a call still waits for the second thread to be scheduled: with the other
// core busy in another process, that is the scheduler's latency (ms) per call. Called inside an
// OpenMP parallel region, or for products under 4 MFLOP, the GEMM runs on the calling thread.
//
// Exactness: each y element is summed in fp32 in the order k = 0, 1, ..., K-1, one depth block
// at a time added into y in order. The order depends on K alone, not on M, N, the thread count
// or the packing: results are bit-identical with 1 or 2 threads, packed or not, whole or sliced.
//
// Without AVX-512 the same functions run Eigen's GEMM (one single-threaded product per thread).
//
// bf16: inside a MatmulPrecisionScope(Precision::bf16) (ops/matmul_precision.hpp) the same calls
// round both operands to bf16 and sum in fp32, on the path cpu_isa() (ops/cpu_features.hpp)
// picks: AMX tiles (ops/gemm_bf16.hpp), or this fp32 GEMM on operands rounded to bf16 (same
// numbers, fp32 speed) on CPUs without AMX (AVX512-BF16 alone included: no vdpbf16ps kernel
// yet), and for gemm_packed's fp32 panels.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <utility>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "clip/core/bf16.hpp"
#include "clip/core/error.hpp"
#include "clip/ops/cpu_features.hpp"
#include "clip/ops/gemm_bf16.hpp"
#include "clip/ops/matmul_precision.hpp"

namespace clip {

// Block sizes, for a 48 KiB L1 and a 2 MiB L2 per core. KC is part of PackedMatrix's format.
namespace gemm_blocking {
inline constexpr int MR = 14;    // rows of the register tile (broadcast from A)
inline constexpr int NR = 32;    // columns of the register tile (two zmm of B)
inline constexpr int KC = 256;   // depth of a block: A panel 14 x 256 floats = 14 KiB in L1
inline constexpr int NC = 1024;  // columns of a B block: 256 x 1024 floats = 1 MiB in L2
// Products below this many flops (2 M N K) run on one thread: waking a second costs more.
inline constexpr int64_t parallel_min_flops = int64_t{1} << 22;
}  // namespace gemm_blocking

namespace detail::gemm {

using gemm_blocking::KC;
using gemm_blocking::MR;
using gemm_blocking::NC;
using gemm_blocking::NR;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Depth blocks: K cut into ceil(K / KC) blocks of equal size (576 = 3 x 192, not 256 + 256 + 64:
// a short block pays the load and store of y for few products). Depends on K alone.
inline int64_t depth_step(int64_t k) { return ceil_div(k, ceil_div(k, KC)); }

// 64-byte aligned float storage that only grows (one per thread and role, reused every call).
struct AlignedBuffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data;
  int64_t capacity = 0;

  float* get(int64_t floats) {
    if (floats > capacity) {
      const int64_t bytes = round_up(floats * int64_t{sizeof(float)}, 64);
      data.reset(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes))));
      if (!data) throw std::bad_alloc();
      capacity = bytes / int64_t{sizeof(float)};
    }
    return data.get();
  }
};
// One buffer per thread and role (a distinct number per use).
template <int Role>
float* thread_buffer(int64_t floats) {
  static thread_local AlignedBuffer buffer;
  return buffer.get(floats);
}
inline float* thread_a_buffer(int64_t floats) { return thread_buffer<0>(floats); }
inline float* thread_b_buffer(int64_t floats) { return thread_buffer<1>(floats); }

// Where B [K, N] lives.
enum class Layout {
  nt,      // W [N, K], B = W^T; ld = row stride of W
  nn,      // P [K, N], B = P;   ld = row stride of P
  packed,  // PackedMatrix panels; ld = N rounded up to NR
};
struct BSource {
  Layout layout;
  const float* data;
  int64_t ld;
};

#if defined(__AVX512F__)

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// r[i] (row i, 16 floats) becomes column i: r[j][i] = old r[i][j].
// (GCC 12 at -O2 flags the _mm512_undefined_ps inside the unpack intrinsics as uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved: t[2i] = r[2i][0] r[2i+1][0] r[2i][1] ...
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // groups of 4 rows: u[4i + c] holds column c of each 128-bit lane
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // u[4g + c], lane l (of 4) = rows 4g..4g+3 of column 4l + c.
  for (int c = 0; c < 4; ++c) {
    // Rows 0-7 and 8-15: lanes (0, 2) and (1, 3) of two row groups.
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);       // cols c, c+8  of rows 0-7
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);       // cols c+4, c+12
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);  // cols c, c+8 of rows 8-15
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);  // cols c+4, c+12
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}
#pragma GCC diagnostic pop

// Transposing copy: dst[j * dst_stride + i] = src[i * ld + j] for i < rows (<= 16), j < cols,
// written as whole groups of `width` (>= rows) lanes, lanes i >= rows set to zero.
inline void pack_transposed(const float* src, int64_t ld, int rows, int64_t cols, float* dst, int64_t dst_stride,
                            int width) {
  const __mmask16 store_mask = lanes(width);
  __m512 r[16];
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, cols - j0);
    const __mmask16 m = lanes(w);
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * ld + j0) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t j = 0; j < w; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * dst_stride, store_mask, r[j]);
  }
}

// A panel: rows x kc of x (rows <= MR) as dst[k * rows + i] = x[i, k].
inline void pack_a(const float* x, int64_t ldx, int rows, int64_t kc, float* dst) {
  pack_transposed(x, ldx, rows, kc, dst, rows, rows);
}

// The same panel from x stored transposed ([K, M], A[i, k] = x[k, i]): a copy of `rows` (<= MR <
// 16) floats per k, as one masked load and store (a memcpy call per k cost as much as the
// products at small M).
inline void pack_a_transposed(const float* x, int64_t ldx, int rows, int64_t kc, float* dst) {
  const __mmask16 m = lanes(rows);
  for (int64_t k = 0; k < kc; ++k) _mm512_mask_storeu_ps(dst + k * rows, m, _mm512_maskz_loadu_ps(m, x + k * ldx));
}

// B block from W [N, K] (NT), B[k, j] = W[j, k]: panel p holds columns [32p, 32p + 32) of the
// block as dst[p * kc * NR + k * NR + j], zero beyond the last column.
inline void pack_b_nt(const float* w, int64_t ldw, int64_t nc, int64_t kc, float* dst) {
  for (int64_t j = 0; j < nc; j += NR, dst += kc * NR) {
    for (int h = 0; h < NR; h += 16) {
      const int rows = static_cast<int>(std::clamp<int64_t>(nc - j - h, 0, 16));
      pack_transposed(w + (j + h) * ldw, ldw, rows, kc, dst + h, NR, 16);
    }
  }
}

// B block from P [K, N] (NN): the same format, filled row by row of P (sequential reads).
inline void pack_b_nn(const float* p, int64_t ldp, int64_t nc, int64_t kc, float* dst) {
  const int64_t full = nc / NR * NR, w = nc - full;
  const __mmask16 m0 = lanes(w), m1 = lanes(std::max<int64_t>(0, w - 16));
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = p + k * ldp;
    float* d = dst + k * NR;
    for (int64_t j = 0; j < full; j += NR, d += kc * NR) {
      _mm512_store_ps(d, _mm512_loadu_ps(src + j));
      _mm512_store_ps(d + 16, _mm512_loadu_ps(src + j + 16));
    }
    if (w) {
      _mm512_store_ps(d, _mm512_maskz_loadu_ps(m0, src + full));
      _mm512_store_ps(d + 16, _mm512_maskz_loadu_ps(m1, src + full + 16));
    }
  }
}

// The packed B block of rows [pc, pc + kc), columns [j, j + nc) (j a multiple of NR): packed
// into `buffer`, or found in place in a PackedMatrix.
inline const float* b_block(const BSource& b, int64_t pc, int64_t kc, int64_t j, int64_t nc, float* buffer) {
  switch (b.layout) {
    case Layout::nt:
      pack_b_nt(b.data + j * b.ld + pc, b.ld, nc, kc, buffer);
      return buffer;
    case Layout::nn:
      pack_b_nn(b.data + pc * b.ld + j, b.ld, nc, kc, buffer);
      return buffer;
    default:
      return b.data + pc * b.ld + j * kc;
  }
}

// y[R, 16 * V] (+)= A[R, kc] * B[kc, 16 * V]: A packed a[k * R + i], B packed b[k * NR + j]
// (64-byte aligned). The last of the V vectors of each y row is stored under `mask`.
// `load` adds to y (accumulate, or a later depth block); otherwise y is overwritten.
template <int R, int V>
inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict y,
                         int64_t ldy, bool load, __mmask16 mask) {
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  // Bring the y tile into L1 while the products run.
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(y + i * ldy), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(y + i * ldy + 16 * V - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
    a += R;
    b += NR;
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    float* yi = y + i * ldy;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? mask : __mmask16(0xFFFF);
      __m512 r = acc[i][v];
      if (load) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yi + 16 * v), r);
      _mm512_mask_storeu_ps(yi + 16 * v, m, r);
    }
  }
}

using Kernel = void (*)(int64_t, const float*, const float*, float*, int64_t, bool, __mmask16);

template <int V, int... I>
constexpr auto kernel_row(std::integer_sequence<int, I...>) {
  return std::array<Kernel, sizeof...(I)>{&micro_kernel<I + 1, V>...};
}
// kernels[V - 1][R - 1]: the micro-kernel for R rows and V vectors of columns.
inline constexpr std::array<std::array<Kernel, MR>, 2> kernels = {kernel_row<1>(std::make_integer_sequence<int, MR>{}),
                                                                  kernel_row<2>(std::make_integer_sequence<int, MR>{})};

// One thread's rectangle: y[m, n] (+)= x[m, k] * B[k, n0 : n0 + n].
inline void gemm_rect(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed,
                      const BSource& b, int64_t n0, float* y, int64_t ldy, bool accumulate) {
  const int64_t panels = ceil_div(m, MR);
  auto panel_row = [&](int64_t p) { return m * p / panels; };  // rows spread evenly
  const int64_t nc_max = round_up(ceil_div(n, ceil_div(n, NC)), NR);  // equal column blocks
  const int64_t kstep = depth_step(k);
  float* apanel = thread_a_buffer(int64_t{MR} * KC);
  float* bbuf = b.layout == Layout::packed ? nullptr : thread_b_buffer(KC * nc_max);

  for (int64_t jc = 0; jc < n; jc += nc_max) {
    const int64_t nc = std::min(nc_max, n - jc);
    for (int64_t pc = 0; pc < k; pc += kstep) {
      const int64_t kc = std::min(kstep, k - pc);
      const float* bpack = b_block(b, pc, kc, n0 + jc, nc, bbuf);
      const bool load = accumulate || pc > 0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t r = panel_row(p);
        const int rows = static_cast<int>(panel_row(p + 1) - r);
        if (x_transposed) pack_a_transposed(x + pc * ldx + r, ldx, rows, kc, apanel);
        else pack_a(x + r * ldx + pc, ldx, rows, kc, apanel);
        float* yr = y + r * ldy + jc;
        for (int64_t j = 0; j < nc; j += NR) {
          const int64_t w = std::min<int64_t>(NR, nc - j);
          const int v = w > 16 ? 2 : 1;
          kernels[v - 1][rows - 1](kc, apanel, bpack + j * kc, yr + j, ldy, load, lanes(w - 16 * (v - 1)));
        }
      }
    }
  }
}

#else  // no AVX-512: Eigen

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using StridedMap = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
using ConstStridedMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

inline void gemm_rect(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed,
                      const BSource& b, int64_t n0, float* y, int64_t ldy, bool accumulate) {
  StridedMap ys(y, m, n, Eigen::OuterStride<>(ldy));
  if (!accumulate) ys.setZero();
  auto product = [&](const auto& xs) {
    if (b.layout == Layout::nt)
      ys.noalias() += xs * ConstStridedMap(b.data + n0 * b.ld, n, k, Eigen::OuterStride<>(b.ld)).transpose();
    else  // nn, and PackedMatrix, which holds plain [K, N] here
      ys.noalias() += xs * ConstStridedMap(b.data + n0, k, n, Eigen::OuterStride<>(b.ld));
  };
  if (x_transposed) product(ConstStridedMap(x, k, m, Eigen::OuterStride<>(ldx)).transpose());
  else product(ConstStridedMap(x, m, k, Eigen::OuterStride<>(ldx)));
}

#endif  // __AVX512F__

inline int gemm_threads(int64_t m, int64_t n, int64_t k) {
#ifdef _OPENMP
  if (omp_in_parallel() || 2 * m * n * k < gemm_blocking::parallel_min_flops) return 1;
  return omp_get_max_threads();
#else
  (void)m, (void)n, (void)k;
  return 1;
#endif
}

// Thread grid tm x tn (tm * tn = threads) over y [m, n]: each thread packs the rows of x of its
// row share for each of the tn column shares (cost ~a per float) and the columns of B of its
// column share for each of the tm row shares (~b per float), so extra shares cost
// (tn - 1) a / n + (tm - 1) b / m relative to the flops. Shares are kept at least one panel.
inline std::pair<int, int> thread_grid(int threads, int64_t m, int64_t n, double a, double b) {
  std::pair<int, int> best{1, 1};
  double best_cost = 1e300;
  for (int tm = 1; tm <= threads; ++tm) {
    if (threads % tm) continue;
    const int tn = threads / tm;
    if ((tm > 1 && m < int64_t{tm} * MR) || (tn > 1 && n < int64_t{tn} * NR)) continue;
    const double cost = (tn - 1) * a / double(n) + (tm - 1) * b / double(m);
    if (cost < best_cost) best_cost = cost, best = {tm, tn};
  }
  return best;
}

// y[m, n] (+)= x[m, k] * B[k, n] in fp32, on the calling thread or split over the OpenMP threads.
inline void gemm_fp32(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed, const BSource& b,
                 float* y, int64_t ldy, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(y + i * ldy, y + i * ldy + n, 0.0f);
    return;
  }
  const int threads = gemm_threads(m, n, k);
  if (threads <= 1) {
    gemm_rect(m, n, k, x, ldx, x_transposed, b, 0, y, ldy, accumulate);
    return;
  }
#ifdef _OPENMP
  // Packing a float of B costs ~2.5x one of x (memory against cache); pre-packed B costs ~1x
  // (it is only read again).
  const double b_cost = b.layout == Layout::packed ? 1.0 : 2.5;
#pragma omp parallel num_threads(threads)
  {
    const auto [tm, tn] = thread_grid(omp_get_num_threads(), m, n, 1.0, b_cost);
    const int t = omp_get_thread_num(), i = t / tn, j = t % tn;
    const int64_t n_panels = ceil_div(n, NR);  // column shares in whole panels
    const int64_t m0 = m * i / tm, m1 = m * (i + 1) / tm;
    const int64_t n0 = std::min(n, n_panels * j / tn * NR), n1 = std::min(n, n_panels * (j + 1) / tn * NR);
    if (t < tm * tn && m0 < m1 && n0 < n1)
      gemm_rect(m1 - m0, n1 - n0, k, x_transposed ? x + m0 : x + m0 * ldx, ldx, x_transposed, b, n0,
                y + m0 * ldy + n0, ldy, accumulate);
  }
#endif
}

// dst = src rounded to bf16, `rows` rows of `cols` floats at row stride ld (dst packed, stride cols).
inline void round_rows_to_bf16(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
#pragma omp parallel for schedule(static) if (rows * cols >= (int64_t{1} << 16))
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = round_to_bf16(src[r * ld + c]);
}
inline float* thread_rounded_x_buffer(int64_t floats) { return thread_buffer<2>(floats); }
inline float* thread_rounded_b_buffer(int64_t floats) { return thread_buffer<3>(floats); }

// The bf16 product on AMX tiles: both operands packed per call (ops/gemm_bf16.hpp).
inline void gemm_bf16_tiles(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed,
                            const BSource& b, float* y, int64_t ldy, bool accumulate) {
  namespace t = detail::gemm_bf16;
  const t::Shape s{m, n, k};
  // bf16 buffers in the float buffers: two bf16 per float.
  auto* a = reinterpret_cast<uint16_t*>(thread_rounded_x_buffer((s.a_elements() + 1) / 2));
  auto* bp = reinterpret_cast<uint16_t*>(thread_rounded_b_buffer((s.b_elements() + 1) / 2));
  t::pack_a(x, ldx, x_transposed, s, a);
  t::pack_b_vnni(b.data, b.ld, b.layout == Layout::nt, s, bp);
#if CLIP_GEMM_HAS_AMX
  t::tile_product<t::AmxTileOps>(s, a, bp, y, ldy, accumulate, gemm_threads(m, n, k));
#else
  t::tile_product<t::EmulatedTileOps>(s, a, bp, y, ldy, accumulate, 1);
#endif
}

// The bf16 product on CPUs without AMX (or of gemm_packed's panels): the fp32 GEMM on copies of
// the operands rounded to bf16. Exact products, fp32 sums: the numbers of the bf16 instructions.
inline void gemm_bf16_rounded(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed,
                              const BSource& b, float* y, int64_t ldy, bool accumulate) {
  const int64_t x_rows = x_transposed ? k : m, x_cols = x_transposed ? m : k;
  float* xr = thread_rounded_x_buffer(x_rows * x_cols);
  round_rows_to_bf16(x, ldx, x_rows, x_cols, xr);
  BSource br = b;
  if (b.layout == Layout::packed) {  // panels of k rows of b.ld floats, zero padding stays zero
    br.data = thread_rounded_b_buffer(k * b.ld);
    round_rows_to_bf16(b.data, b.ld, k, b.ld, const_cast<float*>(br.data));
  } else {
    const int64_t rows = b.layout == Layout::nt ? n : k, cols = b.layout == Layout::nt ? k : n;
    float* dst = thread_rounded_b_buffer(rows * cols);
    round_rows_to_bf16(b.data, b.ld, rows, cols, dst);
    br = {b.layout, dst, cols};
  }
  gemm_fp32(m, n, k, xr, x_cols, x_transposed, br, y, ldy, accumulate);
}

// y[m, n] (+)= x[m, k] * B[k, n] in the calling thread's matmul_precision().
inline void gemm(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, bool x_transposed, const BSource& b,
                 float* y, int64_t ldy, bool accumulate) {
  if (matmul_precision() == Precision::fp32 || m <= 0 || n <= 0 || k <= 0) {
    gemm_fp32(m, n, k, x, ldx, x_transposed, b, y, ldy, accumulate);
    return;
  }
  if (CLIP_GEMM_HAS_AMX && cpu_isa() == CpuIsa::amx && b.layout != Layout::packed)  // not under nvcc
    gemm_bf16_tiles(m, n, k, x, ldx, x_transposed, b, y, ldy, accumulate);
  else
    gemm_bf16_rounded(m, n, k, x, ldx, x_transposed, b, y, ldy, accumulate);
}

}  // namespace detail::gemm

// A matrix B [K, N] packed once for gemm_packed: the panels of every (depth block, column
// panel) in the order the kernels read them, so calls skip packing B. For constant weights;
// worth most at small M (a batch of one image: packing is ~30% of a 50-row product). K x N
// floats rounded up to whole 32-column panels. Without AVX-512 it holds a plain [K, N] copy.
class PackedMatrix {
 public:
  PackedMatrix() = default;

  // B = W^T for W [N, K] row-major with row stride ldw (an nn.Linear weight).
  static PackedMatrix from_nt(const float* w, int64_t n, int64_t k, int64_t ldw) { return PackedMatrix(w, n, k, ldw, true); }
  // B = P for P [K, N] row-major with row stride ldp.
  static PackedMatrix from_nn(const float* p, int64_t k, int64_t n, int64_t ldp) { return PackedMatrix(p, n, k, ldp, false); }

  int64_t rows() const { return k_; }  // K
  int64_t cols() const { return n_; }  // N
  bool empty() const { return n_ == 0; }

  detail::gemm::BSource source() const {
#if defined(__AVX512F__)
    return {detail::gemm::Layout::packed, data_.data.get(), padded_n()};
#else
    return {detail::gemm::Layout::nn, data_.data.get(), n_};
#endif
  }

 private:
  int64_t padded_n() const { return detail::gemm::round_up(n_, gemm_blocking::NR); }

  PackedMatrix(const float* src, int64_t n, int64_t k, int64_t ld, bool nt) : n_(n), k_(k) {
    CLIP_CHECK(n > 0 && k > 0, "a packed matrix needs positive sizes, got ", k, " x ", n);
#if defined(__AVX512F__)
    using namespace detail::gemm;
    float* dst = data_.get(k * padded_n());
    const BSource b{nt ? Layout::nt : Layout::nn, src, ld};
    // Depth block at pc: kc x padded_n floats at dst + pc * padded_n, panels in column order.
    const int64_t kstep = depth_step(k);
    for (int64_t pc = 0; pc < k; pc += kstep) b_block(b, pc, std::min(kstep, k - pc), 0, n, dst + pc * padded_n());
#else
    float* dst = data_.get(k * n);
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < n; ++c) dst[r * n + c] = nt ? src[c * ld + r] : src[r * ld + c];
#endif
  }

  detail::gemm::AlignedBuffer data_;
  int64_t n_ = 0, k_ = 0;
};

// y[m, n] (+)= x[m, k] * w^T, w [n, k] row-major (an nn.Linear weight). Row strides ldx >= k,
// ldw >= k, ldy >= n. accumulate: y += x w^T, else y = x w^T.
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                    int64_t ldy, bool accumulate) {
  detail::gemm::gemm(m, n, k, x, ldx, false, {detail::gemm::Layout::nt, w, ldw}, y, ldy, accumulate);
}

// y[m, n] (+)= x[m, k] * p, p [k, n] row-major. Row strides ldx >= k, ldp >= n, ldy >= n.
inline void gemm_nn(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, const float* p, int64_t ldp, float* y,
                    int64_t ldy, bool accumulate) {
  detail::gemm::gemm(m, n, k, x, ldx, false, {detail::gemm::Layout::nn, p, ldp}, y, ldy, accumulate);
}

// y[m, n] (+)= x^T * p, x [k, m] and p [k, n] row-major. Row strides ldx >= m, ldp >= n, ldy >= n.
inline void gemm_tn(int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, const float* p, int64_t ldp, float* y,
                    int64_t ldy, bool accumulate) {
  detail::gemm::gemm(m, n, k, x, ldx, true, {detail::gemm::Layout::nn, p, ldp}, y, ldy, accumulate);
}

// y[m, b.cols()] (+)= x[m, b.rows()] * B, B packed by PackedMatrix. Row strides ldx >= K, ldy >= N.
inline void gemm_packed(int64_t m, const float* x, int64_t ldx, const PackedMatrix& b, float* y, int64_t ldy,
                        bool accumulate) {
  detail::gemm::gemm(m, b.cols(), b.rows(), x, ldx, false, b.source(), y, ldy, accumulate);
}

}  // namespace clip
