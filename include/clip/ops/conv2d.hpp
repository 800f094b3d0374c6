// Bias-free 2-D convolution (PyTorch's nn.Conv2d(bias=False)) as one matrix product per layer.
//
// Channels, kernel, stride and padding are template ints; batch and the spatial size are
// run-time values (the models pass their constexpr sizes). Weights keep PyTorch's layout
// [Cout, Cin, K, K], which read as a column-major [Cin*K*K, Cout] matrix is W^T without a copy.
//
// Activations are batches of C planes of H x W floats. `Planes` says where the planes lie, so the
// same code reads and writes PyTorch's NCHW and the channel-major CNHW ([C, B, H, W]) the
// ResNet uses inside: in CNHW the pixels of all images of a channel are one contiguous row, so a
// 1x1 convolution over the whole batch is a single GEMM and deep layers with 7x7 planes still
// give the GEMM B*49 columns instead of 49.
//
//   y[P, Cout] = col[P, Cin*K*K] * W^T[Cin*K*K, Cout]      (column-major; P = output pixels)
//
// col is im2col of the input (one row of the transposed view per (ci, ky, kx)); a 1x1 stride-1
// convolution reads the input directly. The output pixels are cut into blocks (about 2 MiB of
// im2col plus output, at least 512 pixels, at least one block per thread) that threads take one
// at a time: im2col, a single-threaded GEMM and the
// epilogue (BatchNorm, ReLU, residual) of a block all run while the block sits in that core's
// cache. Deep layers at small batch, with too few pixels to share, split output channels instead.
//
// Training: 3x3 stride-1 convolutions of channel-major planes run Winograd F(2x2, 3x3)
// (Winograd3x3) forward and backward; the others' backward is d_weight += dY col^T and
// d_x = col2im(W^T dY), blocked over pixels the same way, with threads split over input
// channels so that col2im's scatter-adds never race.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "clip/core/error.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/tensor/param.hpp"

namespace clip {

// Where element (n, c, y, x) of a batch of C planes of H x W lives:
// data[n * batch_stride + c * channel_stride + y * W + x]. Shared by conv2d, batchnorm and pool.
struct Planes {
  int64_t batch_stride;
  int64_t channel_stride;

  // PyTorch's layout, [B, C, H, W].
  static constexpr Planes nchw(int64_t channels, int64_t h, int64_t w) { return {channels * h * w, h * w}; }
  // Channel-major, [C, B, H, W]: each channel's pixels of the whole batch are one row.
  static constexpr Planes cnhw(int64_t batch, int64_t h, int64_t w) { return {h * w, batch * h * w}; }

  // Whether the images' planes of one channel abut, so a batch is one plane of B*H*W pixels.
  constexpr bool batch_contiguous(int64_t hw) const { return batch_stride == hw; }
  const float* plane(const float* data, int64_t n, int64_t c) const { return data + n * batch_stride + c * channel_stride; }
  float* plane(float* data, int64_t n, int64_t c) const { return data + n * batch_stride + c * channel_stride; }
};

namespace detail {
inline int conv_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}
inline int conv_threads_in_team() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}
inline int conv_thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
// Short spans (a row of 7 to 112 pixels) with masked AVX-512 loads and stores: a masked lane
// is neither read nor written, so spans may start or end anywhere.
// d[ox0, ox1) = src[ox] on [a, b) and 0 elsewhere (ox0 <= a <= b <= ox1).
inline void copy_span(float* d, const float* src, int ox0, int ox1, int a, int b) {
#if defined(__AVX512F__)
  for (int ox = ox0; ox < ox1; ox += 16) {
    const int n = std::min(16, ox1 - ox);
    const int lo = std::clamp(a - ox, 0, n), hi = std::clamp(b - ox, 0, n);
    const __mmask16 in = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    const __mmask16 all = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_mask_storeu_ps(d + ox, all, _mm512_maskz_loadu_ps(in, src + ox));
  }
#else
  std::fill(d + ox0, d + a, 0.0f);
  std::copy(src + a, src + b, d + a);
  std::fill(d + b, d + ox1, 0.0f);
#endif
}

// d[ox] += s[ox] for ox in [a, b).
inline void add_span(float* d, const float* s, int a, int b) {
#if defined(__AVX512F__)
  for (int ox = a; ox < b; ox += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min(16, b - ox)) - 1u);
    _mm512_mask_storeu_ps(d + ox, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + ox), _mm512_maskz_loadu_ps(m, s + ox)));
  }
#else
  for (int ox = a; ox < b; ++ox) d[ox] += s[ox];
#endif
}
// Runs of floats for the Winograd transforms' short rows (4 to 56 tiles): 16 lanes with masked
// loads and stores under AVX-512, one lane otherwise. V supports + and - either way.
struct Lanes {
#if defined(__AVX512F__)
  static constexpr int width = 16;
  using V = __m512;
  static __mmask16 mask(int n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }
  // The first min(n, width) floats at p (the rest read as 0 / are left alone).
  static V load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
#else
  static constexpr int width = 1;
  using V = float;
  static V load(const float* p, int) { return *p; }
  static void store(float* p, V v, int) { *p = v; }
#endif
};

// even[m] = src[2m] and odd[m] = src[2m + 1] for the n floats of src (a row of a plane); an
// element past the end of src reads as 0. Fills ceil(n / 2) even and floor(n / 2) odd values
// (and writes zeros up to the next multiple of 16 of each).
inline void deinterleave(const float* src, int n, float* even, float* odd) {
#if defined(__AVX512F__)
  const __m512i ei = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i oi = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int i = 0; i < n; i += 32) {
    const int left = n - i;
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u), src + i);
    const __m512 b = _mm512_maskz_loadu_ps(
        static_cast<__mmask16>(left >= 32 ? 0xFFFF : left <= 16 ? 0u : (1u << (left - 16)) - 1u), src + i + 16);
    _mm512_storeu_ps(even + i / 2, _mm512_permutex2var_ps(a, ei, b));
    _mm512_storeu_ps(odd + i / 2, _mm512_permutex2var_ps(a, oi, b));
  }
#else
  for (int m = 0; 2 * m < n; ++m) {
    even[m] = src[2 * m];
    odd[m] = 2 * m + 1 < n ? src[2 * m + 1] : 0.0f;
  }
#endif
}

// dst[2m] (+)= even[m] and dst[2m + 1] (+)= odd[m] for the n floats of dst.
inline void interleave(const float* even, const float* odd, int n, float* dst, bool accumulate) {
#if defined(__AVX512F__)
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int i = 0; i < n; i += 32) {
    const int left = n - i;
    const __mmask16 ma = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
    const __mmask16 mb = static_cast<__mmask16>(left >= 32 ? 0xFFFF : left <= 16 ? 0u : (1u << (left - 16)) - 1u);
    const __m512 e = _mm512_loadu_ps(even + i / 2), o = _mm512_loadu_ps(odd + i / 2);
    __m512 a = _mm512_permutex2var_ps(e, lo, o), b = _mm512_permutex2var_ps(e, hi, o);
    if (accumulate) {
      a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(ma, dst + i));
      b = _mm512_add_ps(b, _mm512_maskz_loadu_ps(mb, dst + i + 16));
    }
    _mm512_mask_storeu_ps(dst + i, ma, a);
    _mm512_mask_storeu_ps(dst + i + 16, mb, b);
  }
#else
  for (int i = 0; i < n; ++i) {
    const float v = i % 2 ? odd[i / 2] : even[i / 2];
    dst[i] = accumulate ? dst[i] + v : v;
  }
#endif
}
}  // namespace detail

// The epilogue that does nothing: the convolution's output is left as the product.
struct NoEpilogue {
  void operator()(float*, int64_t, int64_t, int64_t, int, int) const {}
};

// Bytes of im2col columns plus output that one thread keeps in flight (about its L2 cache).
inline constexpr int64_t kConvBlockBytes = int64_t{1} << 21;
// Below this many output pixels per thread, threads split the output channels instead.
inline constexpr int64_t kConvMinColumnsPerThread = 128;

// Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016) for a 3x3 convolution with stride 1 and padding 1 of channel-major
// ([C, B, H, W]) planes, used in training. Each 2x2 block of outputs (a "tile") comes from the
// 4x4 input patch d around it:
//   Y = A^T [ sum_ci (G g G^T) .* (B^T d B) ] A
// so a tile costs 16 multiplications per channel pair instead of 36, and the 16 elementwise
// products summed over channels are 16 GEMMs, xi = 0..15:
//   M[xi] [Cout, tiles] = U[xi] [Cout, Cin] V[xi] [Cin, tiles]      U = G g G^T, V = B^T d B
// Backward: the input gradient is the same convolution of dY with each kernel flipped and its
// channels swapped; the weight gradient is dW = G^T (sum over tiles of dM[xi] V[xi]^T) G with
// dM = A dY A^T. The transforms are additions (and halves in G), so results stay within a few
// float roundings of the direct product.
//
// Tiles are taken in blocks of whole tile rows (pairs of output rows, a contiguous run of output
// pixels) sized to keep the transformed blocks in the last-level cache. Within a block, threads
// split the transforms by channels and the 16 GEMMs between them, so the GEMMs run single-
// threaded with no waiting inside; two barriers per block.
template <int Cin, int Cout>
struct Winograd3x3 {
  // Floats of transformed tiles per block (V and M, and their gradients in backward): 8 MiB,
  // in the last-level cache; and at least this many tiles, the depth of the weight gradient's
  // products (measured: smaller blocks speed up the transforms of wide planes, but deep layers
  // with few pixels want long products).
  static constexpr int64_t kBlockFloats = int64_t{1} << 21;
  static constexpr int64_t kMinBlockTiles = 256;

  struct Geometry {
    int64_t batch;
    int h, w, th, tw;  // plane size, tile rows and tiles per row
    Geometry(int64_t batch, int h, int w) : batch(batch), h(h), w(w), th((h + 1) / 2), tw((w + 1) / 2) {}
    int64_t rows() const { return batch * th; }
    // First output pixel (over the batch) of tile row r; tile rows [r0, r1) cover the pixels
    // [first_pixel(r0), first_pixel(r1)).
    int64_t first_pixel(int64_t r) const { return r / th * h * w + int64_t{2} * (r % th) * w; }
    // Tile rows per block for `floats_per_tile` floats of transformed data per tile.
    int64_t block_rows(int64_t floats_per_tile) const {
      const int64_t fit = kBlockFloats / (floats_per_tile * tw), deep = (kMinBlockTiles + tw - 1) / tw;
      return std::clamp<int64_t>(std::max(fit, deep), 1, rows());
    }
  };

  // Scratch floats per thread for the transforms' rows: 16 rows of row_stride(w), each room for
  // a half row (plus one) rounded up to whole vectors, and one more float in front.
  static int row_stride(int w) { return ((w + 1) / 2 + 1 + 16 + 15) / 16 * 16; }
  static int64_t row_floats(int w) { return 16 * int64_t{row_stride(w)} + 16; }

  // y (+ epilogue, see Conv2d::forward) = conv(x), x and y channel-major planes of h x w.
  template <class Epilogue>
  static void forward(const float* x, const float* weight, float* y, int64_t batch, int h, int w,
                      std::vector<float>& scratch, const Epilogue& epilogue) {
    const Geometry g(batch, h, w);
    const int64_t cs = batch * h * w;  // channel stride
    const int threads = detail::conv_threads();
    const int64_t rows_per_block = g.block_rows(16 * (Cin + Cout));
    const int64_t nt_max = rows_per_block * g.tw;
    constexpr int64_t u_size = 16 * int64_t{Cin} * Cout;
    float* base = grow(scratch, u_size + 16 * (Cin + Cout) * nt_max + threads * row_floats(w));
    float* u = base;                           // [16][Cout][Cin]
    float* v = u + u_size;                     // [16][Cin][nt]
    float* m = v + 16 * int64_t{Cin} * nt_max;  // [16][Cout][nt]
    float* rows = m + 16 * int64_t{Cout} * nt_max;
    kernel_transform(weight, u, /*flipped=*/false);
    const Precision precision = matmul_precision();  // the workers run the caller's precision
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const MatmulPrecisionScope scope(precision);
      const int t = detail::conv_thread_id(), nth = detail::conv_threads_in_team();
      float* buf = rows + t * row_floats(w);
      for (int64_t r0 = 0; r0 < g.rows(); r0 += rows_per_block) {
        const int64_t r1 = std::min(g.rows(), r0 + rows_per_block), nt = (r1 - r0) * g.tw;
        for (int c = Cin * t / nth; c < Cin * (t + 1) / nth; ++c)
          input_transform(x + c * cs, g, r0, r1, v + c * nt, Cin * nt, buf);
#pragma omp barrier
        for (int xi = t; xi < 16; xi += nth)  // M[xi] = U[xi] V[xi]
          gemm_nn(Cout, nt, Cin, u + xi * u_size / 16, Cin, v + xi * Cin * nt, nt, m + xi * Cout * nt, nt,
                  /*accumulate=*/false);
#pragma omp barrier
        const int c0 = Cout * t / nth, c1 = Cout * (t + 1) / nth;
        for (int c = c0; c < c1; ++c) output_transform(m + c * nt, Cout * nt, g, r0, r1, y + c * cs, false, buf);
        if (c0 < c1) epilogue(y, cs, g.first_pixel(r0), g.first_pixel(r1) - g.first_pixel(r0), c0, c1);
      }
    }
  }

  // d_weight [Cout, Cin, 3, 3] += dW; d_x (when not null) = the input gradient (assigned, or
  // added into with `accumulate`). x, dy and d_x channel-major planes of h x w.
  static void backward(const float* x, const float* weight, const float* dy, float* d_weight, float* d_x,
                       int64_t batch, int h, int w, std::vector<float>& scratch, bool accumulate) {
    const Geometry g(batch, h, w);
    const int64_t cs = batch * h * w;
    const int threads = detail::conv_threads();
    const bool dx = d_x != nullptr;
    const int64_t rows_per_block = g.block_rows(16 * (Cin + Cout) * (dx ? 2 : 1));
    const int64_t nt_max = rows_per_block * g.tw;
    constexpr int64_t u_size = 16 * int64_t{Cin} * Cout;
    float* base = grow(scratch, 2 * u_size + 16 * (Cin + Cout) * nt_max * (dx ? 2 : 1) + threads * row_floats(w));
    float* du = base;                                   // [16][Cout][Cin]
    float* uf = du + u_size;                            // [16][Cout][Cin]: U of the flipped kernels
    float* v = uf + u_size;                             // [16][Cin][nt]   B^T x B
    float* dm = v + 16 * int64_t{Cin} * nt_max;          // [16][Cout][nt]  A dY A^T
    float* vdy = dm + 16 * int64_t{Cout} * nt_max;       // [16][Cout][nt]  B^T dY B (d_x only)
    float* mdx = vdy + (dx ? 16 * int64_t{Cout} * nt_max : 0);  // [16][Cin][nt] (d_x only)
    float* rows = mdx + (dx ? 16 * int64_t{Cin} * nt_max : 0);
    std::fill_n(du, u_size, 0.0f);
    if (dx) kernel_transform(weight, uf, /*flipped=*/true);
    const Precision precision = matmul_precision();  // the workers run the caller's precision
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const MatmulPrecisionScope scope(precision);
      const int t = detail::conv_thread_id(), nth = detail::conv_threads_in_team();
      float* buf = rows + t * row_floats(w);
      for (int64_t r0 = 0; r0 < g.rows(); r0 += rows_per_block) {
        const int64_t r1 = std::min(g.rows(), r0 + rows_per_block), nt = (r1 - r0) * g.tw;
        for (int c = Cin * t / nth; c < Cin * (t + 1) / nth; ++c)
          input_transform(x + c * cs, g, r0, r1, v + c * nt, Cin * nt, buf);
        for (int c = Cout * t / nth; c < Cout * (t + 1) / nth; ++c) {
          gradient_transform(dy + c * cs, g, r0, r1, dm + c * nt, Cout * nt, buf);
          if (dx) input_transform(dy + c * cs, g, r0, r1, vdy + c * nt, Cout * nt, buf);
        }
#pragma omp barrier
        for (int xi = t; xi < 16; xi += nth) {
          // dU[xi] += dM[xi] V[xi]^T;  M[xi] = U_flipped[xi] dY's V[xi] for d_x
          gemm_nt(Cout, Cin, nt, dm + xi * Cout * nt, nt, v + xi * Cin * nt, nt, du + xi * u_size / 16, Cin,
                  /*accumulate=*/true);
          if (dx)
            gemm_tn(Cin, nt, Cout, uf + xi * u_size / 16, Cin, vdy + xi * Cout * nt, nt, mdx + xi * Cin * nt, nt,
                    /*accumulate=*/false);
        }
#pragma omp barrier
        if (dx)
          for (int c = Cin * t / nth; c < Cin * (t + 1) / nth; ++c)
            output_transform(mdx + c * nt, Cin * nt, g, r0, r1, d_x + c * cs, accumulate, buf);
      }
    }
    weight_gradient(du, d_weight);
  }

 private:
  static float* grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) {
      v.clear();
      v.resize(n);
    }
    return v.data();
  }

  // u[xi][co][ci] = (G g G^T)[xi] of g = weight[co][ci] (3x3), or with `flipped` of g turned by
  // 180 degrees (the input gradient's kernel from channel co to ci).
  //   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
  static void kernel_transform(const float* weight, float* u, bool flipped) {
    constexpr int64_t plane = int64_t{Cin} * Cout;
    // 64 kernels at a time, read in order: their taps are gathered into g[tap][j] first, so that
    // the transform itself is a unit-stride (vectorised) loop with sequential stores.
    constexpr int chunk = 64;
#pragma omp parallel for schedule(static) if (plane >= 4096)
    for (int co = 0; co < Cout; ++co) {
      for (int j0 = 0; j0 < Cin; j0 += chunk) {
        const int n = std::min(chunk, Cin - j0);
        const float* k0 = weight + (int64_t{co} * Cin + j0) * 9;
        float g[9][chunk];
        for (int j = 0; j < n; ++j)
          for (int tap = 0; tap < 9; ++tap) g[tap][j] = k0[j * 9 + (flipped ? 8 - tap : tap)];
        float* out = u + int64_t{co} * Cin + j0;
#pragma omp simd
        for (int j = 0; j < n; ++j) {
          float gg[4][3];  // G g
          for (int b = 0; b < 3; ++b) {
            gg[0][b] = g[b][j];
            gg[1][b] = 0.5f * (g[b][j] + g[3 + b][j] + g[6 + b][j]);
            gg[2][b] = 0.5f * (g[b][j] - g[3 + b][j] + g[6 + b][j]);
            gg[3][b] = g[6 + b][j];
          }
          for (int i = 0; i < 4; ++i) {  // (G g) G^T
            out[(4 * i + 0) * plane + j] = gg[i][0];
            out[(4 * i + 1) * plane + j] = 0.5f * (gg[i][0] + gg[i][1] + gg[i][2]);
            out[(4 * i + 2) * plane + j] = 0.5f * (gg[i][0] - gg[i][1] + gg[i][2]);
            out[(4 * i + 3) * plane + j] = gg[i][2];
          }
        }
      }
    }
  }

  // d_weight[co][ci] += G^T dU[co][ci] G (3x3 from 4x4), du [16][Cout][Cin].
  static void weight_gradient(const float* du, float* d_weight) {
    constexpr int64_t plane = int64_t{Cin} * Cout;
#pragma omp parallel for schedule(static) if (plane >= 4096)
    for (int64_t k = 0; k < plane; ++k) {
      float d[4][4];
      for (int xi = 0; xi < 16; ++xi) d[xi / 4][xi % 4] = du[xi * plane + k];
      float p[3][4];  // G^T dU:  G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1]
      for (int j = 0; j < 4; ++j) {
        p[0][j] = d[0][j] + 0.5f * (d[1][j] + d[2][j]);
        p[1][j] = 0.5f * (d[1][j] - d[2][j]);
        p[2][j] = 0.5f * (d[1][j] + d[2][j]) + d[3][j];
      }
      float* out = d_weight + k * 9;  // k = co * Cin + ci
      for (int a = 0; a < 3; ++a) {
        out[a * 3 + 0] += p[a][0] + 0.5f * (p[a][1] + p[a][2]);
        out[a * 3 + 1] += 0.5f * (p[a][1] - p[a][2]);
        out[a * 3 + 2] += 0.5f * (p[a][1] + p[a][2]) + p[a][3];
      }
    }
  }

  // v[xi * xi_stride + (r - r0) * tw + tx] = (B^T d B)[xi] for tile tx of tile rows [r0, r1) of
  // one channel (x: its planes for the whole batch), d the 4x4 patch at rows 2ty-1..2ty+2 and
  // columns 2tx-1..2tx+2 (0 outside the plane).
  //   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
  // Each patch row is split into its even and odd columns (e[m] = column 2m-1, o[m] = column
  // 2m), so every step below is a unit-stride loop over the tiles of a row.
  static void input_transform(const float* x, const Geometry& g, int64_t r0, int64_t r1, float* v, int64_t xi_stride,
                              float* buf) {
    using L = detail::Lanes;
    using V = L::V;
    const int tw = g.tw, h = g.h, w = g.w;
    const int n = tw + 1;
    const int stride = row_stride(w);
    float* e[4];
    float* o[4];
    float* te[4];
    float* to[4];
    for (int k = 0; k < 4; ++k) {
      e[k] = buf + k * stride;  // e[k][0] = 0 (column -1), then the odd columns
      o[k] = buf + (4 + k) * stride;
      te[k] = buf + (8 + k) * stride;
      to[k] = buf + (12 + k) * stride;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int ty = static_cast<int>(r % g.th);
      const float* plane = x + r / g.th * h * w;
      for (int k = 0; k < 4; ++k) {
        const int iy = 2 * ty - 1 + k;
        if (iy < 0 || iy >= h) {
          std::fill_n(e[k], n, 0.0f);
          std::fill_n(o[k], n, 0.0f);
          continue;
        }
        // Columns 2m - 1 (e) and 2m (o): o takes the even columns, e the odd ones one place on.
        detail::deinterleave(plane + int64_t{iy} * w, w, o[k], e[k] + 1);
        e[k][0] = 0.0f;
        o[k][tw] = 0.0f;
        if (w % 2) e[k][tw] = 0.0f;  // column w (past the edge) when w is odd
      }
      // Rows of B^T d: d0 - d2, d1 + d2, d2 - d1, d1 - d3 (even and odd columns).
      for (int q = 0; q < n; q += L::width) {
        const V e0 = L::load(e[0] + q, n - q), e1 = L::load(e[1] + q, n - q);
        const V e2 = L::load(e[2] + q, n - q), e3 = L::load(e[3] + q, n - q);
        const V o0 = L::load(o[0] + q, n - q), o1 = L::load(o[1] + q, n - q);
        const V o2 = L::load(o[2] + q, n - q), o3 = L::load(o[3] + q, n - q);
        L::store(te[0] + q, e0 - e2, n - q), L::store(to[0] + q, o0 - o2, n - q);
        L::store(te[1] + q, e1 + e2, n - q), L::store(to[1] + q, o1 + o2, n - q);
        L::store(te[2] + q, e2 - e1, n - q), L::store(to[2] + q, o2 - o1, n - q);
        L::store(te[3] + q, e1 - e3, n - q), L::store(to[3] + q, o1 - o3, n - q);
      }
      // Times B: columns c0 - c2, c1 + c2, c2 - c1, c1 - c3 of each row, where a tile's columns
      // c0..c3 are e[q], o[q], e[q + 1], o[q + 1].
      float* out = v + (r - r0) * tw;
      for (int i = 0; i < 4; ++i) {
        float* v0 = out + (4 * i) * xi_stride;
        for (int q = 0; q < tw; q += L::width) {
          const int k = tw - q;
          const V c0 = L::load(te[i] + q, k), c1 = L::load(to[i] + q, k);
          const V c2 = L::load(te[i] + q + 1, k), c3 = L::load(to[i] + q + 1, k);
          L::store(v0 + q, c0 - c2, k);
          L::store(v0 + xi_stride + q, c1 + c2, k);
          L::store(v0 + 2 * xi_stride + q, c2 - c1, k);
          L::store(v0 + 3 * xi_stride + q, c1 - c3, k);
        }
      }
    }
  }

  // The output tiles of one channel from m[xi * xi_stride + (r - r0) * tw + tx]:
  //   Y = A^T M A,   A^T = [1 1 1 0; 0 1 -1 -1]
  // written (or added, with accumulate) into y, that channel's planes; pixels past the plane's
  // edge (odd sizes) are dropped.
  static void output_transform(const float* m, int64_t xi_stride, const Geometry& g, int64_t r0, int64_t r1, float* y,
                               bool accumulate, float* buf) {
    using L = detail::Lanes;
    using V = L::V;
    const int tw = g.tw, h = g.h, w = g.w;
    const int stride = row_stride(w);
    float* ev = buf;
    float* od = buf + stride;
    for (int64_t r = r0; r < r1; ++r) {
      const int ty = static_cast<int>(r % g.th);
      float* plane = y + r / g.th * h * w;
      const float* in = m + (r - r0) * tw;
      for (int a = 0; a < 2 && 2 * ty + a < h; ++a) {
        // Row a of A^T M: M0 + M1 + M2 or M1 - M2 - M3 (rows of 4 columns each), then times A:
        // columns s0 + s1 + s2 (even outputs) and s1 - s2 - s3 (odd).
        for (int q = 0; q < tw; q += L::width) {
          const int k = tw - q;
          V sj[4];
          for (int j = 0; j < 4; ++j) {
            const float* m0 = in + j * xi_stride + q;
            const V m1 = L::load(m0 + 4 * xi_stride, k), m2 = L::load(m0 + 8 * xi_stride, k);
            sj[j] = a == 0 ? L::load(m0, k) + m1 + m2 : m1 - m2 - L::load(m0 + 12 * xi_stride, k);
          }
          L::store(ev + q, sj[0] + sj[1] + sj[2], k);
          L::store(od + q, sj[1] - sj[2] - sj[3], k);
        }
        detail::interleave(ev, od, w, plane + int64_t{2 * ty + a} * w, accumulate);
      }
    }
  }

  // dm[xi * xi_stride + (r - r0) * tw + tx] = (A dY A^T)[xi] of each 2x2 tile of dY (0 past the
  // plane's edge): the gradient of M from that of Y = A^T M A.
  static void gradient_transform(const float* dy, const Geometry& g, int64_t r0, int64_t r1, float* dm,
                                 int64_t xi_stride, float* buf) {
    using L = detail::Lanes;
    using V = L::V;
    const int tw = g.tw, h = g.h, w = g.w;
    const int stride = row_stride(w);
    float* e[2] = {buf, buf + stride};
    float* o[2] = {buf + 2 * stride, buf + 3 * stride};
    for (int64_t r = r0; r < r1; ++r) {
      const int ty = static_cast<int>(r % g.th);
      const float* plane = dy + r / g.th * h * w;
      for (int a = 0; a < 2; ++a) {
        if (2 * ty + a >= h) {
          std::fill_n(e[a], tw, 0.0f);
          std::fill_n(o[a], tw, 0.0f);
          continue;
        }
        detail::deinterleave(plane + int64_t{2 * ty + a} * w, w, e[a], o[a]);  // odd w: o[a][tw - 1] = 0
      }
      // Rows of A dY: dy0, dy0 + dy1, dy0 - dy1, -dy1; times A^T: columns c0, c0 + c1, c0 - c1,
      // -c1 (c0, c1 the even and odd columns).
      float* out = dm + (r - r0) * tw;
      for (int q = 0; q < tw; q += L::width) {
        const int k = tw - q;
        const V e0 = L::load(e[0] + q, k), e1 = L::load(e[1] + q, k);
        const V o0 = L::load(o[0] + q, k), o1 = L::load(o[1] + q, k);
        const V re[4] = {e0, e0 + e1, e0 - e1, -e1};
        const V ro[4] = {o0, o0 + o1, o0 - o1, -o1};
        for (int i = 0; i < 4; ++i) {
          float* d0 = out + (4 * i) * xi_stride + q;
          L::store(d0, re[i], k);
          L::store(d0 + xi_stride, re[i] + ro[i], k);
          L::store(d0 + 2 * xi_stride, re[i] - ro[i], k);
          L::store(d0 + 3 * xi_stride, -ro[i], k);
        }
      }
    }
  }
};

template <int Cin, int Cout, int K, int Stride = 1, int Pad = 0>
struct Conv2d {
  static_assert(Cin > 0 && Cout > 0, "a convolution needs positive channel counts");
  static_assert(K > 0 && Stride > 0 && Pad >= 0, "a convolution needs a positive kernel and stride and a non-negative padding");

  static constexpr int in_channels = Cin;
  static constexpr int out_channels = Cout;
  static constexpr int kernel = K;
  static constexpr int stride = Stride;
  static constexpr int padding = Pad;
  static constexpr int64_t depth = int64_t{Cin} * K * K;     // GEMM inner dimension
  static constexpr bool direct = K == 1 && Stride == 1 && Pad == 0;  // no im2col needed
  static constexpr bool winograd = K == 3 && Stride == 1 && Pad == 1;  // training runs Winograd3x3

  using Weight = Param<Cout, Cin, K, K>;

  static constexpr int out_size(int in) { return (in + 2 * Pad - K) / Stride + 1; }

  // y (Cout planes of out_size(h) x out_size(w), layout yl) = conv(x (Cin planes of h x w, layout xl)),
  // then epilogue(y, yl.channel_stride, offset, cols, c0, c1) on each finished tile: channels
  // [c0, c1) of `cols` contiguous output pixels, element i of channel c at
  // y[offset + c * channel_stride + i] (a fused BatchNorm/ReLU/residual, see batchnorm.hpp).
  // `col` is scratch, grown as needed and reused across calls. Called inside a parallel region,
  // the convolution runs on the calling thread alone (and `col` must be that thread's own).
  template <class Epilogue = NoEpilogue>
  static void forward(const float* x, Planes xl, const Weight& weight, float* y, Planes yl, int64_t batch, int h, int w,
                      std::vector<float>& col, const Epilogue& epilogue = {}) {
    forward(x, xl, weight.data(), y, yl, batch, h, w, col, epilogue);
  }

  template <class Epilogue = NoEpilogue>
  static void forward(const float* x, Planes xl, const float* weight, float* y, Planes yl, int64_t batch, int h, int w,
                      std::vector<float>& col, const Epilogue& epilogue = {}) {
    CLIP_CHECK(h + 2 * Pad >= K && w + 2 * Pad >= K, "a ", K, "x", K, " convolution with padding ", Pad,
               " cannot run on a ", h, "x", w, " input");
    CLIP_CHECK(batch > 0, "a convolution needs a positive batch, got ", batch);
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, in_hw = int64_t{h} * w;

    // Segments: runs of output pixels whose planes are contiguous in y (and in x for a direct
    // conv): the whole batch in CNHW, one image in NCHW.
    const bool whole_batch = yl.batch_contiguous(out_hw) && (!direct || xl.batch_contiguous(in_hw));
    const int64_t segments = whole_batch ? 1 : batch;
    const int64_t seg_cols = whole_batch ? batch * out_hw : out_hw;
    const int threads = detail::conv_threads();

    if (segments * seg_cols >= threads * kConvMinColumnsPerThread) {
      // Threads take blocks of output pixels: im2col, GEMM and epilogue of a block stay in the
      // thread's cache, and the GEMMs run single-threaded with no synchronisation inside.
      int64_t block = kConvBlockBytes / (int64_t{sizeof(float)} * ((direct ? 0 : depth) + Cout));
      block = std::clamp<int64_t>(block, 512, 8192);  // >= 512: re-packing W per block stays cheap
      const int64_t per_thread = (segments * seg_cols + threads - 1) / threads;
      block = std::min(block, (per_thread + 15) / 16 * 16);  // at least one block per thread
      const int64_t blocks_per_seg = (seg_cols + block - 1) / block;
      const int64_t tasks = segments * blocks_per_seg;
      if (!direct && static_cast<int64_t>(col.size()) < threads * block * depth) {
        col.clear();
        col.resize(threads * block * depth);
      }
      const Precision precision = matmul_precision();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const MatmulPrecisionScope scope(precision);
        const int64_t s = t / blocks_per_seg, j0 = (t % blocks_per_seg) * block;
        const int64_t cols = std::min(block, seg_cols - j0);
        float* buffer = direct ? nullptr : col.data() + detail::conv_thread_id() * block * depth;
        tile(x, xl, weight, y, yl, h, w, s, j0, cols, 0, Cout, buffer, /*pack=*/true);
        epilogue(y, yl.channel_stride, s * yl.batch_stride + j0, cols, 0, Cout);
      }
    } else {
      // Few pixels (deep layers at small batch): one im2col, threads split the output channels.
      if (!direct && static_cast<int64_t>(col.size()) < seg_cols * depth) {
        col.clear();
        col.resize(seg_cols * depth);
      }
      const int groups = std::min(threads, Cout / 16 > 0 ? Cout / 16 : 1);
      const int per_group = (Cout / groups + 15) / 16 * 16;
      for (int64_t s = 0; s < segments; ++s) {
        if (!direct) im2col(x, xl, h, w, s * out_hw, seg_cols, 0, depth, col.data());
        const Precision precision = matmul_precision();
#pragma omp parallel for schedule(static) num_threads(groups) if (groups > 1)
        for (int g = 0; g < groups; ++g) {
          const MatmulPrecisionScope scope(precision);
          const int c0 = std::min(Cout, g * per_group), c1 = std::min(Cout, c0 + per_group);
          if (c0 >= c1) continue;
          tile(x, xl, weight, y, yl, h, w, s, 0, seg_cols, c0, c1, col.data(), /*pack=*/false);
          epilogue(y, yl.channel_stride, s * yl.batch_stride, seg_cols, c0, c1);
        }
      }
    }
  }

  // Output channels [c0, c1) of pixels [j0, j0 + cols) of segment s: y = col * W^T for that tile.
  // With `pack`, `buffer` receives the tile's im2col first; otherwise it already holds the
  // segment's whole im2col (columns from j0 = 0).
  static void tile(const float* x, Planes xl, const float* weight, float* y, Planes yl, int h, int w, int64_t s,
                   int64_t j0, int64_t cols, int c0, int c1, float* buffer, bool pack) {
    // Y[c1 - c0, cols] = W[c0:c1, depth] * X[depth, cols], rows of Y `channel_stride` apart.
    float* ys = y + s * yl.batch_stride + j0 + c0 * yl.channel_stride;
    const float* ws = weight + int64_t{c0} * depth;
    if constexpr (direct) {
      // X is the input itself: [Cin, pixels], planes `channel_stride` apart.
      gemm_nn(c1 - c0, cols, Cin, ws, depth, x + s * xl.batch_stride + j0, xl.channel_stride, ys, yl.channel_stride,
              /*accumulate=*/false);
    } else {
      // The segment starts at image s (per-image segments); the whole batch is segment 0.
      const int64_t out_hw = int64_t{out_size(h)} * out_size(w);
      if (pack) im2col(x, xl, h, w, s * out_hw + j0, cols, 0, depth, buffer, /*parallel=*/false);
      gemm_nn(c1 - c0, cols, depth, ws, depth, buffer, cols, ys, yl.channel_stride, /*accumulate=*/false);
    }
  }

  // The forward of training: Winograd F(2x2, 3x3) for a 3x3 stride-1 convolution of channel-
  // major planes (2.25x fewer multiplications; inference keeps forward's direct products), else
  // forward. Same arguments and epilogue as forward.
  template <class Epilogue = NoEpilogue>
  static void forward_train(const float* x, Planes xl, const float* weight, float* y, Planes yl, int64_t batch, int h,
                            int w, std::vector<float>& col, const Epilogue& epilogue = {}) {
    if constexpr (winograd) {
      const int64_t hw = int64_t{h} * w;
      if (batch > 0 && xl.batch_contiguous(hw) && yl.batch_contiguous(hw)) {
        Winograd3x3<Cin, Cout>::forward(x, weight, y, batch, h, w, col, epilogue);
        return;
      }
    }
    forward(x, xl, weight, y, yl, batch, h, w, col, epilogue);
  }

  // Backward of forward (and of forward_train) without an epilogue, from dy (Cout planes of
  // out_size(h) x out_size(w), layout dyl):
  //   d_weight [Cout, Cin, K, K] += dY col^T       (added into)
  //   d_x (Cin planes of h x w, layout dxl) = col2im(W^T dY)   (assigned; added into with
  //                                                 `accumulate`; skipped when d_x is null)
  // A direct 1x1 convolution is two GEMMs over all pixels (X itself is the im2col); a 3x3
  // stride-1 convolution of channel-major planes runs Winograd3x3::backward; the others
  // backward_im2col. `col` is scratch, grown as needed and reused. d_x must not
  // overlap x or dy. Called inside a parallel region, it runs on the calling thread alone.
  static void backward(const float* x, Planes xl, const float* weight, const float* dy, Planes dyl, float* d_weight,
                       float* d_x, Planes dxl, int64_t batch, int h, int w, std::vector<float>& col,
                       bool accumulate = false) {
    if constexpr (winograd) {
      const int64_t hw = int64_t{h} * w;
      if (batch > 0 && xl.batch_contiguous(hw) && dyl.batch_contiguous(hw) && (!d_x || dxl.batch_contiguous(hw))) {
        Winograd3x3<Cin, Cout>::backward(x, weight, dy, d_weight, d_x, batch, h, w, col, accumulate);
        return;
      }
    }
    backward_im2col(x, xl, weight, dy, dyl, d_weight, d_x, dxl, batch, h, w, col, accumulate);
  }

  // backward without Winograd. Apart from a direct convolution's two GEMMs, it runs through
  // im2col: each thread takes a group of input channels (of im2col rows when there is no d_x)
  // and runs through the output pixels in blocks: im2col of its rows,
  // d_weight's columns of those rows += dY col^T, col = W^T dY for its rows, then col2im
  // scatter-adds them into its own channels' planes. No two threads write the same float,
  // d_weight needs no per-thread copy, and the scratch is one block per thread.
  static void backward_im2col(const float* x, Planes xl, const float* weight, const float* dy, Planes dyl,
                              float* d_weight, float* d_x, Planes dxl, int64_t batch, int h, int w,
                              std::vector<float>& col, bool accumulate = false) {
    CLIP_CHECK(h + 2 * Pad >= K && w + 2 * Pad >= K, "a ", K, "x", K, " convolution with padding ", Pad,
               " cannot run on a ", h, "x", w, " input");
    CLIP_CHECK(batch > 0, "a convolution needs a positive batch, got ", batch);
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo, in_hw = int64_t{h} * w;

    if constexpr (direct) {
      // Y[Cout, pixels] = W[Cout, Cin] X[Cin, pixels]: dW += dY X^T, dX = W^T dY.
      const bool whole = xl.batch_contiguous(in_hw) && dyl.batch_contiguous(out_hw) &&
                         (!d_x || dxl.batch_contiguous(in_hw));
      const int64_t segments = whole ? 1 : batch, cols = whole ? batch * in_hw : in_hw;
      for (int64_t s = 0; s < segments; ++s) {
        const float* dys = dy + s * dyl.batch_stride;
        gemm_nt(Cout, Cin, cols, dys, dyl.channel_stride, x + s * xl.batch_stride, xl.channel_stride, d_weight, Cin,
                /*accumulate=*/true);
        if (d_x)
          gemm_tn(Cin, cols, Cout, weight, Cin, dys, dyl.channel_stride, d_x + s * dxl.batch_stride, dxl.channel_stride,
                  accumulate);
      }
    } else {
      // Segments as in forward: the whole batch when dy's planes abut, else one image each.
      const bool whole = dyl.batch_contiguous(out_hw);
      const int64_t segments = whole ? 1 : batch, seg_cols = whole ? batch * out_hw : out_hw;
      const int threads = detail::conv_threads();
      // Work units: input channels when d_x is written (col2im of a channel's rows touches only
      // its planes), else single im2col rows.
      constexpr int64_t row_unit = K * K;
      const int64_t units = d_x ? Cin : depth;
      const int groups = static_cast<int>(std::min<int64_t>(threads, units));
      auto first_row = [&](int g) { return units * g / groups * (d_x ? row_unit : 1); };
      int64_t rows_max = 0;
      for (int g = 0; g < groups; ++g) rows_max = std::max(rows_max, first_row(g + 1) - first_row(g));
      // Pixel block: about kConvBlockBytes of im2col rows per thread, and at least 256 pixels
      // (the depth of the d_weight GEMM, whose output is re-read once per block).
      int64_t block = kConvBlockBytes / (int64_t{sizeof(float)} * rows_max);
      block = std::clamp<int64_t>(block, 256, 8192);
      block = std::min(seg_cols, (block + 15) / 16 * 16);
      const int64_t blocks_per_seg = (seg_cols + block - 1) / block;
      if (static_cast<int64_t>(col.size()) < groups * rows_max * block) {
        col.clear();
        col.resize(groups * rows_max * block);
      }
      const Precision precision = matmul_precision();
#pragma omp parallel for schedule(static, 1) num_threads(groups) if (groups > 1)
      for (int g = 0; g < groups; ++g) {
        const MatmulPrecisionScope scope(precision);
        const int64_t r0 = first_row(g), r1 = first_row(g + 1), rows = r1 - r0;
        float* buffer = col.data() + g * rows_max * block;
        if (d_x && !accumulate)
          for (int64_t n = 0; n < batch; ++n)
            for (int64_t ci = r0 / row_unit; ci < r1 / row_unit; ++ci)
              std::fill_n(dxl.plane(d_x, n, ci), in_hw, 0.0f);
        for (int64_t t = 0; t < segments * blocks_per_seg; ++t) {
          const int64_t s = t / blocks_per_seg, j0 = (t % blocks_per_seg) * block;
          const int64_t cols = std::min(block, seg_cols - j0);
          const int64_t first = s * out_hw + j0;  // pixel index over the batch
          const float* dys = dy + s * dyl.batch_stride + j0;  // dY[Cout, cols], rows channel_stride apart
          im2col(x, xl, h, w, first, cols, r0, r1, buffer, /*parallel=*/false);
          // d_weight[:, r0:r1] += dY[Cout, cols] col[rows, cols]^T
          gemm_nt(Cout, rows, cols, dys, dyl.channel_stride, buffer, cols, d_weight + r0, depth, /*accumulate=*/true);
          if (!d_x) continue;
          // col[rows, cols] = W[:, r0:r1]^T dY (W [Cout, depth] read as x^T)
          gemm_tn(rows, cols, Cout, weight + r0, depth, dys, dyl.channel_stride, buffer, cols, /*accumulate=*/false);
          col2im(buffer, h, w, first, cols, r0, r1, d_x, dxl);
        }
      }
    }
  }

  // The adjoint of im2col: d_x[tap of (r, j)] += col[(r - r0) * cols + j] for the same rows and
  // pixels (taps in the padding are dropped). Rows of one channel write only that channel.
  static void col2im(const float* col, int h, int w, int64_t first, int64_t cols, int64_t r0, int64_t r1, float* d_x,
                     Planes xl) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = col + (r - r0) * cols;
      for_each_run(r, h, w, first, cols, [&](int64_t n, int ci, int iy, int ox0, int ox1, int a, int b, int64_t at) {
        if (iy < 0) return;
        const float* s = src + at - ox0;                                      // s[ox] is column (n, oy, ox)
        float* dst = xl.plane(d_x, n, ci) + int64_t{iy} * w + (r % K) - Pad;  // dst[ox * Stride]
        (void)ox1;
        if constexpr (Stride == 1) {
          detail::add_span(dst, s, a, b);
        } else {
          for (int ox = a; ox < b; ++ox) dst[ox * Stride] += s[ox];
        }
      });
    }
  }

  // col[r * cols + j] for rows r = (ci, ky, kx) in [r0, r1) and output pixel j = first + 0..cols-1
  // of the batch (pixel index n * Ho * Wo + oy * Wo + ox): the input value under that tap, 0 in
  // the padding.
  static void im2col(const float* x, Planes xl, int h, int w, int64_t first, int64_t cols, int64_t r0, int64_t r1,
                     float* col, bool parallel = true) {
#pragma omp parallel for schedule(static) if (parallel && (r1 - r0) * cols >= (int64_t{1} << 16))
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = col + (r - r0) * cols;
      for_each_run(r, h, w, first, cols, [&](int64_t n, int ci, int iy, int ox0, int ox1, int a, int b, int64_t at) {
        float* d = dst + at - ox0;  // d[ox] is column (n, oy, ox)
        if (iy < 0) {
          std::fill(d + ox0, d + ox1, 0.0f);
          return;
        }
        const float* src = xl.plane(x, n, ci) + int64_t{iy} * w + (r % K) - Pad;  // src[ox * Stride]
        if constexpr (Stride == 1) {
          detail::copy_span(d, src, ox0, ox1, a, b);
        } else {
          std::fill(d + ox0, d + a, 0.0f);
          for (int ox = a; ox < b; ++ox) d[ox] = src[ox * Stride];
          std::fill(d + b, d + ox1, 0.0f);
        }
      });
    }
  }

  // Calls f(n, ci, iy, ox0, ox1, a, b, at) for each run of im2col row r's pixels [first, first +
  // cols) that lie on one output row (n, oy): output columns [ox0, ox1), of which [a, b) have
  // their tap inside the input row iy (iy = -1 when the tap's row is in the padding), starting
  // at column `at` of the row. One division per call, none per run (rows are 7 to 112 pixels).
  template <class F>
  static void for_each_run(int64_t r, int h, int w, int64_t first, int64_t cols, F&& f) {
    const int ho = out_size(h), wo = out_size(w);
    const int64_t out_hw = int64_t{ho} * wo;
    const int ci = static_cast<int>(r / (K * K));
    const int ky = static_cast<int>(r / K % K), kx = static_cast<int>(r % K);
    // Output columns whose tap lies inside the input: ox in [lo, hi).
    const int lo = Pad - kx <= 0 ? 0 : std::min(wo, (Pad - kx + Stride - 1) / Stride);
    const int last = w - 1 + Pad - kx;  // ox * Stride <= last
    const int hi = last < 0 ? lo : std::max(lo, std::min(wo, last / Stride + 1));
    int64_t n = first / out_hw;
    const int64_t rem = first % out_hw;
    int oy = static_cast<int>(rem / wo), ox0 = static_cast<int>(rem % wo);
    for (int64_t at = 0; at < cols;) {
      const int ox1 = static_cast<int>(std::min<int64_t>(wo, ox0 + (cols - at)));
      const int iy = oy * Stride + ky - Pad;
      const bool inside = iy >= 0 && iy < h;
      f(n, ci, inside ? iy : -1, ox0, ox1, std::clamp(lo, ox0, ox1), std::clamp(hi, ox0, ox1), at);
      at += ox1 - ox0;
      ox0 = 0;
      if (++oy == ho) oy = 0, ++n;
    }
  }
};

// A direct loop over every output and tap (no GEMM), for tests.
template <int Cin, int Cout, int K, int Stride = 1, int Pad = 0>
void conv2d_reference(const float* x, Planes xl, const float* weight, float* y, Planes yl, int64_t batch, int h, int w) {
  using C = Conv2d<Cin, Cout, K, Stride, Pad>;
  const int ho = C::out_size(h), wo = C::out_size(w);
  for (int64_t n = 0; n < batch; ++n)
    for (int co = 0; co < Cout; ++co)
      for (int oy = 0; oy < ho; ++oy)
        for (int ox = 0; ox < wo; ++ox) {
          double acc = 0;
          for (int ci = 0; ci < Cin; ++ci)
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) {
                const int iy = oy * Stride + ky - Pad, ix = ox * Stride + kx - Pad;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                acc += double(weight[((int64_t{co} * Cin + ci) * K + ky) * K + kx]) * xl.plane(x, n, ci)[iy * w + ix];
              }
          yl.plane(y, n, co)[oy * wo + ox] = static_cast<float>(acc);
        }
}

}  // namespace clip
