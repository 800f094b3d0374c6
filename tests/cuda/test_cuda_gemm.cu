// kernels/gemm.cuh and kernels/linear.cuh against the CPU ops (include/clip/ops/gemm.hpp,
// linear.hpp) on fresh random inputs:
// - fp32 mode: max|gpu - cpu| / max|cpu| <= 1e-5;
// - bf16 mode: max|gpu - exact| <= 2 x max|emulated - exact|, where `exact` is the CPU fp32 op on
//   the unrounded inputs and `emulated` the CPU op on inputs rounded to bf16 (outputs stored in
//   bf16 rounded too), i.e. within twice the error of the same computation done in bf16 on the CPU.
// Shapes are small but real: several row counts incl. 1 and odd ones, padded strides, unaligned
// column slices, epilogue bias, beta accumulation into fp32 and a separate residual C.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/gpu.hpp"

#include "clip/core/bf16.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/ops/linear.hpp"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/gemm.cuh"
#include "kernels/linear.cuh"
#include "kernels/storage.cuh"

namespace {

using clip::cuda::Arena;
using clip::cuda::bf16;
using clip::cuda::Context;
using clip::cuda::DeviceBuffer;
using clip::cuda::GemmEpilogue;
using clip::cuda::GemmOp;
using Vec = std::vector<float>;

Vec random_vec(size_t n, std::mt19937& gen, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  Vec v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

Vec rounded(const Vec& v) {
  Vec r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = clip::round_to_bf16(v[i]);
  return r;
}

// Host values rounded like storage type T stores them (identity for float).
template <class T>
Vec as_stored(const Vec& v) {
  return std::is_same_v<T, float> ? v : rounded(v);
}

template <class T>
DeviceBuffer<T> upload(Context& ctx, const Vec& host) {
  std::vector<T> h(host.size());
  for (size_t i = 0; i < host.size(); ++i) h[i] = clip::cuda::from_float<T>(host[i]);
  DeviceBuffer<T> d(int64_t(host.size()));
  d.upload(h.data(), int64_t(h.size()), ctx.stream());
  ctx.synchronize();
  return d;
}

template <class T>
Vec download(Context& ctx, const DeviceBuffer<T>& d) {
  std::vector<T> h(size_t(d.size()));
  d.download(h.data(), d.size(), ctx.stream());
  Vec r(h.size());
  for (size_t i = 0; i < h.size(); ++i) r[i] = clip::cuda::to_float(h[i]);
  return r;
}

double max_abs(const Vec& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::abs(x)));
  return m;
}
double max_diff(const Vec& a, const Vec& b) {
  BOOST_REQUIRE_EQUAL(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

// The verdict for one output. exact: CPU fp32 on unrounded inputs; emulated: CPU on the inputs
// as stored (bf16-rounded), outputs rounded when stored in bf16 (equal to exact in fp32 mode).
void check_output(const std::string& what, bool bf16_mode, const Vec& gpu, const Vec& exact, const Vec& emulated) {
  const double scale = std::max(max_abs(exact), 1e-30);
  const double err = max_diff(gpu, exact);
  if (!bf16_mode) {
    BOOST_TEST_MESSAGE(what << ": fp32 rel err " << err / scale);
    BOOST_TEST(err / scale <= 1e-5, what << ": fp32 rel err " << err / scale << " > 1e-5");
  } else {
    const double emul = max_diff(emulated, exact);
    const double allowed = std::max(2 * emul, 1e-6 * scale);
    BOOST_TEST_MESSAGE(what << ": bf16 err " << err / scale << " vs emulation " << emul / scale);
    BOOST_TEST(err <= allowed, what << ": bf16 err " << err / scale << " > 2 x emulated " << emul / scale);
  }
}

// ----- raw gemm -------------------------------------------------------------------------------

struct GemmCase {
  GemmOp op;
  int64_t m, n, k;
  int64_t pad_x = 0, pad_b = 0, pad_y = 0;
  float alpha = 1, beta = 0;
  bool separate_c = false;  // beta's matrix is a separate residual (else y itself)
  bool bias = false;
};

// CPU: y[m, ldy] = alpha op(x, b) + beta c + bias on [m, n]; padding of y untouched.
Vec cpu_gemm(const GemmCase& g, int64_t ldx, int64_t ldb, int64_t ldy, const Vec& x, const Vec& b, const Vec& y0,
             const Vec& c, const Vec& bias) {
  Vec prod(size_t(g.m * g.n), 0.0f);
  switch (g.op) {
    case GemmOp::nt: clip::gemm_nt(g.m, g.n, g.k, x.data(), ldx, b.data(), ldb, prod.data(), g.n, false); break;
    case GemmOp::nn: clip::gemm_nn(g.m, g.n, g.k, x.data(), ldx, b.data(), ldb, prod.data(), g.n, false); break;
    case GemmOp::tn: clip::gemm_tn(g.m, g.n, g.k, x.data(), ldx, b.data(), ldb, prod.data(), g.n, false); break;
  }
  Vec y = y0;
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < g.n; ++j) {
      float v = g.alpha * prod[size_t(i * g.n + j)];
      if (g.beta != 0) v += g.beta * (g.separate_c ? c[size_t(i * ldy + j)] : y0[size_t(i * ldy + j)]);
      if (g.bias) v += bias[size_t(j)];
      y[size_t(i * ldy + j)] = v;
    }
  return y;
}

template <class TA, class TY>
void run_gemm_case(Context& ctx, const GemmCase& g, std::mt19937& gen) {
  const int64_t x_rows = g.op == GemmOp::tn ? g.k : g.m, x_cols = g.op == GemmOp::tn ? g.m : g.k;
  const int64_t b_rows = g.op == GemmOp::nt ? g.n : g.k, b_cols = g.op == GemmOp::nt ? g.k : g.n;
  const int64_t ldx = x_cols + g.pad_x, ldb = b_cols + g.pad_b, ldy = g.n + g.pad_y;
  const Vec x = random_vec(size_t(x_rows * ldx), gen), b = random_vec(size_t(b_rows * ldb), gen);
  const Vec y0 = random_vec(size_t(g.m * ldy), gen), c = random_vec(size_t(g.m * ldy), gen);
  const Vec bias = random_vec(size_t(g.n), gen);

  auto dx = upload<TA>(ctx, x);
  auto db = upload<TA>(ctx, b);
  auto dy = upload<TY>(ctx, y0);
  auto dc = upload<TY>(ctx, c);
  auto dbias = upload<TY>(ctx, bias);
  GemmEpilogue<TY> e;
  e.alpha = g.alpha;
  e.beta = g.beta;
  if (g.separate_c) {
    e.c = dc.data();
    e.ldc = ldy;
  }
  if (g.bias) e.bias = dbias.data();
  switch (g.op) {
    case GemmOp::nt: clip::cuda::gemm_nt(ctx, g.m, g.n, g.k, dx.data(), ldx, db.data(), ldb, dy.data(), ldy, e); break;
    case GemmOp::nn: clip::cuda::gemm_nn(ctx, g.m, g.n, g.k, dx.data(), ldx, db.data(), ldb, dy.data(), ldy, e); break;
    case GemmOp::tn: clip::cuda::gemm_tn(ctx, g.m, g.n, g.k, dx.data(), ldx, db.data(), ldb, dy.data(), ldy, e); break;
  }
  const Vec got = download(ctx, dy);

  const Vec exact = cpu_gemm(g, ldx, ldb, ldy, x, b, as_stored<TY>(y0), c, bias);
  Vec emulated = cpu_gemm(g, ldx, ldb, ldy, as_stored<TA>(x), as_stored<TA>(b), as_stored<TY>(y0),
                          as_stored<TY>(c), as_stored<TY>(bias));
  emulated = as_stored<TY>(emulated);
  const bool bf16_mode = !std::is_same_v<TA, float>;
  const std::string what = std::string("gemm op ") + std::to_string(int(g.op)) + " m " + std::to_string(g.m) +
                           " n " + std::to_string(g.n) + " k " + std::to_string(g.k) +
                           (std::is_same_v<TA, float> ? " fp32" : std::is_same_v<TY, float> ? " bf16->fp32" : " bf16");
  check_output(what, bf16_mode, got, exact, emulated);
  // The padding of y is never written.
  bool padding_kept = true;
  const Vec stored_y0 = as_stored<TY>(y0);
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = g.n; j < ldy; ++j) padding_kept &= got[size_t(i * ldy + j)] == stored_y0[size_t(i * ldy + j)];
  BOOST_TEST(padding_kept, what << ": padding of y written");
}

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> cases;
  for (GemmOp op : {GemmOp::nt, GemmOp::nn, GemmOp::tn}) {
    cases.push_back({op, 1, 64, 48});
    cases.push_back({op, 77, 96, 64});
    cases.push_back({op, 50, 128, 256, 0, 0, 0, 1, 0, false, true});      // bias
    cases.push_back({op, 33, 40, 72, 8, 8, 8, 1, 1});                      // accumulate into y, padded
    cases.push_back({op, 13, 24, 32, 0, 0, 0, 0.5f, 1, true, true});      // residual C + bias, alpha
    cases.push_back({op, 7, 37, 29, 3, 5, 1});                             // odd sizes and strides
    cases.push_back({op, 5, 17, 11, 1, 2, 3, 1, 0.75f, false, true});     // odd everything, beta, bias
  }
  return cases;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_gemm)

BOOST_AUTO_TEST_CASE(gemm_fp32_matches_cpu) {
  Context ctx;
  std::mt19937 gen(1);
  for (const GemmCase& g : gemm_cases()) run_gemm_case<float, float>(ctx, g, gen);
}

BOOST_AUTO_TEST_CASE(gemm_bf16_within_twice_the_emulated_error) {
  Context ctx;
  std::mt19937 gen(2);
  for (const GemmCase& g : gemm_cases()) run_gemm_case<bf16, bf16>(ctx, g, gen);
}

BOOST_AUTO_TEST_CASE(gemm_bf16_into_fp32_accumulates) {
  Context ctx;
  std::mt19937 gen(3);
  for (const GemmCase& g : gemm_cases()) run_gemm_case<bf16, float>(ctx, g, gen);
}

BOOST_AUTO_TEST_CASE(gemm_unaligned_column_slices) {
  // One head's slice of a packed [rows, 3C] matrix: pointers offset by an odd number of elements.
  Context ctx;
  std::mt19937 gen(4);
  constexpr int64_t rows = 19, C = 64, ld = 3 * C + 1;
  const Vec x = random_vec(size_t(rows * ld), gen), w = random_vec(size_t(C * C), gen);
  for (int64_t offset : {int64_t{1}, int64_t{3}, C + 1}) {
    auto dx = upload<float>(ctx, x);
    auto dw = upload<float>(ctx, w);
    DeviceBuffer<float> dy(rows * ld);
    dy.zero(ctx.stream());
    clip::cuda::gemm_nt(ctx, rows, C, C, dx.data() + offset, ld, dw.data(), C, dy.data() + offset, ld);
    const Vec got = download(ctx, dy);
    Vec want(size_t(rows * ld), 0.0f);
    clip::gemm_nt(rows, C, C, x.data() + offset, ld, w.data(), C, want.data() + offset, ld, false);
    check_output("unaligned slice offset " + std::to_string(offset), false, got, want, want);
  }
  // A bias less than 16-byte aligned takes the separate bias kernel; 16-byte aligned, the epilogue.
  const Vec bias = random_vec(C + 4, gen);
  for (int64_t offset : {int64_t{1}, int64_t{4}}) {
    auto dx = upload<float>(ctx, x);
    auto dw = upload<float>(ctx, w);
    auto dbias = upload<float>(ctx, bias);
    DeviceBuffer<float> dy(rows * C);
    GemmEpilogue<float> e;
    e.bias = dbias.data() + offset;
    clip::cuda::gemm_nt(ctx, rows, C, C, dx.data(), ld, dw.data(), C, dy.data(), C, e);
    const Vec got = download(ctx, dy);
    Vec want(size_t(rows * C));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < C; ++j) want[size_t(i * C + j)] = bias[size_t(offset + j)];
    clip::gemm_nt(rows, C, C, x.data(), ld, w.data(), C, want.data(), C, true);
    check_output("bias offset " + std::to_string(offset), false, got, want, want);
  }
}

BOOST_AUTO_TEST_CASE(plans_are_built_once_per_shape) {
  Context ctx;
  std::mt19937 gen(5);
  DeviceBuffer<float> x(64 * 32), w(16 * 32), y(64 * 16);
  x.zero(ctx.stream());
  w.zero(ctx.stream());
  const size_t before = ctx.plans().size();
  for (int i = 0; i < 3; ++i) clip::cuda::gemm_nt(ctx, 64, 16, 32, x.data(), 32, w.data(), 32, y.data(), 16);
  BOOST_TEST(ctx.plans().size() == before + 1);
  clip::cuda::gemm_nt(ctx, 63, 16, 32, x.data(), 32, w.data(), 32, y.data(), 16);  // another row count
  BOOST_TEST(ctx.plans().size() == before + 2);
  ctx.synchronize();
}

// ----- linear layers --------------------------------------------------------------------------

namespace {

// CPU forward/backward of one layer on host vectors (fp32 ops). store: rounding of S outputs.
template <int In, int Out>
struct CpuLinear {
  Vec out, d_in, d_w, d_b;
  void forward(const Vec& in, const Vec& w, const Vec& b, const Vec* residual, int64_t rows) {
    out.assign(size_t(rows * Out), 0.0f);
    if (residual)
      clip::linear_residual_forward<In, Out>(out.data(), in.data(), w.data(), b.data(), residual->data(), rows);
    else
      clip::linear_forward<In, Out>(out.data(), in.data(), w.data(), b.data(), rows);
  }
  void backward(const Vec& d_out, const Vec& in, const Vec& w, const Vec& d_w0, const Vec& d_b0, int64_t rows) {
    d_in.assign(size_t(rows * In), 0.0f);
    d_w = d_w0;
    d_b = d_b0;
    clip::linear_backward<In, Out>(d_in.data(), d_w.data(), d_b.data(), d_out.data(), in.data(), w.data(), rows);
  }
};

template <class S>
void run_linear(int64_t rows, std::mt19937& gen) {
  constexpr int In = 48, Out = 80;
  const bool bf16_mode = std::is_same_v<S, bf16>;
  Context ctx;
  const Vec in = random_vec(size_t(rows * In), gen), w = random_vec(size_t(Out * In), gen, 0.2f);
  const Vec b = random_vec(Out, gen), residual = random_vec(size_t(rows * Out), gen);
  const Vec d_out = random_vec(size_t(rows * Out), gen);
  const Vec d_w0 = random_vec(size_t(Out * In), gen), d_b0 = random_vec(Out, gen);
  const std::string tag = std::string(bf16_mode ? " bf16" : " fp32") + " rows " + std::to_string(rows);

  auto din = upload<S>(ctx, in);
  auto dw = upload<S>(ctx, w);
  auto db = upload<S>(ctx, b);
  auto dres = upload<S>(ctx, residual);
  auto ddout = upload<S>(ctx, d_out);
  auto ddw = upload<float>(ctx, d_w0);
  auto ddb = upload<float>(ctx, d_b0);
  DeviceBuffer<S> dout(rows * Out), ddin(rows * In);

  CpuLinear<In, Out> exact, emul;
  const Vec in_s = as_stored<S>(in), w_s = as_stored<S>(w), b_s = as_stored<S>(b), res_s = as_stored<S>(residual);
  const Vec dout_s = as_stored<S>(d_out);

  // Forward with bias.
  clip::cuda::linear_forward<In, Out>(ctx, dout.data(), din.data(), dw.data(), db.data(), rows);
  exact.forward(in, w, b, nullptr, rows);
  emul.forward(in_s, w_s, b_s, nullptr, rows);
  check_output("linear_forward" + tag, bf16_mode, download(ctx, dout), exact.out, as_stored<S>(emul.out));

  // Forward with a residual, in place (out is the residual buffer).
  clip::cuda::linear_forward<In, Out>(ctx, dres.data(), din.data(), dw.data(), db.data(), rows, dres.data());
  exact.forward(in, w, b, &residual, rows);
  emul.forward(in_s, w_s, b_s, &res_s, rows);
  check_output("linear_forward residual in place" + tag, bf16_mode, download(ctx, dres), exact.out,
               as_stored<S>(emul.out));

  // Backward: d_in assigned, d_w and d_b accumulated in fp32.
  clip::cuda::linear_backward<In, Out>(ctx, ddin.data(), ddw.data(), ddb.data(), ddout.data(), din.data(), dw.data(),
                                       rows);
  exact.backward(d_out, in, w, d_w0, d_b0, rows);
  emul.backward(dout_s, in_s, w_s, d_w0, d_b0, rows);
  check_output("linear_backward d_in" + tag, bf16_mode, download(ctx, ddin), exact.d_in, as_stored<S>(emul.d_in));
  // Compare the accumulated part (the initial values would hide errors at small rows).
  auto minus = [](Vec a, const Vec& b0) {
    for (size_t i = 0; i < a.size(); ++i) a[i] -= b0[i];
    return a;
  };
  check_output("linear_backward d_w" + tag, bf16_mode, minus(download(ctx, ddw), d_w0), minus(exact.d_w, d_w0),
               minus(emul.d_w, d_w0));
  check_output("linear_backward d_b" + tag, bf16_mode, minus(download(ctx, ddb), d_b0), minus(exact.d_b, d_b0),
               minus(emul.d_b, d_b0));

  // Backward with the optional outputs skipped: d_w accumulates again, nothing else is touched.
  ddin.zero(ctx.stream());
  const Vec d_b_before = download(ctx, ddb);
  clip::cuda::linear_backward<In, Out>(ctx, nullptr, ddw.data(), nullptr, ddout.data(), din.data(), dw.data(), rows);
  const Vec d_w_twice = download(ctx, ddw);
  Vec want = exact.d_w;
  for (size_t i = 0; i < want.size(); ++i) want[i] += exact.d_w[i] - d_w0[i];
  Vec want_emul = emul.d_w;
  for (size_t i = 0; i < want_emul.size(); ++i) want_emul[i] += emul.d_w[i] - d_w0[i];
  check_output("linear_backward d_w twice" + tag, bf16_mode, minus(d_w_twice, d_w0), minus(want, d_w0),
               minus(want_emul, d_w0));
  BOOST_TEST(max_abs(download(ctx, ddin)) == 0.0);
  BOOST_TEST(max_diff(download(ctx, ddb), d_b_before) == 0.0);
}

template <class S>
void run_projection(int64_t rows, std::mt19937& gen) {
  constexpr int In = 64, Out = 40;
  const bool bf16_mode = std::is_same_v<S, bf16>;
  Context ctx;
  const Vec in = random_vec(size_t(rows * In), gen), p = random_vec(size_t(In * Out), gen, 0.2f);
  const Vec d_out = random_vec(size_t(rows * Out), gen), d_p0 = random_vec(size_t(In * Out), gen);
  const std::string tag = std::string(bf16_mode ? " bf16" : " fp32") + " rows " + std::to_string(rows);
  auto din = upload<S>(ctx, in);
  auto dp = upload<S>(ctx, p);
  auto ddout = upload<S>(ctx, d_out);
  auto ddp = upload<float>(ctx, d_p0);
  DeviceBuffer<S> dout(rows * Out), ddin(rows * In);

  auto cpu_forward = [&](const Vec& x, const Vec& pp) {
    Vec o(size_t(rows * Out));
    clip::projection_forward<In, Out>(o.data(), x.data(), pp.data(), rows);
    return o;
  };
  clip::cuda::projection_forward<In, Out>(ctx, dout.data(), din.data(), dp.data(), rows);
  check_output("projection_forward" + tag, bf16_mode, download(ctx, dout), cpu_forward(in, p),
               as_stored<S>(cpu_forward(as_stored<S>(in), as_stored<S>(p))));

  auto cpu_backward = [&](const Vec& dy, const Vec& x, const Vec& pp, Vec& d_in, Vec& d_p) {
    d_in.assign(size_t(rows * In), 0.0f);
    d_p = d_p0;
    clip::projection_backward<In, Out>(d_in.data(), d_p.data(), dy.data(), x.data(), pp.data(), rows);
    for (size_t i = 0; i < d_p.size(); ++i) d_p[i] -= d_p0[i];
  };
  Vec e_din, e_dp, m_din, m_dp;
  cpu_backward(d_out, in, p, e_din, e_dp);
  cpu_backward(as_stored<S>(d_out), as_stored<S>(in), as_stored<S>(p), m_din, m_dp);
  clip::cuda::projection_backward<In, Out>(ctx, ddin.data(), ddp.data(), ddout.data(), din.data(), dp.data(), rows);
  check_output("projection_backward d_in" + tag, bf16_mode, download(ctx, ddin), e_din, as_stored<S>(m_din));
  Vec got_dp = download(ctx, ddp);
  for (size_t i = 0; i < got_dp.size(); ++i) got_dp[i] -= d_p0[i];
  check_output("projection_backward d_p" + tag, bf16_mode, got_dp, e_dp, m_dp);
}

}  // namespace

BOOST_AUTO_TEST_CASE(linear_fp32) {
  std::mt19937 gen(6);
  for (int64_t rows : {1, 7, 64, 333}) run_linear<float>(rows, gen);
}

BOOST_AUTO_TEST_CASE(linear_bf16) {
  std::mt19937 gen(7);
  for (int64_t rows : {1, 7, 64, 333}) run_linear<bf16>(rows, gen);
}

BOOST_AUTO_TEST_CASE(projection_fp32_and_bf16) {
  std::mt19937 gen(8);
  for (int64_t rows : {1, 5, 50}) {
    run_projection<float>(rows, gen);
    run_projection<bf16>(rows, gen);
  }
}

BOOST_AUTO_TEST_CASE(column_sums_match_cpu_and_are_deterministic) {
  Context ctx;
  std::mt19937 gen(9);
  constexpr int N = 200;
  for (int64_t rows : {1, 3, 255, 257, 5000, 40001}) {
    const Vec x = random_vec(size_t(rows * N), gen), s0 = random_vec(N, gen);
    auto dx = upload<float>(ctx, x);
    auto ds = upload<float>(ctx, s0);
    clip::cuda::column_sums_accumulate<N>(ctx, ds.data(), dx.data(), rows);
    const Vec got = download(ctx, ds);
    Vec want = s0;
    clip::column_sums_accumulate(want.data(), x.data(), rows, N);
    Vec got_part = got, want_part = want;
    for (int j = 0; j < N; ++j) {
      got_part[j] -= s0[j];
      want_part[j] -= s0[j];
    }
    check_output("column sums rows " + std::to_string(rows), false, got_part, want_part, want_part);
    // Same inputs, same bits.
    auto ds2 = upload<float>(ctx, s0);
    clip::cuda::column_sums_accumulate<N>(ctx, ds2.data(), dx.data(), rows);
    BOOST_TEST(max_diff(download(ctx, ds2), got) == 0.0);
    // bf16 inputs: sums of the stored values.
    auto dxb = upload<bf16>(ctx, x);
    auto ds3 = upload<float>(ctx, s0);
    clip::cuda::column_sums_accumulate<N>(ctx, ds3.data(), dxb.data(), rows);
    Vec want_b = s0;
    const Vec xr = rounded(x);
    clip::column_sums_accumulate(want_b.data(), xr.data(), rows, N);
    Vec got_b = download(ctx, ds3);
    for (int j = 0; j < N; ++j) {
      got_b[j] -= s0[j];
      want_b[j] -= s0[j];
    }
    check_output("column sums bf16 inputs rows " + std::to_string(rows), false, got_b, want_b, want_b);
  }
}

BOOST_AUTO_TEST_CASE(convert_rounds_like_the_host) {
  Context ctx;
  std::mt19937 gen(10);
  Vec x = random_vec(100003, gen, 1000.0f);
  x[0] = NAN;
  x[1] = INFINITY;
  x[2] = std::bit_cast<float>(0x3f808000u);  // a tie
  DeviceBuffer<float> df(int64_t(x.size()));
  df.upload(x.data(), int64_t(x.size()), ctx.stream());
  DeviceBuffer<bf16> db(int64_t(x.size())), db2(int64_t(x.size()));
  DeviceBuffer<float> back(int64_t(x.size()));
  clip::cuda::convert<bf16>(ctx, db.data(), df.data(), int64_t(x.size()));
  clip::cuda::convert(ctx, db2.data(), db.data(), int64_t(x.size()));
  clip::cuda::convert(ctx, back.data(), db2.data(), int64_t(x.size()));
  Vec got(x.size());
  back.download(got.data(), int64_t(got.size()), ctx.stream());
  bool same = true;
  for (size_t i = 0; i < x.size(); ++i) {
    const float want = clip::round_to_bf16(x[i]);
    same &= std::isnan(want) ? std::isnan(got[i]) : got[i] == want;
  }
  BOOST_TEST(same);
}

BOOST_AUTO_TEST_CASE(arena_plans_then_allocates_once) {
  Arena plan = Arena::planner();
  BOOST_TEST(plan.take<float>(3) == nullptr);
  BOOST_TEST(plan.take<bf16>(1000) == nullptr);
  BOOST_TEST(plan.take<int32_t>(0) == nullptr);
  // 12 bytes, then 2000 from offset 256, then an empty piece at the next boundary (2304).
  BOOST_TEST(plan.used() == 2304);
  Arena arena(plan.used());
  float* a = arena.take<float>(3);
  bf16* b = arena.take<bf16>(1000);
  BOOST_TEST(reinterpret_cast<uintptr_t>(a) % 256 == 0);
  BOOST_TEST(reinterpret_cast<uintptr_t>(b) % 256 == 0);
  BOOST_TEST(reinterpret_cast<char*>(b) - reinterpret_cast<char*>(a) == 256);
  arena.take<int32_t>(0);
  BOOST_CHECK_THROW(arena.take<float>(1), clip::Error);
}

BOOST_AUTO_TEST_SUITE_END()
