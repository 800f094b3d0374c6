// The CPU ops against naive double-precision loops on random inputs.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "clip/ops/activation.hpp"
#include "clip/ops/attention.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/linear.hpp"

using namespace clip;

namespace {

std::vector<float> random_vector(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(gen);
  return v;
}

// ||got - ref|| / ||ref||
double relative_error(const std::vector<float>& got, const std::vector<double>& ref) {
  BOOST_REQUIRE_EQUAL(got.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

// Naive multi-head attention in double: out [B, Tq, H*D], probs [B, H, Tq, Tk].
void naive_attention(std::vector<double>& out, std::vector<double>& probs, const std::vector<float>& q,
                     int64_t q_rs, int64_t q_bs, const float* k, const float* v, int64_t kv_rs, int64_t kv_bs,
                     int64_t batch, int heads, int d, int64_t tq, int64_t tk, bool causal) {
  const int64_t c = int64_t{heads} * d;
  out.assign(batch * tq * c, 0.0);
  probs.assign(batch * heads * tq * tk, 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i = 0; i < tq; ++i) {
        std::vector<double> s(tk);
        double m = -INFINITY;
        for (int64_t j = 0; j < tk; ++j) {
          if (causal && j > i + (tk - tq)) { s[j] = -INFINITY; continue; }
          double dot = 0;
          for (int e = 0; e < d; ++e)
            dot += double(q[b * q_bs + i * q_rs + h * d + e]) * k[b * kv_bs + j * kv_rs + h * d + e];
          s[j] = dot / std::sqrt(double(d));
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < tk; ++j) sum += (s[j] = std::exp(s[j] - m));
        for (int64_t j = 0; j < tk; ++j) {
          const double p = s[j] / sum;
          probs[((b * heads + h) * tq + i) * tk + j] = p;
          for (int e = 0; e < d; ++e) out[(b * tq + i) * c + h * d + e] += p * v[b * kv_bs + j * kv_rs + h * d + e];
        }
      }
}

}  // namespace

BOOST_AUTO_TEST_CASE(linear_matches_naive_loops) {
  constexpr int In = 48, Out = 80;
  const int64_t rows = 37;
  auto x = random_vector(rows * In, 1), w = random_vector(Out * In, 2), b = random_vector(Out, 3);
  auto res = random_vector(rows * Out, 4);
  std::vector<double> ref(rows * Out), ref_res(rows * Out);
  for (int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < Out; ++o) {
      double acc = b[o];
      for (int i = 0; i < In; ++i) acc += double(x[r * In + i]) * w[o * In + i];
      ref[r * Out + o] = acc;
      ref_res[r * Out + o] = acc + res[r * Out + o];
    }
  std::vector<float> y(rows * Out);
  linear_forward<In, Out>(y.data(), x.data(), w.data(), b.data(), rows);
  BOOST_TEST(relative_error(y, ref) < 1e-6);

  // Residual folded in, in place (out == residual), as the blocks use it.
  std::vector<float> inplace = res;
  linear_residual_forward<In, Out>(inplace.data(), x.data(), w.data(), b.data(), inplace.data(), rows);
  BOOST_TEST(relative_error(inplace, ref_res) < 1e-6);

  // No bias.
  linear_forward<In, Out>(y.data(), x.data(), w.data(), nullptr, rows);
  std::vector<double> ref_nb(rows * Out);
  for (int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < Out; ++o) ref_nb[r * Out + o] = ref[r * Out + o] - b[o];
  BOOST_TEST(relative_error(y, ref_nb) < 1e-6);

  // Projection x @ P with P [In, Out].
  auto p = random_vector(In * Out, 5);
  std::vector<double> ref_p(rows * Out, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < In; ++i)
      for (int o = 0; o < Out; ++o) ref_p[r * Out + o] += double(x[r * In + i]) * p[i * Out + o];
  projection_forward<In, Out>(y.data(), x.data(), p.data(), rows);
  BOOST_TEST(relative_error(y, ref_p) < 1e-6);
}

BOOST_AUTO_TEST_CASE(layernorm_matches_naive_loops_and_keeps_statistics) {
  constexpr int C = 96;
  const int64_t rows = 513;  // enough to run the parallel path
  auto x = random_vector(rows * C, 6, 3.0f), w = random_vector(C, 7), b = random_vector(C, 8);
  for (int64_t i = 0; i < rows * C; ++i) x[i] += 5.0f;  // an offset mean
  std::vector<double> ref(rows * C), ref_mean(rows), ref_rstd(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double m = 0, var = 0;
    for (int j = 0; j < C; ++j) m += x[r * C + j];
    m /= C;
    for (int j = 0; j < C; ++j) var += (x[r * C + j] - m) * (x[r * C + j] - m);
    var /= C;
    const double s = 1.0 / std::sqrt(var + 1e-5);
    for (int j = 0; j < C; ++j) ref[r * C + j] = (x[r * C + j] - m) * s * w[j] + b[j];
    ref_mean[r] = m;
    ref_rstd[r] = s;
  }
  std::vector<float> y(rows * C), mean(rows), rstd(rows);
  layernorm_forward<C>(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), rows);
  BOOST_TEST(relative_error(y, ref) < 1e-6);
  BOOST_TEST(relative_error(mean, ref_mean) < 1e-6);
  BOOST_TEST(relative_error(rstd, ref_rstd) < 1e-6);

  layernorm_forward<C>(x.data(), nullptr, nullptr, x.data(), w.data(), b.data(), rows);  // in place
  BOOST_TEST(relative_error(x, ref) < 1e-6);
}

BOOST_AUTO_TEST_CASE(quick_gelu_matches_its_formula) {
  auto x = random_vector(40000, 9, 4.0f);
  x[0] = -200.0f;  // exp overflows: the result must be 0, not NaN
  x[1] = 200.0f;
  std::vector<double> ref(x.size());
  for (size_t i = 0; i < x.size(); ++i) ref[i] = x[i] / (1.0 + std::exp(-1.702 * x[i]));
  std::vector<float> y(x.size());
  quick_gelu_forward(y.data(), x.data(), static_cast<int64_t>(x.size()));
  BOOST_TEST(relative_error(y, ref) < 1e-6);
  BOOST_TEST(std::abs(y[0]) == 0.0f);
  BOOST_TEST(y[1] == 200.0f);
}

BOOST_AUTO_TEST_CASE(self_attention_matches_naive_loops_causal_and_not) {
  constexpr int H = 3, D = 16, C = H * D;
  const int64_t batch = 2, t = 11;
  auto qkv = random_vector(batch * t * 3 * C, 10);
  for (bool causal : {false, true}) {
    BOOST_TEST_CONTEXT("causal " << causal) {
      std::vector<double> ref, ref_probs;
      naive_attention(ref, ref_probs, qkv, 3 * C, t * 3 * C, qkv.data() + C, qkv.data() + 2 * C, 3 * C, t * 3 * C,
                      batch, H, D, t, t, causal);
      std::vector<float> out(batch * t * C), probs(batch * H * t * t, -1.0f);
      self_attention_forward<H, D>(out.data(), probs.data(), qkv.data(), batch, t, causal);
      BOOST_TEST(relative_error(out, ref) < 1e-6);
      BOOST_TEST(relative_error(probs, ref_probs) < 1e-6);
      if (causal) {  // masked probabilities are exactly zero
        bool zeros = true;
        for (int64_t bh = 0; bh < batch * H; ++bh)
          for (int64_t i = 0; i < t; ++i)
            for (int64_t j = i + 1; j < t; ++j) zeros = zeros && probs[(bh * t + i) * t + j] == 0.0f;
        BOOST_TEST(zeros);
      }
    }
  }
  // The causal mask changes the result (the test above is not vacuous).
  std::vector<float> a(batch * t * C), b(batch * t * C), probs(batch * H * t * t);
  self_attention_forward<H, D>(a.data(), probs.data(), qkv.data(), batch, t, false);
  self_attention_forward<H, D>(b.data(), probs.data(), qkv.data(), batch, t, true);
  BOOST_TEST(a != b);
}

BOOST_AUTO_TEST_CASE(attention_with_one_query_and_strided_keys) {
  // Attention pooling: one query per sample against T keys, q and k/v in separate buffers with
  // their own strides (k and v interleaved in one [B, T, 2C] buffer).
  constexpr int H = 4, D = 8, C = H * D;
  const int64_t batch = 3, tk = 5;
  auto q = random_vector(batch * C, 11);
  auto kv = random_vector(batch * tk * 2 * C, 12);
  std::vector<double> ref, ref_probs;
  naive_attention(ref, ref_probs, q, C, C, kv.data(), kv.data() + C, 2 * C, tk * 2 * C, batch, H, D, 1, tk, false);
  std::vector<float> out(batch * C), probs(batch * H * tk);
  attention_forward<H, D>(RowsView<float>{out.data(), C, C}, probs.data(), RowsView<const float>{q.data(), C, C},
                          RowsView<const float>{kv.data(), 2 * C, tk * 2 * C},
                          RowsView<const float>{kv.data() + C, 2 * C, tk * 2 * C}, batch, 1, tk, false);
  BOOST_TEST(relative_error(out, ref) < 1e-6);
  BOOST_TEST(relative_error(probs, ref_probs) < 1e-6);
}

BOOST_AUTO_TEST_CASE(embedding_gathers_rows_and_pools_at_the_first_maximum) {
  constexpr int C = 4;
  const int64_t v = 10, context = 6, batch = 2;
  auto wte = random_vector(v * C, 13), wpe = random_vector(context * C, 14);
  const std::vector<int64_t> ids = {7, 3, 9, 9, 0, 0,   // first maximum at 2, not 3
                                    9, 1, 2, 0, 0, 0};  // at 0
  BOOST_TEST(pool_position(ids.data(), context) == 2);
  BOOST_TEST(pool_position(ids.data() + context, context) == 0);
  const int64_t tokens = 4;
  std::vector<float> out(batch * tokens * C);
  embedding_forward<C>(out.data(), ids.data(), wte.data(), wpe.data(), batch, context, tokens);
  bool same = true;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < tokens; ++t)
      for (int j = 0; j < C; ++j)
        same = same && out[(b * tokens + t) * C + j] == wte[ids[b * context + t] * C + j] + wpe[t * C + j];
  BOOST_TEST(same);
  const std::vector<int32_t> bad = {1, 10};
  BOOST_CHECK_THROW(check_token_ids(bad.data(), 2, v), Error);
}
