// clip::gemm_nt / gemm_nn / gemm_tn / gemm_packed against a double-precision loop: random shapes and the
// edges of the blocking (M, N, K not multiples of the tiles or blocks, 1-sized dimensions),
// row strides wider than the matrices, accumulate on and off, thread counts and parallel callers.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clip/ops/gemm.hpp"

namespace {

enum class Form { nt, nn, tn, packed_nt, packed_nn };

struct Case {
  int64_t m, n, k;
  int64_t pad_x = 0, pad_b = 0, pad_y = 0;  // extra floats per row beyond the matrix
  bool accumulate = false;
};

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Operands of one case. The padding beyond each row holds values the GEMM must neither read nor
// write (NaN in x and B, checked unchanged in y).
struct Operands {
  Case c;
  int64_t ldx, ldb, ldy;
  std::vector<float> x, b, y0;  // x is [m, k] or [k, m] (tn); b is W [n, k] (nt forms) or P [k, n]
  bool b_is_w, x_is_t;

  Operands(const Case& cs, Form form, uint32_t seed)
      : c(cs), b_is_w(form == Form::nt || form == Form::packed_nt), x_is_t(form == Form::tn) {
    ldx = (x_is_t ? c.m : c.k) + c.pad_x;
    ldb = (b_is_w ? c.k : c.n) + c.pad_b;
    ldy = c.n + c.pad_y;
    const int64_t x_rows = x_is_t ? c.k : c.m, x_cols = x_is_t ? c.m : c.k;
    x = random_vector(size_t(x_rows * ldx), seed);
    b = random_vector(size_t((b_is_w ? c.n : c.k) * ldb), seed + 1);
    y0 = random_vector(size_t(c.m * ldy), seed + 2);
    // Without accumulate y is write-only (it may hold garbage): NaN there must not leak out.
    if (!c.accumulate)
      for (int64_t i = 0; i < c.m; ++i)
        for (int64_t j = 0; j < c.n; ++j) y0[i * ldy + j] = NAN;
    // NaN in the padding of x and B: a read of it would poison the result.
    for (int64_t i = 0; i < x_rows; ++i)
      for (int64_t j = x_cols; j < ldx; ++j) x[i * ldx + j] = NAN;
    const int64_t b_rows = b_is_w ? c.n : c.k, b_cols = b_is_w ? c.k : c.n;
    for (int64_t i = 0; i < b_rows; ++i)
      for (int64_t j = b_cols; j < ldb; ++j) b[i * ldb + j] = NAN;
  }

  float bval(int64_t kk, int64_t j) const { return b_is_w ? b[j * ldb + kk] : b[kk * ldb + j]; }
  float xval(int64_t i, int64_t kk) const { return x_is_t ? x[kk * ldx + i] : x[i * ldx + kk]; }

  std::vector<double> reference() const {
    std::vector<double> ref(size_t(c.m * c.n));
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        double s = c.accumulate ? double(y0[i * ldy + j]) : 0.0;
        for (int64_t kk = 0; kk < c.k; ++kk) s += double(xval(i, kk)) * double(bval(kk, j));
        ref[size_t(i * c.n + j)] = s;
      }
    return ref;
  }
};

std::vector<float> run(const Operands& op, Form form) {
  std::vector<float> y = op.y0;
  const Case& c = op.c;
  switch (form) {
    case Form::nt:
      clip::gemm_nt(c.m, c.n, c.k, op.x.data(), op.ldx, op.b.data(), op.ldb, y.data(), op.ldy, c.accumulate);
      break;
    case Form::nn:
      clip::gemm_nn(c.m, c.n, c.k, op.x.data(), op.ldx, op.b.data(), op.ldb, y.data(), op.ldy, c.accumulate);
      break;
    case Form::tn:
      clip::gemm_tn(c.m, c.n, c.k, op.x.data(), op.ldx, op.b.data(), op.ldb, y.data(), op.ldy, c.accumulate);
      break;
    case Form::packed_nt: {
      const auto packed = clip::PackedMatrix::from_nt(op.b.data(), c.n, c.k, op.ldb);
      clip::gemm_packed(c.m, op.x.data(), op.ldx, packed, y.data(), op.ldy, c.accumulate);
      break;
    }
    case Form::packed_nn: {
      const auto packed = clip::PackedMatrix::from_nn(op.b.data(), c.k, c.n, op.ldb);
      clip::gemm_packed(c.m, op.x.data(), op.ldx, packed, y.data(), op.ldy, c.accumulate);
      break;
    }
  }
  return y;
}

// Every element within 1e-5 of |ref| + the scale of its terms (sqrt(K) for unit normal x and B),
// the Frobenius-norm relative error under 1e-5 overall, and the padding of y untouched.
void check(const Operands& op, const std::vector<float>& y, const char* what) {
  const Case& c = op.c;
  const auto ref = op.reference();
  double num = 0, den = 0;
  int64_t bad = 0;  // elements off by more than the bound, NaN included
  const double term_scale = std::sqrt(double(c.k)) + (c.accumulate ? 1.0 : 0.0);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      const double r = ref[size_t(i * c.n + j)], g = y[size_t(i * op.ldy + j)];
      const double err = std::abs(g - r);
      num += err * err;
      den += r * r;
      if (!(err <= 1e-5 * (std::abs(r) + term_scale))) ++bad;
    }
    for (int64_t j = c.n; j < op.ldy; ++j)
      BOOST_REQUIRE_EQUAL(y[size_t(i * op.ldy + j)], op.y0[size_t(i * op.ldy + j)]);
  }
  BOOST_TEST_CONTEXT(what << " m=" << c.m << " n=" << c.n << " k=" << c.k << " pads=" << c.pad_x << "," << c.pad_b
                          << "," << c.pad_y << " acc=" << c.accumulate) {
    BOOST_TEST(bad == 0);
    // Over a few elements one cancelling sum would dominate the norm: the element bound covers those.
    if (c.m * c.n >= 64) BOOST_TEST(std::sqrt(num / den) < 1e-5);  // false for NaN too
  }
}

constexpr Form all_forms[] = {Form::nt, Form::nn, Form::tn, Form::packed_nt, Form::packed_nn};
const char* form_name(Form f) {
  switch (f) {
    case Form::nt: return "nt";
    case Form::nn: return "nn";
    case Form::tn: return "tn";
    case Form::packed_nt: return "packed_nt";
    default: return "packed_nn";
  }
}

}  // namespace

BOOST_AUTO_TEST_SUITE(gemm)

// Tile and block edges: 1-sized dimensions, one past and one short of MR = 14, NR = 32,
// KC = 256 and NC = 1024, and several blocks of each.
BOOST_AUTO_TEST_CASE(edge_shapes) {
  const int64_t ms[] = {1, 2, 13, 14, 15, 29, 337, 700};
  const int64_t ns[] = {1, 15, 16, 17, 32, 33, 100, 1025, 2100};
  const int64_t ks[] = {1, 7, 255, 256, 257, 600};
  uint32_t seed = 1;
  for (int64_t m : ms)
    for (int64_t n : ns)
      for (int64_t k : ks) {
        if (m * n * k > int64_t{1} << 24) continue;  // keep the double reference quick
        const Case c{m, n, k, 0, 0, 0, (seed & 1) != 0};
        const Form form = all_forms[seed % 5];
        const Operands op(c, form, seed++);
        check(op, run(op, form), form_name(form));
      }
}

// Random shapes and strides, every form, accumulate on and off.
BOOST_AUTO_TEST_CASE(random_shapes_and_strides) {
  std::mt19937 gen(42);
  std::uniform_int_distribution<int64_t> dim(1, 300), pad(0, 19);
  for (int trial = 0; trial < 40; ++trial) {
    Case c{dim(gen), dim(gen), dim(gen), pad(gen), pad(gen), pad(gen), trial % 2 == 0};
    for (Form form : all_forms) {
      const Operands op(c, form, uint32_t(100 + trial));
      check(op, run(op, form), form_name(form));
    }
  }
}

// Shapes of the models (with a smaller M): many depth blocks, several column blocks.
BOOST_AUTO_TEST_CASE(model_shapes) {
  const Case cases[] = {{50, 2304, 768}, {50, 768, 3072, 0, 0, 0, true}, {77, 512, 2048, 0, 0, 0, true},
                        {64, 392, 4608}, {33, 1536, 512, 0, 0, 512}};
  uint32_t seed = 500;
  for (const Case& c : cases)
    for (Form form : {Form::nt, Form::nn, Form::tn}) {
      const Operands op(c, form, seed++);
      check(op, run(op, form), form_name(form));
    }
}

// K = 0: y = 0 without accumulate, y unchanged with it.
BOOST_AUTO_TEST_CASE(empty_depth) {
  std::vector<float> y(6, 3.0f);
  const float dummy = 0.0f;
  clip::gemm_nt(2, 3, 0, &dummy, 1, &dummy, 1, y.data(), 3, true);
  for (float v : y) BOOST_TEST(v == 3.0f);
  clip::gemm_nn(2, 3, 0, &dummy, 1, &dummy, 3, y.data(), 3, false);
  for (float v : y) BOOST_TEST(v == 0.0f);
}

// The summation order does not depend on the threads: 1 thread, all threads, and a call from
// inside a parallel region give bit-identical results.
BOOST_AUTO_TEST_CASE(thread_count_does_not_change_bits) {
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  for (const Case& c : {Case{400, 768, 768}, Case{700, 96, 300, 0, 0, 0, true}, Case{20, 2100, 513}}) {
    for (Form form : all_forms) {
      const Operands op(c, form, 7);
      omp_set_num_threads(1);
      const auto one = run(op, form);
      omp_set_num_threads(std::max(2, saved));
      const auto many = run(op, form);
      std::vector<float> nested;
#pragma omp parallel num_threads(2)
      {
#pragma omp single
        nested = run(op, form);
      }
      BOOST_TEST(one == many);
      BOOST_TEST(one == nested);
    }
  }
  omp_set_num_threads(saved);
#endif
}

// Two threads calling at once (each then single-threaded, with its own packing buffers).
BOOST_AUTO_TEST_CASE(concurrent_callers) {
  const Case c{150, 300, 400, 3, 5, 7, true};
  const Operands a(c, Form::nt, 11), b(c, Form::nn, 12);
  std::vector<float> ya, yb;
#ifdef _OPENMP
#pragma omp parallel sections num_threads(2)
  {
#pragma omp section
    ya = run(a, Form::nt);
#pragma omp section
    yb = run(b, Form::nn);
  }
#else
  ya = run(a, Form::nt);
  yb = run(b, Form::nn);
#endif
  check(a, ya, "nt concurrent");
  check(b, yb, "nn concurrent");
}

BOOST_AUTO_TEST_SUITE_END()
