// bf16 matrix products on AMX tiles: y[M, N] (+)= x[M, K] * B[K, N], operands rounded to bf16
// (round to nearest even), sums in fp32. ops/gemm.hpp calls this inside a bf16
// MatmulPrecisionScope when cpu_isa() is amx; the other paths are there too.
//
// Tiles (palette 1): 8 registers of 16 rows x 64 bytes. tdpbf16ps C, A, B adds to C[16, 16]
// (fp32) the product of A[16, 32] (bf16, row-major) and B[32, 16] stored as 16 rows of 16 pairs:
// row r holds B[2r, c] and B[2r + 1, c] side by side for c = 0..15 (the "VNNI" layout, pairs
// interleaved along K). The kernel keeps a 32 x 32 block of y in tiles 0-3, loads two A tiles
// (4, 5) and two B tiles (6, 7) per 32 steps of K: 4 tile products per 4 loads.
//
//   A: x converted to bf16 per call, [Mp, Kp] row-major (Mp, Kp rounded up to 32, zero-padded):
//      a tile is 16 rows of it, 64 bytes each, at row stride 2 Kp bytes
//   B: packed into VNNI panels of 16 columns, [Kp / 2, 16 pairs] each: a tile is 16 consecutive
//      rows of a panel (1 KiB, contiguous). Packed per call for now, weights included: packing
//      them once at load is the next step, to be measured on an AMX machine.
//
// Exactness: a product of two bf16 is exact in fp32; each y element sums K such products in fp32
// in an order that depends on K alone (tile step by tile step), not on the threads.
//
// The tile instructions sit behind a TileOps policy: AmxTileOps (the hardware, x86-64 g++ only,
// never nvcc, which breaks on the AMX headers) and EmulatedTileOps (the same instructions as
// defined in Intel's SDM, in plain C++), so the packing and the loops are tested on any CPU. The
// hardware rounds the sums inside one tile product its own way (not the SDM's sequential order:
// tests/test_gemm_bf16.cpp), so the two agree to the error model, not bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define CLIP_GEMM_HAS_AMX 1
#include <immintrin.h>
#else
#define CLIP_GEMM_HAS_AMX 0
#endif

#include "clip/core/bf16.hpp"

namespace clip::detail::gemm_bf16 {

inline constexpr int tile_rows = 16;  // rows of a tile; columns of a C tile
inline constexpr int tile_k = 32;     // bf16 per A tile row (64 bytes)
inline constexpr int block = 32;      // the 2 x 2 tiles of y the kernel holds
inline constexpr int64_t panel_pair_floats = tile_rows * 2;  // bf16 per VNNI panel row (16 pairs)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Sizes of the packed operands of an [M, K] x [K, N] product.
struct Shape {
  int64_t m, n, k;
  int64_t mp() const { return round_up(m, block); }
  int64_t kp() const { return round_up(k, tile_k); }
  int64_t panels() const { return round_up(n, block) / tile_rows; }  // even: blocks are 2 panels
  int64_t a_elements() const { return mp() * kp(); }
  int64_t b_elements() const { return panels() * kp() / 2 * panel_pair_floats; }
};

// A [Mp, Kp] bf16 row-major from x [M, K] (x_transposed: x stored [K, M]), zero beyond M and K.
inline void pack_a(const float* x, int64_t ldx, bool x_transposed, const Shape& s, uint16_t* dst) {
  const int64_t kp = s.kp();
#pragma omp parallel for schedule(static) if (s.m * s.k >= (int64_t{1} << 16))
  for (int64_t i = 0; i < s.mp(); ++i) {
    uint16_t* row = dst + i * kp;
    int64_t kk = 0;
    if (i < s.m) {
      if (x_transposed)
        for (; kk < s.k; ++kk) row[kk] = float_to_bf16_bits(x[kk * ldx + i]);
      else
        for (; kk < s.k; ++kk) row[kk] = float_to_bf16_bits(x[i * ldx + kk]);
    }
    std::fill(row + kk, row + kp, uint16_t{0});
  }
}

// B [K, N] as VNNI panels: dst[(p Kp/2 + r) 32 + 2c + e] = B[2r + e, 16p + c], zero beyond K and N.
// b_transposed: B = W^T for W stored [N, K] (an nn.Linear weight); else B stored [K, N].
inline void pack_b_vnni(const float* b, int64_t ldb, bool b_transposed, const Shape& s, uint16_t* dst) {
  const int64_t kp = s.kp(), panel = kp / 2 * panel_pair_floats;
  std::memset(dst, 0, sizeof(uint16_t) * s.b_elements());
#pragma omp parallel for schedule(static) if (s.n * s.k >= (int64_t{1} << 16))
  for (int64_t p = 0; p < s.panels(); ++p) {
    uint16_t* out = dst + p * panel;
    const int64_t c1 = std::min<int64_t>(tile_rows, s.n - p * tile_rows);
    for (int64_t c = 0; c < c1; ++c) {
      const int64_t j = p * tile_rows + c;
      for (int64_t kk = 0; kk < s.k; ++kk) {
        const float v = b_transposed ? b[j * ldb + kk] : b[kk * ldb + j];
        out[(kk / 2) * panel_pair_floats + 2 * c + (kk & 1)] = float_to_bf16_bits(v);
      }
    }
  }
}

// The tile instructions as Intel's SDM defines them, on a thread's 8 emulated registers.
struct EmulatedTileOps {
  struct Registers {
    alignas(64) unsigned char t[8][tile_rows][64];
  };
  static Registers& regs() {
    static thread_local Registers r;
    return r;
  }
  static void configure() {}
  static void release() {}
  static void load(int t, const void* base, int64_t stride) {
    for (int r = 0; r < tile_rows; ++r) std::memcpy(regs().t[t][r], static_cast<const char*>(base) + r * stride, 64);
  }
  // tdpbf16ps c, a, b: c[m][n] += a[m][2k] b[k][2n] + a[m][2k+1] b[k][2n+1], k = 0..15, in fp32.
  static void dpbf16ps(int c, int a, int b) {
    for (int m = 0; m < tile_rows; ++m)
      for (int n = 0; n < tile_rows; ++n) {
        float acc;
        std::memcpy(&acc, regs().t[c][m] + 4 * n, 4);
        for (int k = 0; k < tile_rows; ++k) {
          uint16_t a0, a1, b0, b1;
          std::memcpy(&a0, regs().t[a][m] + 4 * k, 2);
          std::memcpy(&a1, regs().t[a][m] + 4 * k + 2, 2);
          std::memcpy(&b0, regs().t[b][k] + 4 * n, 2);
          std::memcpy(&b1, regs().t[b][k] + 4 * n + 2, 2);
          acc += bf16_bits_to_float(a0) * bf16_bits_to_float(b0);
          acc += bf16_bits_to_float(a1) * bf16_bits_to_float(b1);
        }
        std::memcpy(regs().t[c][m] + 4 * n, &acc, 4);
      }
  }
  static void zero_block() { std::memset(regs().t, 0, sizeof(unsigned char) * 4 * tile_rows * 64); }
  // One K step of the 2 x 2 block: two A tiles (rows 0-15, 16-31), two B tiles (columns 0-15, 16-31).
  static void step(const uint16_t* a0, const uint16_t* a1, int64_t a_stride_bytes, const uint16_t* b0,
                   const uint16_t* b1) {
    load(4, a0, a_stride_bytes);
    load(5, a1, a_stride_bytes);
    load(6, b0, 64);
    load(7, b1, 64);
    dpbf16ps(0, 4, 6);
    dpbf16ps(1, 4, 7);
    dpbf16ps(2, 5, 6);
    dpbf16ps(3, 5, 7);
  }
  // c[4][256]: the block's tiles, row-major 16 x 16 each, in the order (rows, columns) 00 01 10 11.
  static void store_block(float* c) {
    for (int t = 0; t < 4; ++t)
      for (int r = 0; r < tile_rows; ++r) std::memcpy(c + t * 256 + r * tile_rows, regs().t[t][r], 64);
  }
};

#if CLIP_GEMM_HAS_AMX
// The same operations on the hardware tiles (tile numbers must be literals in the instructions).
struct AmxTileOps {
  // Palette 1, tiles 0-7 all 16 rows of 64 bytes.
  struct alignas(64) Config {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  };
  __attribute__((target("amx-tile"))) static void configure() {
    static const Config config;
    _tile_loadconfig(&config);
  }
  __attribute__((target("amx-tile"))) static void release() { _tile_release(); }
  static void zero_block() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  static void step(const uint16_t* a0, const uint16_t* a1, int64_t a_stride_bytes, const uint16_t* b0,
                   const uint16_t* b1) {
    _tile_loadd(4, a0, a_stride_bytes);
    _tile_loadd(5, a1, a_stride_bytes);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  static void store_block(float* c) {
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
};
#endif

// y[M, N] (+)= A B from packed A (pack_a) and B (pack_b_vnni), 32 x 32 blocks split over the
// OpenMP threads (on the calling thread inside a parallel region or when `threads` is 1). Each
// thread configures the tiles, runs its blocks, and releases the tiles.
template <class TileOps>
void tile_product(const Shape& s, const uint16_t* a, const uint16_t* b, float* y, int64_t ldy, bool accumulate,
                  int threads) {
  const int64_t kp = s.kp(), steps = kp / tile_k, panel = kp / 2 * panel_pair_floats;
  const int64_t row_blocks = s.mp() / block, col_blocks = s.panels() / 2;
  auto run = [&](int64_t first, int64_t last) {  // blocks [first, last) in row-major block order
    TileOps::configure();
    alignas(64) float c[4 * 256];
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t ib = blk / col_blocks, jb = blk % col_blocks;
      const uint16_t* a0 = a + ib * block * kp;
      const uint16_t* a1 = a0 + tile_rows * kp;
      const uint16_t* b0 = b + 2 * jb * panel;
      const uint16_t* b1 = b0 + panel;
      TileOps::zero_block();
      for (int64_t st = 0; st < steps; ++st)
        TileOps::step(a0 + st * tile_k, a1 + st * tile_k, kp * 2, b0 + st * tile_rows * panel_pair_floats,
                      b1 + st * tile_rows * panel_pair_floats);
      TileOps::store_block(c);
      for (int t = 0; t < 4; ++t) {
        const int64_t i0 = ib * block + (t / 2) * tile_rows, j0 = jb * block + (t % 2) * tile_rows;
        const int64_t rows = std::min<int64_t>(tile_rows, s.m - i0), cols = std::min<int64_t>(tile_rows, s.n - j0);
        for (int64_t r = 0; r < rows; ++r) {
          float* yr = y + (i0 + r) * ldy + j0;
          const float* cr = c + t * 256 + r * tile_rows;
          if (accumulate)
            for (int64_t j = 0; j < cols; ++j) yr[j] += cr[j];
          else
            for (int64_t j = 0; j < cols; ++j) yr[j] = cr[j];
        }
      }
    }
    TileOps::release();
  };
  const int64_t blocks = row_blocks * col_blocks;
#ifdef _OPENMP
  if (threads > 1 && blocks > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      run(blocks * t / nt, blocks * (t + 1) / nt);
    }
    return;
  }
#endif
  (void)threads;
  run(0, blocks);
}

}  // namespace clip::detail::gemm_bf16
