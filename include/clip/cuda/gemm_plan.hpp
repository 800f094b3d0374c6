// The host-side logic of the CUDA GEMM wrapper (kernels/gemm.cuh), kept free of CUDA headers so
// that g++ tests can check it: how a row-major product becomes a column-major cuBLASLt call, and
// the key under which a Context caches the cuBLASLt objects built for one shape.
//
// Row-major to column-major: a row-major matrix Y [m, n] with row stride ldy is, byte for byte,
// the column-major matrix Y^T [n, m] with leading dimension ldy. So each row-major product is
// computed as its transpose, Y^T = op(A) op(B) with the operands swapped:
//
//   nt: Y = X W^T  ->  Y^T = W   X^T:  A = W (stored col-major [k, n], transposed), B = X (col-major [k, m])
//   nn: Y = X P    ->  Y^T = P^T X^T:  A = P (stored col-major [n, k]),             B = X (col-major [k, m])
//   tn: Y = X^T P  ->  Y^T = P^T X:    A = P (stored col-major [n, k]),             B = X (stored col-major [m, k], transposed)
//
// and the column-major problem has M = n, N = m, K = k. No data moves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "clip/core/error.hpp"

namespace clip::cuda {

// The three row-major forms of kernels/gemm.cuh (and of include/clip/ops/gemm.hpp).
enum class GemmOp : int32_t {
  nt,  // Y[m, n] = X[m, k] W[n, k]^T
  nn,  // Y[m, n] = X[m, k] P[k, n]
  tn,  // Y[m, n] = X[k, m]^T P[k, n]
};

// One column-major call D[m, n] = op(A)[m, k] op(B)[k, n] (+ C), in cuBLAS's names. The stored
// matrices (what a cuBLASLt matrix layout describes, before op) are A [a_rows, a_cols] with
// leading dimension lda, B [b_rows, b_cols] with ldb, and C and D [m, n] with ldc and ldd.
struct ColumnMajorGemm {
  bool transa = false, transb = false;  // op(A) = A^T, op(B) = B^T
  int64_t m = 0, n = 0, k = 0;
  int64_t a_rows = 0, a_cols = 0, lda = 0;
  int64_t b_rows = 0, b_cols = 0, ldb = 0;
  int64_t ldc = 0, ldd = 0;
};

// The row-major request: Y[m, n] (op X and the second operand) with row strides ldx, ldb (of W or
// P) and ldy, and the row stride ldc of the matrix that beta scales (ldy when it is Y itself).
// The row strides must cover the rows (checked: a wrong stride would read out of bounds).
inline ColumnMajorGemm to_column_major(GemmOp op, int64_t m, int64_t n, int64_t k, int64_t ldx, int64_t ldb,
                                       int64_t ldy, int64_t ldc) {
  CLIP_CHECK(m > 0 && n > 0 && k > 0, "a GEMM needs positive sizes, got m = ", m, ", n = ", n, ", k = ", k);
  const int64_t x_cols = op == GemmOp::tn ? m : k;  // X is [m, k], or [k, m] for tn
  const int64_t b_cols = op == GemmOp::nt ? k : n;  // W is [n, k], P is [k, n]
  CLIP_CHECK(ldx >= x_cols, "the row stride of X (", ldx, ") is shorter than its rows (", x_cols, ")");
  CLIP_CHECK(ldb >= b_cols, "the row stride of the second operand (", ldb, ") is shorter than its rows (", b_cols,
             ")");
  CLIP_CHECK(ldy >= n, "the row stride of Y (", ldy, ") is shorter than its rows (", n, ")");
  CLIP_CHECK(ldc >= n, "the row stride of C (", ldc, ") is shorter than its rows (", n, ")");
  ColumnMajorGemm g;
  g.m = n;
  g.n = m;
  g.k = k;
  // A: the second row-major operand. W [n, k] row-major is col-major [k, n]: transposed to [n, k].
  // P [k, n] row-major is col-major [n, k]: used as is.
  g.transa = op == GemmOp::nt;
  g.a_rows = g.transa ? k : n;
  g.a_cols = g.transa ? n : k;
  g.lda = ldb;
  // B: X. X [m, k] row-major is col-major [k, m]: used as is. X [k, m] (tn) is col-major [m, k]:
  // transposed to [k, m].
  g.transb = op == GemmOp::tn;
  g.b_rows = g.transb ? m : k;
  g.b_cols = g.transb ? k : m;
  g.ldb = ldx;
  g.ldc = ldc;
  g.ldd = ldy;
  return g;
}

// The alignment cuBLASLt may assume for a pointer: the largest power of two dividing the address,
// capped at 256 (cuBLASLt's default assumption, which a column slice of a matrix breaks). The
// heuristic picks kernels that are valid for the alignments it is told, so they belong to the key.
inline int32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  const uintptr_t low = a & (~a + 1);
  return low >= 256 ? 256 : static_cast<int32_t>(low);
}

// Everything a cached plan (matmul descriptor, four matrix layouts, chosen algorithm) depends on.
// Types are cudaDataType_t values stored as int32_t (this header includes no CUDA header).
struct GemmKey {
  GemmOp op = GemmOp::nt;
  int64_t m = 0, n = 0, k = 0;          // row-major sizes
  int64_t ldx = 0, ldb = 0, ldy = 0, ldc = 0;
  int32_t a_type = 0, y_type = 0;       // X and W/P; Y, C and the bias
  bool bias = false;                    // the bias epilogue
  int32_t align_x = 256, align_b = 256, align_y = 256, align_c = 256, align_bias = 256;

  friend bool operator==(const GemmKey&, const GemmKey&) = default;
};

namespace detail {
// splitmix64's finaliser: every input bit reaches every output bit.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace detail

struct GemmKeyHash {
  size_t operator()(const GemmKey& key) const {
    uint64_t h = 0;
    const auto add = [&h](uint64_t v) { h = detail::mix64(h ^ v); };
    add(static_cast<uint64_t>(key.op));
    add(static_cast<uint64_t>(key.m));
    add(static_cast<uint64_t>(key.n));
    add(static_cast<uint64_t>(key.k));
    add(static_cast<uint64_t>(key.ldx));
    add(static_cast<uint64_t>(key.ldb));
    add(static_cast<uint64_t>(key.ldy));
    add(static_cast<uint64_t>(key.ldc));
    add(static_cast<uint64_t>(static_cast<uint32_t>(key.a_type)) << 32 | static_cast<uint32_t>(key.y_type));
    add(key.bias);
    add(static_cast<uint64_t>(key.align_x) << 32 | static_cast<uint32_t>(key.align_b));
    add(static_cast<uint64_t>(key.align_y) << 32 | static_cast<uint32_t>(key.align_c));
    add(static_cast<uint64_t>(key.align_bias));
    return static_cast<size_t>(h);
  }
};

}  // namespace clip::cuda
