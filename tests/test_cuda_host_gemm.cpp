// Host-side logic of the CUDA GEMM wrapper (include/clip/cuda/gemm_plan.hpp) and the host bf16
// rounding (include/clip/core/bf16.hpp), checked on the CPU:
// - to_column_major: a naive column-major GEMM driven by the translated parameters (transa,
//   transb, m, n, k, lda, ldb, ldc, ldd: what cuBLASLt receives) reproduces the CPU row-major
//   clip::gemm_nt / gemm_nn / gemm_tn on random shapes, odd sizes and padded row strides, with
//   NaN in the padding so that a read outside the described matrices would show;
// - round_to_bf16 against known bit patterns, ties to even, and an independent reference on
//   random bit patterns;
// - GemmKey: equality and hash distinguish every field.
#include <boost/test/unit_test.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <unordered_set>
#include <vector>

#include "clip/core/bf16.hpp"
#include "clip/cuda/gemm_plan.hpp"
#include "clip/ops/gemm.hpp"

namespace {

using clip::cuda::ColumnMajorGemm;
using clip::cuda::GemmKey;
using clip::cuda::GemmKeyHash;
using clip::cuda::GemmOp;

// D = op(A) op(B) + beta C, column-major, in double, reading only the stored matrices that the
// layouts describe: A [a_rows, a_cols] (lda), B [b_rows, b_cols] (ldb), C and D [m, n].
// Also returns, per element of D, the sum of |terms| (for the rounding bound).
void column_major_reference(const ColumnMajorGemm& g, const float* a, const float* b, double beta, const float* c,
                            std::vector<double>& d, std::vector<double>& magnitude) {
  BOOST_REQUIRE(g.lda >= g.a_rows);
  BOOST_REQUIRE(g.ldb >= g.b_rows);
  BOOST_REQUIRE(g.ldc >= g.m);
  BOOST_REQUIRE(g.ldd >= g.m);
  // op(A) is [m, k], op(B) is [k, n].
  BOOST_REQUIRE_EQUAL(g.transa ? g.a_cols : g.a_rows, g.m);
  BOOST_REQUIRE_EQUAL(g.transa ? g.a_rows : g.a_cols, g.k);
  BOOST_REQUIRE_EQUAL(g.transb ? g.b_cols : g.b_rows, g.k);
  BOOST_REQUIRE_EQUAL(g.transb ? g.b_rows : g.b_cols, g.n);
  const auto A = [&](int64_t i, int64_t l) {  // op(A)[i, l]
    const int64_t r = g.transa ? l : i, col = g.transa ? i : l;
    return double(a[r + col * g.lda]);
  };
  const auto B = [&](int64_t l, int64_t j) {  // op(B)[l, j]
    const int64_t r = g.transb ? j : l, col = g.transb ? l : j;
    return double(b[r + col * g.ldb]);
  };
  d.assign(size_t(g.m * g.n), 0.0);
  magnitude.assign(size_t(g.m * g.n), 0.0);
  for (int64_t j = 0; j < g.n; ++j)
    for (int64_t i = 0; i < g.m; ++i) {
      double s = 0, mag = 0;
      for (int64_t l = 0; l < g.k; ++l) {
        const double t = A(i, l) * B(l, j);
        s += t;
        mag += std::abs(t);
      }
      if (beta != 0) {
        const double cv = beta * double(c[i + j * g.ldc]);
        s += cv;
        mag += std::abs(cv);
      }
      d[size_t(i + j * g.m)] = s;
      magnitude[size_t(i + j * g.m)] = mag;
    }
}

std::vector<float> random_vector(size_t n, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

struct Stats {
  int cases = 0;
  double worst_ratio = 0;  // max |cpu - ref| / (bound)
};

// One case: row-major operands with padded strides (NaN in the padding), the CPU clip gemm, and the
// column-major reference on the same buffers with the translated parameters.
void check_case(GemmOp op, int64_t m, int64_t n, int64_t k, int64_t pad_x, int64_t pad_b, int64_t pad_y,
                bool accumulate, std::mt19937& gen, Stats& stats) {
  const int64_t x_rows = op == GemmOp::tn ? k : m, x_cols = op == GemmOp::tn ? m : k;
  const int64_t b_rows = op == GemmOp::nt ? n : k, b_cols = op == GemmOp::nt ? k : n;
  const int64_t ldx = x_cols + pad_x, ldb = b_cols + pad_b, ldy = n + pad_y;
  std::vector<float> x = random_vector(size_t(x_rows * ldx), gen);
  std::vector<float> b = random_vector(size_t(b_rows * ldb), gen);
  std::vector<float> y = random_vector(size_t(m * ldy), gen);
  for (int64_t r = 0; r < x_rows; ++r)
    for (int64_t c = x_cols; c < ldx; ++c) x[size_t(r * ldx + c)] = NAN;
  for (int64_t r = 0; r < b_rows; ++r)
    for (int64_t c = b_cols; c < ldb; ++c) b[size_t(r * ldb + c)] = NAN;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = n; c < ldy; ++c) y[size_t(r * ldy + c)] = NAN;
  const std::vector<float> y0 = y;  // C (beta = 1) is y itself, as in gemm.cuh's default

  switch (op) {
    case GemmOp::nt: clip::gemm_nt(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
    case GemmOp::nn: clip::gemm_nn(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
    case GemmOp::tn: clip::gemm_tn(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
  }

  const ColumnMajorGemm g = clip::cuda::to_column_major(op, m, n, k, ldx, ldb, ldy, ldy);
  BOOST_REQUIRE_EQUAL(g.m, n);
  BOOST_REQUIRE_EQUAL(g.n, m);
  BOOST_REQUIRE_EQUAL(g.k, k);
  // The column-major matrices lie inside the row-major buffers: last element index in bounds.
  BOOST_REQUIRE_LE((g.a_cols - 1) * g.lda + g.a_rows, int64_t(b.size()));
  BOOST_REQUIRE_LE((g.b_cols - 1) * g.ldb + g.b_rows, int64_t(x.size()));
  BOOST_REQUIRE_LE((g.n - 1) * g.ldd + g.m, int64_t(y.size()));
  std::vector<double> ref, mag;
  // cuBLAS's A is the row-major second operand, B is X, C and D are Y.
  column_major_reference(g, b.data(), x.data(), accumulate ? 1.0 : 0.0, y0.data(), ref, mag);

  bool ok = true;
  for (int64_t j = 0; j < g.n; ++j)
    for (int64_t i = 0; i < g.m; ++i) {
      const double got = y[size_t(i + j * g.ldd)];  // column-major D[i, j] = row-major Y[j, i]
      const double want = ref[size_t(i + j * g.m)];
      const double bound = 1e-6 * mag[size_t(i + j * g.m)] + 1e-30;
      const double ratio = std::abs(got - want) / bound;
      stats.worst_ratio = std::max(stats.worst_ratio, ratio);
      if (!(ratio <= 1.0)) ok = false;  // NaN fails too
    }
  // The padding of Y was left alone.
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = n; c < ldy; ++c)
      if (!std::isnan(y[size_t(r * ldy + c)])) ok = false;
  BOOST_TEST(ok, "op " << int(op) << " m " << m << " n " << n << " k " << k << " pads " << pad_x << "/" << pad_b
                       << "/" << pad_y << " accumulate " << accumulate);
  ++stats.cases;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_host_gemm)

BOOST_AUTO_TEST_CASE(column_major_translation_matches_row_major_cpu_gemm) {
  std::mt19937 gen(20261128);
  Stats stats;
  // Fixed edge shapes: ones, odd sizes, sizes around the CPU blocking (14, 32).
  const int64_t sizes[] = {1, 2, 3, 7, 13, 14, 15, 31, 33, 65};
  for (GemmOp op : {GemmOp::nt, GemmOp::nn, GemmOp::tn})
    for (int64_t m : {1, 3, 15})
      for (int64_t n : {1, 7, 33})
        for (int64_t k : {1, 13, 65}) check_case(op, m, n, k, 0, 0, 0, false, gen, stats);
  // Random shapes with padded strides, accumulate on and off.
  std::uniform_int_distribution<int> pick(0, 9), pad(0, 5), flag(0, 1);
  for (int t = 0; t < 300; ++t) {
    const GemmOp op = static_cast<GemmOp>(t % 3);
    check_case(op, sizes[pick(gen)], sizes[pick(gen)], sizes[pick(gen)], pad(gen), pad(gen), pad(gen), flag(gen) == 1,
               gen, stats);
  }
  BOOST_TEST_MESSAGE("gemm translation: " << stats.cases << " cases, worst |cpu - ref| / (1e-6 sum|terms|) = "
                                          << stats.worst_ratio);
  BOOST_TEST(stats.cases == 381);
}

BOOST_AUTO_TEST_CASE(column_major_translation_parameters) {
  // The exact cuBLASLt parameters for one shape of each op (m = 5, n = 7, k = 3, strides padded).
  const auto nt = clip::cuda::to_column_major(GemmOp::nt, 5, 7, 3, 4, 6, 9, 11);
  BOOST_TEST(nt.transa);
  BOOST_TEST(!nt.transb);
  BOOST_TEST((nt.m == 7 && nt.n == 5 && nt.k == 3));
  BOOST_TEST((nt.a_rows == 3 && nt.a_cols == 7 && nt.lda == 6));
  BOOST_TEST((nt.b_rows == 3 && nt.b_cols == 5 && nt.ldb == 4));
  BOOST_TEST((nt.ldc == 11 && nt.ldd == 9));
  const auto nn = clip::cuda::to_column_major(GemmOp::nn, 5, 7, 3, 4, 8, 9, 9);
  BOOST_TEST((!nn.transa && !nn.transb));
  BOOST_TEST((nn.a_rows == 7 && nn.a_cols == 3 && nn.lda == 8));
  BOOST_TEST((nn.b_rows == 3 && nn.b_cols == 5 && nn.ldb == 4));
  const auto tn = clip::cuda::to_column_major(GemmOp::tn, 5, 7, 3, 6, 8, 9, 9);
  BOOST_TEST((!tn.transa && tn.transb));
  BOOST_TEST((tn.a_rows == 7 && tn.a_cols == 3 && tn.lda == 8));
  BOOST_TEST((tn.b_rows == 5 && tn.b_cols == 3 && tn.ldb == 6));
  // Strides shorter than the rows, and empty sizes, are refused.
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nt, 5, 7, 3, 2, 3, 7, 7), clip::Error);  // ldx < k
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nt, 5, 7, 3, 3, 2, 7, 7), clip::Error);  // ldw < k
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nn, 5, 7, 3, 3, 6, 7, 7), clip::Error);  // ldp < n
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::tn, 5, 7, 3, 4, 7, 7, 7), clip::Error);  // ldx < m
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nn, 5, 7, 3, 3, 7, 6, 7), clip::Error);  // ldy < n
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nn, 5, 7, 3, 3, 7, 7, 6), clip::Error);  // ldc < n
  BOOST_CHECK_THROW(clip::cuda::to_column_major(GemmOp::nn, 5, 7, 0, 3, 7, 7, 7), clip::Error);  // k = 0
}

namespace {
uint16_t bits_of(float x) { return clip::float_to_bf16_bits(x); }
float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

// Independent reference: the two bf16 neighbours of x (truncation and the next one up in
// magnitude), the nearer one by exact double arithmetic, ties to the even bit pattern.
uint16_t reference_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint16_t lo = uint16_t(u >> 16);
  if ((u & 0xffffu) == 0) return lo;
  const uint16_t hi = uint16_t(lo + 1);  // next magnitude (may become infinity: exponent carry)
  const double dx = std::abs(double(x));
  const double dlo = std::abs(double(clip::bf16_bits_to_float(lo)));
  // The value of `hi` as if the exponent range were unbounded (for the step past the largest finite).
  const double dhi = (hi & 0x7fffu) == 0x7f80u ? std::ldexp(1.0, 128) : std::abs(double(clip::bf16_bits_to_float(hi)));
  const double to_lo = dx - dlo, to_hi = dhi - dx;
  if (to_lo < to_hi) return lo;
  if (to_hi < to_lo) return hi;
  return (lo & 1u) ? hi : lo;
}
}  // namespace

BOOST_AUTO_TEST_CASE(bf16_rounding_known_patterns) {
  BOOST_TEST(bits_of(1.0f) == 0x3f80u);
  BOOST_TEST(bits_of(-2.0f) == 0xc000u);
  BOOST_TEST(bits_of(0.0f) == 0x0000u);
  BOOST_TEST(bits_of(-0.0f) == 0x8000u);
  BOOST_TEST(bits_of(3.140625f) == 0x4049u);                 // exactly representable
  BOOST_TEST(bits_of(from_bits(0x3f808000u)) == 0x3f80u);    // 1 + 2^-8: tie, down to even
  BOOST_TEST(bits_of(from_bits(0x3f818000u)) == 0x3f82u);    // 1 + 3 2^-8: tie, up to even
  BOOST_TEST(bits_of(from_bits(0x3f808001u)) == 0x3f81u);    // just above the tie: up
  BOOST_TEST(bits_of(from_bits(0x3f807fffu)) == 0x3f80u);    // just below: down
  BOOST_TEST(bits_of(from_bits(0xbf818000u)) == 0xbf82u);    // negative tie, magnitude to even
  BOOST_TEST(bits_of(from_bits(0x3fffffffu)) == 0x4000u);    // carry into the exponent
  BOOST_TEST(bits_of(from_bits(0x00008000u)) == 0x0000u);    // subnormal tie, to even (zero)
  BOOST_TEST(bits_of(from_bits(0x00018000u)) == 0x0002u);    // subnormal tie, up to even
  BOOST_TEST(bits_of(from_bits(0x007fffffu)) == 0x0080u);    // largest subnormal -> smallest normal
  BOOST_TEST(bits_of(from_bits(0x7f7fffffu)) == 0x7f80u);    // FLT_MAX rounds to infinity
  BOOST_TEST(bits_of(from_bits(0x7f7f7fffu)) == 0x7f7fu);    // below the half-way point stays finite
  BOOST_TEST(bits_of(std::numeric_limits<float>::infinity()) == 0x7f80u);
  BOOST_TEST(bits_of(-std::numeric_limits<float>::infinity()) == 0xff80u);
  // NaN stays NaN, including payloads that would round into the infinity pattern.
  for (uint32_t u : {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0xff800001u, 0x7fffffffu}) {
    BOOST_TEST(std::isnan(clip::round_to_bf16(from_bits(u))));
    BOOST_TEST(bits_of(from_bits(u)) == 0x7fffu);
  }
  BOOST_TEST(clip::round_to_bf16(1.0f + 1.0f / 256) == 1.0f);
  BOOST_TEST(clip::round_to_bf16(1.0f + 3.0f / 256) == 1.0f + 4.0f / 256);
  BOOST_TEST(clip::bf16_bits_to_float(0x3f80u) == 1.0f);
  BOOST_TEST(clip::bf16_bits_to_float(0xc049u) == -3.140625f);
}

BOOST_AUTO_TEST_CASE(bf16_rounding_matches_reference_on_random_bits) {
  std::mt19937 gen(5);
  int checked = 0, mismatches = 0;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = gen();
    if (i % 4 == 0) u = (u & 0xffff0000u) | 0x8000u;  // many exact ties
    const float x = from_bits(u);
    if (std::isnan(x)) continue;
    ++checked;
    if (bits_of(x) != reference_bf16(x)) ++mismatches;
    // Round trip: a bf16 value is a fixed point.
    const float r = clip::round_to_bf16(x);
    if (clip::round_to_bf16(r) != r && !std::isnan(r)) ++mismatches;
  }
  BOOST_TEST_MESSAGE("bf16 rounding: " << checked << " random patterns, " << mismatches << " mismatches");
  BOOST_TEST(mismatches == 0);
  BOOST_TEST(checked > 1900000);
}

BOOST_AUTO_TEST_CASE(gemm_key_distinguishes_every_field) {
  GemmKey base;
  base.op = GemmOp::nt;
  base.m = 77;
  base.n = 512;
  base.k = 2048;
  base.ldx = 2048;
  base.ldb = 2048;
  base.ldy = 512;
  base.ldc = 512;
  base.a_type = 14;  // CUDA_R_16BF
  base.y_type = 0;   // CUDA_R_32F
  base.bias = false;
  base.align_x = base.align_b = base.align_y = base.align_c = base.align_bias = 256;
  const GemmKeyHash hash;
  std::vector<GemmKey> variants;
  auto vary = [&](auto change) {
    GemmKey k = base;
    change(k);
    variants.push_back(k);
  };
  vary([](GemmKey& k) { k.op = GemmOp::nn; });
  vary([](GemmKey& k) { k.op = GemmOp::tn; });
  vary([](GemmKey& k) { k.m = 78; });
  vary([](GemmKey& k) { k.n = 513; });
  vary([](GemmKey& k) { k.k = 2047; });
  vary([](GemmKey& k) { k.ldx = 2049; });
  vary([](GemmKey& k) { k.ldb = 2049; });
  vary([](GemmKey& k) { k.ldy = 513; });
  vary([](GemmKey& k) { k.ldc = 513; });
  vary([](GemmKey& k) { k.a_type = 0; });
  vary([](GemmKey& k) { k.y_type = 14; });
  vary([](GemmKey& k) { k.bias = true; });
  vary([](GemmKey& k) { k.align_x = 16; });
  vary([](GemmKey& k) { k.align_b = 16; });
  vary([](GemmKey& k) { k.align_y = 16; });
  vary([](GemmKey& k) { k.align_c = 16; });
  vary([](GemmKey& k) { k.align_bias = 16; });
  // Swapped values between fields must differ too.
  vary([](GemmKey& k) { std::swap(k.m, k.n); });
  vary([](GemmKey& k) { std::swap(k.ldx, k.ldy); });
  vary([](GemmKey& k) { std::swap(k.a_type, k.y_type); });
  vary([](GemmKey& k) { k.align_x = 16; k.align_b = 16; });
  vary([](GemmKey& k) { k.align_y = 16; k.align_c = 16; });
  std::unordered_set<size_t> hashes{hash(base)};
  for (const GemmKey& k : variants) {
    BOOST_TEST(!(k == base));
    BOOST_TEST(hash(k) != hash(base));
    hashes.insert(hash(k));
  }
  BOOST_TEST(hashes.size() == variants.size() + 1);  // base and the variants, pairwise distinct
  GemmKey copy = base;
  BOOST_TEST((copy == base));
  BOOST_TEST(hash(copy) == hash(base));
}

BOOST_AUTO_TEST_CASE(pointer_alignment_is_capped_at_256) {
  using clip::cuda::pointer_alignment;
  alignas(256) static float buffer[512];
  BOOST_TEST(pointer_alignment(buffer) == 256);
  BOOST_TEST(pointer_alignment(buffer + 64) == 256);
  BOOST_TEST(pointer_alignment(buffer + 1) == 4);
  BOOST_TEST(pointer_alignment(buffer + 2) == 8);
  BOOST_TEST(pointer_alignment(buffer + 32) == 128);
  BOOST_TEST(pointer_alignment(reinterpret_cast<const char*>(buffer) + 2) == 2);
  BOOST_TEST(pointer_alignment(nullptr) == 256);
}

BOOST_AUTO_TEST_SUITE_END()
