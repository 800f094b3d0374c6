// The transformer side's backward passes against central finite differences: each op
// (LayerNorm, QuickGELU, attention causal and not, embedding, linear and projection), a whole
// residual attention block, and small vision and text towers. The scalar loss is
// sum(r * out) for a fixed random r, accumulated in double; the forward passes are float, so the
// steps are large enough (h = 1e-2) that float rounding stays far below the tolerance while the
// truncation error (~h^2) does too. Per tensor the error is max |fd - analytic| / max |analytic|:
// measured <= 6e-5 for the ops, <= 2e-4 for a block, <= 1.1e-3 for the towers (float rounding of
// the forward over 2h); a wrong gradient is off by O(1).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "clip/blocks/residual_attention_block.hpp"
#include "clip/models/clip_model.hpp"
#include "clip/models/transformer.hpp"
#include "clip/ops/activation.hpp"
#include "clip/ops/attention.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/linear.hpp"
#include "clip/tensor/param.hpp"
#include "numeric.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace clip;

namespace {

constexpr double step = 1e-2;        // finite-difference step
constexpr double tolerance = 5e-3;   // max |fd - analytic| / max |analytic| per tensor

using clip::test::random_vector;

// max |a - b| / max |b|. forward_train's last block runs only the pooled rows (one query per
// sample, a matrix-vector product), so its features equal forward()'s up to summation order.
double max_relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

// sum r * out in double: the scalar loss whose gradient with respect to out is r.
double weighted_sum(const float* out, const std::vector<float>& r) {
  double s = 0;
  for (size_t i = 0; i < r.size(); ++i) s += double(r[i]) * out[i];
  return s;
}

// Compares analytic[i] with the central difference of loss() in x[i], for every i when n is
// small, else for the element of largest |analytic| and `samples` random others. Returns the
// error relative to max |analytic| over the whole tensor, and reports it.
double fd_error(const std::string& name, float* x, const float* analytic, int64_t n,
                const std::function<double()>& loss, int samples = 48, uint32_t seed = 7) {
  std::vector<int64_t> indices;
  int64_t argmax = 0;
  double max_ref = 0;
  for (int64_t i = 0; i < n; ++i)
    if (std::abs(analytic[i]) > max_ref) max_ref = std::abs(analytic[i]), argmax = i;
  if (n <= samples) {
    for (int64_t i = 0; i < n; ++i) indices.push_back(i);
  } else {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int64_t> pick(0, n - 1);
    indices.push_back(argmax);
    for (int s = 0; s < samples; ++s) indices.push_back(pick(gen));
  }
  double max_diff = 0;
  for (int64_t i : indices) {
    const float v = x[i];
    x[i] = static_cast<float>(v + step);
    const double up = loss();
    x[i] = static_cast<float>(v - step);
    const double down = loss();
    x[i] = v;
    // The step actually taken in float, not the nominal one.
    const double h2 = double(static_cast<float>(v + step)) - double(static_cast<float>(v - step));
    max_diff = std::max(max_diff, std::abs((up - down) / h2 - analytic[i]));
  }
  const double err = max_diff / std::max(max_ref, 1e-30);
  BOOST_TEST_MESSAGE("  " << name << " [" << n << "]: max |analytic| " << max_ref << ", max |fd - analytic| "
                          << max_diff << ", relative " << err << " (" << indices.size() << " elements)");
  return err;
}

void check_fd(const std::string& name, float* x, const float* analytic, int64_t n, const std::function<double()>& loss,
              int samples = 48) {
  const double err = fd_error(name, x, analytic, n, loss, samples);
  BOOST_TEST(err <= tolerance, name << ": finite-difference error " << err << " exceeds " << tolerance);
}

// Fills a parameter struct with random values: LayerNorm gains near 1, everything else N(0, scale).
template <class Params>
void randomize(Params& p, uint32_t seed, float scale = 0.2f) {
  std::mt19937 gen(seed);
  for_each_tensor(p, [&](const std::string& name, auto& t, Role) {
    if constexpr (!is_counter_v<decltype(t)>) {
      const bool gain = name.find("ln_") != std::string::npos && name.find("weight") != std::string::npos;
      std::normal_distribution<float> dist(gain ? 1.0f : 0.0f, gain ? 0.1f : scale);
      for (float& v : t.values) v = dist(gen);
    }
  });
}

// The tensors of a parameter struct by name, in visit order, for walking params and grads together.
template <class Params>
std::vector<std::pair<std::string, std::pair<float*, int64_t>>> tensors_of(Params& p) {
  std::vector<std::pair<std::string, std::pair<float*, int64_t>>> out;
  for_each_tensor(p, [&](const std::string& name, auto& t, Role) {
    if constexpr (!is_counter_v<decltype(t)>) out.push_back({name, {t.data(), t.values.size()}});
  });
  return out;
}

// Every parameter tensor of `params` against its gradient in `grads`.
template <class Params>
void check_params_fd(Params& params, Params& grads, const std::function<double()>& loss, const std::string& prefix,
                     int samples = 48, const std::vector<std::string>& skip = {}) {
  auto ps = tensors_of(params), gs = tensors_of(grads);
  BOOST_REQUIRE_EQUAL(ps.size(), gs.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    if (std::find(skip.begin(), skip.end(), ps[i].first) != skip.end()) continue;
    check_fd(prefix + ps[i].first, ps[i].second.first, gs[i].second.first, ps[i].second.second, loss, samples);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(layernorm_backward_matches_finite_differences) {
  constexpr int C = 72;  // two column strips, the second partial
  const int64_t rows = 7;
  std::vector<float> x = random_vector(rows * C, 1, 1.5f, 0.3f), w = random_vector(C, 2, 0.3f, 1.0f),
                     b = random_vector(C, 3, 0.2f), r = random_vector(rows * C, 4);
  std::vector<float> out(x.size()), mean(rows), rstd(rows);
  auto loss = [&] {
    layernorm_forward<C>(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), rows);
    return weighted_sum(out.data(), r);
  };
  loss();
  std::vector<float> dx(x.size()), dw(C, 0.0f), db(C, 0.0f);
  layernorm_backward<C>(dx.data(), dw.data(), db.data(), r.data(), x.data(), mean.data(), rstd.data(), w.data(), rows);
  check_fd("layernorm d_in", x.data(), dx.data(), rows * C, loss);
  check_fd("layernorm d_weight", w.data(), dw.data(), C, loss);
  check_fd("layernorm d_bias", b.data(), db.data(), C, loss);

  // Parameter gradients accumulate; a residual gradient is added; d_in may be d_out in place.
  std::vector<float> dw2 = dw, db2 = db, res = random_vector(rows * C, 5), inplace = r;
  layernorm_backward<C>(inplace.data(), dw2.data(), db2.data(), inplace.data(), x.data(), mean.data(), rstd.data(),
                        w.data(), rows, res.data());
  for (int j = 0; j < C; ++j) {
    BOOST_TEST(dw2[j] == 2 * dw[j]);
    BOOST_TEST(db2[j] == 2 * db[j]);
  }
  double max_diff = 0;
  for (size_t i = 0; i < x.size(); ++i) max_diff = std::max(max_diff, std::abs(double(inplace[i]) - (res[i] + dx[i])));
  BOOST_TEST(max_diff <= 1e-6);
}

BOOST_AUTO_TEST_CASE(quick_gelu_backward_matches_finite_differences_and_sums_the_bias_gradient) {
  constexpr int F = 80;
  const int64_t rows = 6;
  std::vector<float> x = random_vector(rows * F, 11, 2.5f), r = random_vector(rows * F, 12), out(x.size());
  auto loss = [&] {
    quick_gelu_forward(out.data(), x.data(), rows * F);
    return weighted_sum(out.data(), r);
  };
  std::vector<float> dx(x.size()), dbias(F, 1.0f);
  quick_gelu_backward<F>(dx.data(), dbias.data(), r.data(), x.data(), rows);
  check_fd("quick_gelu d_in", x.data(), dx.data(), rows * F, loss, 200);
  for (int j = 0; j < F; ++j) {  // the fused bias gradient: 1 + column sums of d_in
    double sum = 1;
    for (int64_t i = 0; i < rows; ++i) sum += dx[i * F + j];
    BOOST_TEST(std::abs(dbias[j] - sum) <= 1e-5);
  }
  // Very negative and positive inputs: no NaN (exp overflows to inf, the gradient to 0 or 1).
  std::vector<float> big = {-200.0f, -90.0f, 90.0f, 200.0f}, ones(4, 1.0f), d(4);
  quick_gelu_backward<4>(d.data(), nullptr, ones.data(), big.data(), 1);
  BOOST_TEST(std::abs(d[0]) <= 1e-30);
  BOOST_TEST(std::abs(d[3] - 1.0f) <= 1e-6);
  for (float v : d) BOOST_TEST(std::isfinite(v));
}

BOOST_AUTO_TEST_CASE(self_attention_backward_matches_finite_differences) {
  constexpr int H = 2, D = 8, C = H * D;
  const int64_t batch = 2, tokens = 5;
  for (bool causal : {false, true}) {
    BOOST_TEST_MESSAGE((causal ? "causal:" : "not causal:"));
    std::vector<float> qkv = random_vector(batch * tokens * 3 * C, 21, 0.8f), r = random_vector(batch * tokens * C, 22);
    std::vector<float> out(batch * tokens * C), probs(batch * H * tokens * tokens);
    auto loss = [&] {
      self_attention_forward<H, D>(out.data(), probs.data(), qkv.data(), batch, tokens, causal);
      return weighted_sum(out.data(), r);
    };
    loss();
    std::vector<float> dqkv(qkv.size());
    self_attention_backward<H, D>(dqkv.data(), r.data(), probs.data(), qkv.data(), batch, tokens);
    check_fd(causal ? "causal attention d_qkv" : "attention d_qkv", qkv.data(), dqkv.data(),
             static_cast<int64_t>(qkv.size()), loss, 1000);
  }
}

BOOST_AUTO_TEST_CASE(attention_backward_with_one_query_and_strided_views) {
  // The attention pool's shape: one query against Tk keys, q/k/v in separate strided buffers.
  constexpr int H = 2, D = 4, C = H * D;
  const int64_t batch = 3, tk = 6, pad = 3;  // rows padded to C + pad floats
  const int64_t rs = C + pad;
  std::vector<float> q = random_vector(batch * rs, 31), k = random_vector(batch * tk * rs, 32),
                     v = random_vector(batch * tk * rs, 33), r = random_vector(batch * C, 34);
  std::vector<float> out(batch * C), probs(batch * H * tk);
  auto loss = [&] {
    attention_forward<H, D>(RowsView<float>{out.data(), C, C}, probs.data(), RowsView<const float>{q.data(), rs, rs},
                            RowsView<const float>{k.data(), rs, tk * rs}, RowsView<const float>{v.data(), rs, tk * rs},
                            batch, 1, tk, false);
    return weighted_sum(out.data(), r);
  };
  loss();
  std::vector<float> dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(v.size(), 0.0f);
  attention_backward<H, D>(RowsView<float>{dq.data(), rs, rs}, RowsView<float>{dk.data(), rs, tk * rs},
                           RowsView<float>{dv.data(), rs, tk * rs}, RowsView<const float>{r.data(), C, C}, probs.data(),
                           RowsView<const float>{q.data(), rs, rs}, RowsView<const float>{k.data(), rs, tk * rs},
                           RowsView<const float>{v.data(), rs, tk * rs}, batch, 1, tk);
  check_fd("pool attention d_q", q.data(), dq.data(), static_cast<int64_t>(q.size()), loss, 1000);
  check_fd("pool attention d_k", k.data(), dk.data(), static_cast<int64_t>(k.size()), loss, 1000);
  check_fd("pool attention d_v", v.data(), dv.data(), static_cast<int64_t>(v.size()), loss, 1000);
  for (int64_t i = 0; i < batch * tk; ++i)  // padding columns are never written
    for (int64_t j = C; j < rs; ++j) BOOST_TEST(dk[i * rs + j] == 0.0f);
}

BOOST_AUTO_TEST_CASE(embedding_backward_scatters_into_used_rows_only) {
  constexpr int V = 11, C = 70;
  const int64_t batch = 3, context = 6, tokens = 4;
  const std::vector<int32_t> ids = {1, 4, 4, 9, 0, 0,  // id 4 twice in one row
                                    4, 2, 7, 10, 0, 0, 3, 1, 10, 5, 0, 0};
  std::vector<float> wte = random_vector(V * C, 41), wpe = random_vector(context * C, 42),
                     r = random_vector(batch * tokens * C, 43), out(batch * tokens * C);
  auto loss = [&] {
    embedding_forward<C>(out.data(), ids.data(), wte.data(), wpe.data(), batch, context, tokens);
    return weighted_sum(out.data(), r);
  };
  std::vector<float> dwte(V * C, 0.0f), dwpe(context * C, 0.0f);
  embedding_backward<C>(dwte.data(), dwpe.data(), r.data(), ids.data(), batch, context, tokens);
  check_fd("embedding d_wte", wte.data(), dwte.data(), V * C, loss, V * C);
  check_fd("embedding d_wpe", wpe.data(), dwpe.data(), context * C, loss, context * C);
  for (int j = 0; j < C; ++j) {  // ids 6 and 8 never occur; 0 only past `tokens`; positions 4, 5 unused
    BOOST_TEST(dwte[6 * C + j] == 0.0f);
    BOOST_TEST(dwte[8 * C + j] == 0.0f);
    BOOST_TEST(dwte[0 * C + j] == 0.0f);
    BOOST_TEST(dwpe[4 * C + j] == 0.0f);
  }
}

BOOST_AUTO_TEST_CASE(linear_and_projection_backward_match_finite_differences) {
  constexpr int In = 24, Out = 40;
  const int64_t rows = 7;
  std::vector<float> x = random_vector(rows * In, 51), w = random_vector(Out * In, 52, 0.3f),
                     b = random_vector(Out, 53), r = random_vector(rows * Out, 54), out(rows * Out);
  auto loss = [&] {
    linear_forward<In, Out>(out.data(), x.data(), w.data(), b.data(), rows);
    return weighted_sum(out.data(), r);
  };
  std::vector<float> dx(x.size()), dw(w.size(), 0.0f), db(Out, 0.0f);
  linear_backward<In, Out>(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), rows);
  check_fd("linear d_in", x.data(), dx.data(), rows * In, loss, 200);
  check_fd("linear d_weight", w.data(), dw.data(), Out * In, loss, 200);
  check_fd("linear d_bias", b.data(), db.data(), Out, loss);

  // d_in may be the input's own buffer: the weight gradient is taken first.
  std::vector<float> dw2(w.size(), 0.0f), x2 = random_vector(rows * Out, 55), r2 = random_vector(rows * In, 56);
  std::vector<float> dx_ref(x2.size()), dw_ref(Out * In, 0.0f);
  linear_backward<Out, In>(dx_ref.data(), dw_ref.data(), nullptr, r2.data(), x2.data(), w.data(), rows);
  std::vector<float> aliased = x2;
  linear_backward<Out, In>(aliased.data(), dw2.data(), nullptr, r2.data(), aliased.data(), w.data(), rows);
  BOOST_TEST(aliased == dx_ref, boost::test_tools::per_element());
  BOOST_TEST(dw2 == dw_ref, boost::test_tools::per_element());

  std::vector<float> p = random_vector(In * Out, 57, 0.3f);
  auto proj_loss = [&] {
    projection_forward<In, Out>(out.data(), x.data(), p.data(), rows);
    return weighted_sum(out.data(), r);
  };
  std::vector<float> dpx(x.size()), dp(p.size(), 0.0f);
  projection_backward<In, Out>(dpx.data(), dp.data(), r.data(), x.data(), p.data(), rows);
  check_fd("projection d_in", x.data(), dpx.data(), rows * In, proj_loss, 200);
  check_fd("projection d_proj", p.data(), dp.data(), In * Out, proj_loss, 200);
}

namespace {

template <bool Causal>
void check_block() {
  using Block = ResidualAttentionBlock<32, 2, 6, Causal>;
  constexpr int C = Block::C;
  const int64_t batch = 2, tokens = 5;  // fewer tokens than the block's capacity: packed rows
  typename Block::Params p, g;
  randomize(p, Causal ? 61 : 62);
  zero(g);
  typename Block::Acts acts(batch);
  std::vector<float> x = random_vector(batch * tokens * C, 63), r = random_vector(batch * tokens * C, 64);
  std::vector<float> out(x.size());
  auto loss = [&] {
    Block::forward(p, acts, x.data(), out.data(), batch, tokens);
    return weighted_sum(out.data(), r);
  };
  loss();
  std::vector<float> dx(x.size());
  Block::backward(p, acts, x.data(), r.data(), dx.data(), g, batch, tokens);
  check_fd("d_in", x.data(), dx.data(), static_cast<int64_t>(x.size()), loss, 100);
  check_params_fd(p, g, loss, "", 48);

  // In place (d_in = d_out) gives the same input gradient; parameter gradients add up.
  typename Block::Params g2 = g;
  loss();
  std::vector<float> inplace = r;
  Block::backward(p, acts, x.data(), inplace.data(), inplace.data(), g2, batch, tokens);
  BOOST_TEST(inplace == dx, boost::test_tools::per_element());
  auto a = tensors_of(g), b = tensors_of(g2);
  for (size_t i = 0; i < a.size(); ++i)
    for (int64_t j = 0; j < a[i].second.second; ++j)
      BOOST_TEST_REQUIRE(b[i].second.first[j] == 2 * a[i].second.first[j], a[i].first << "[" << j << "]");
}

}  // namespace

BOOST_AUTO_TEST_CASE(residual_attention_block_backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("block, not causal:");
  check_block<false>();
  BOOST_TEST_MESSAGE("block, causal:");
  check_block<true>();
}

namespace {

// forward_pooled / backward_pooled against forward / backward with d_out zero outside the
// pooled rows: the same values up to summation order.
template <bool Causal>
void check_pooled_block() {
  using Block = ResidualAttentionBlock<32, 2, 6, Causal>;
  constexpr int C = Block::C;
  const int64_t batch = 3, tokens = 5;
  const std::vector<int64_t> pool = {4, 0, 2};
  typename Block::Params p, g_full, g_pooled;
  randomize(p, Causal ? 65 : 66);
  zero(g_full);
  zero(g_pooled);
  typename Block::Acts full(batch), pooled(batch);
  std::vector<float> x = random_vector(batch * tokens * C, 67), r = random_vector(batch * C, 68);
  std::vector<float> out(x.size()), out_pooled(batch * C);
  Block::forward(p, full, x.data(), out.data(), batch, tokens);
  Block::forward_pooled(p, pooled, x.data(), out_pooled.data(), pool.data(), batch, tokens);
  std::vector<float> out_at_pool(batch * C), d_out(x.size(), 0.0f);
  for (int64_t b = 0; b < batch; ++b)
    for (int j = 0; j < C; ++j) {
      out_at_pool[b * C + j] = out[(b * tokens + pool[b]) * C + j];
      d_out[(b * tokens + pool[b]) * C + j] = r[b * C + j];
    }
  BOOST_TEST(max_relative_difference(out_pooled, out_at_pool) <= 1e-6);

  std::vector<float> d_in(x.size()), d_in_pooled(x.size());
  Block::backward(p, full, x.data(), d_out.data(), d_in.data(), g_full, batch, tokens);
  std::copy(r.begin(), r.end(), d_in_pooled.begin());  // d_out [B, C] at the start of d_in (in place)
  Block::backward_pooled(p, pooled, x.data(), d_in_pooled.data(), d_in_pooled.data(), g_pooled, pool.data(), batch,
                         tokens);
  const double d_in_err = max_relative_difference(d_in_pooled, d_in);
  BOOST_TEST_MESSAGE("  pooled block" << (Causal ? " (causal)" : "") << ": d_in " << d_in_err);
  BOOST_TEST(d_in_err <= 1e-5);
  auto a = tensors_of(g_pooled), b = tensors_of(g_full);
  for (size_t i = 0; i < a.size(); ++i) {
    const std::vector<float> got(a[i].second.first, a[i].second.first + a[i].second.second);
    const std::vector<float> ref(b[i].second.first, b[i].second.first + b[i].second.second);
    const double err = max_relative_difference(got, ref);
    BOOST_TEST_MESSAGE("  pooled block " << a[i].first << ": " << err);
    BOOST_TEST(err <= 1e-5, a[i].first);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(pooled_block_matches_the_full_block_at_the_pooled_rows) {
  check_pooled_block<false>();
  check_pooled_block<true>();
}

BOOST_AUTO_TEST_CASE(transformer_recompute_gives_the_same_gradients) {
  using Stack = Transformer<32, 2, 3, 6, /*Causal=*/true>;
  constexpr int C = Stack::C;
  const int64_t batch = 3, tokens = 4;
  Stack::Params p, g_keep, g_recompute;
  randomize(p, 71);
  zero(g_keep);
  zero(g_recompute);
  std::vector<float> x = random_vector(batch * tokens * C, 72), r = random_vector(batch * tokens * C, 73);
  Stack::TrainActs keep(batch), recompute(batch, true);
  BOOST_TEST(Stack::TrainActs::floats_per_sample(true) < Stack::TrainActs::floats_per_sample(false));
  std::vector<float> d_keep = r, d_recompute = r;
  for (Stack::TrainActs* a : {&keep, &recompute}) {
    std::copy(x.begin(), x.end(), a->input(0));
    Stack::forward_train(p, *a, batch, tokens);
  }
  BOOST_TEST(std::equal(keep.output(), keep.output() + x.size(), recompute.output()));

  // The inference forward computes the same output.
  Stack::Acts acts(batch);
  std::vector<float> y = x;
  Stack::forward(p, acts, y.data(), batch, tokens);
  BOOST_TEST(std::equal(y.begin(), y.end(), keep.output()));

  Stack::backward(p, keep, d_keep.data(), g_keep, batch, tokens);
  Stack::backward(p, recompute, d_recompute.data(), g_recompute, batch, tokens);
  BOOST_TEST(d_keep == d_recompute, boost::test_tools::per_element());
  auto a = tensors_of(g_keep), b = tensors_of(g_recompute);
  for (size_t i = 0; i < a.size(); ++i)
    BOOST_TEST(std::equal(a[i].second.first, a[i].second.first + a[i].second.second, b[i].second.first), a[i].first);

  // And the stack's input gradient matches finite differences.
  auto loss = [&] {
    std::vector<float> z = x;
    Stack::forward(p, acts, z.data(), batch, tokens);
    return weighted_sum(z.data(), r);
  };
  check_fd("stack d_in", x.data(), d_keep.data(), static_cast<int64_t>(x.size()), loss, 100);
}

namespace {

// A tiny CLIP for finite differences: 8-pixel images in 4 patches, 8-token captions over 40 ids.
struct TinyTrain {
  static constexpr const char* name = "tiny-train";
  static constexpr int embed_dim = 16;
  static constexpr int image_resolution = 8;
  static constexpr int vision_layers = 2;
  static constexpr int vision_width = 64;
  static constexpr int vision_patch_size = 4;
  static constexpr int context_length = 8;
  static constexpr int vocab_size = 40;
  static constexpr int transformer_width = 32;
  static constexpr int transformer_heads = 2;
  static constexpr int transformer_layers = 2;
};

}  // namespace

BOOST_AUTO_TEST_CASE(vision_tower_backward_matches_finite_differences) {
  using Visual = VisionTransformer<TinyTrain>;
  constexpr int E = Visual::E, R = Visual::R;
  const int64_t batch = 3;
  for (bool recompute : {false, true}) {
    BOOST_TEST_MESSAGE("vision tower" << (recompute ? ", recomputing blocks:" : ":"));
    Visual::Params p, g;
    randomize(p, 81);
    zero(g);
    std::vector<float> images = random_vector(batch * 3 * R * R, 82), r = random_vector(batch * E, 83);
    std::vector<float> features(batch * E), train_features(batch * E);
    auto loss = [&] {
      Visual::forward(p, images.data(), features.data(), batch);
      return weighted_sum(features.data(), r);
    };
    Visual::TrainActs acts(batch + 1, recompute);  // capacity above the batch
    Visual::forward_train(p, acts, images.data(), train_features.data(), batch);
    loss();
    BOOST_TEST(max_relative_difference(train_features, features) <= 1e-6);
    Visual::backward(p, acts, r.data(), g, batch);
    check_params_fd(p, g, loss, "visual.", recompute ? 12 : 40);
  }
}

BOOST_AUTO_TEST_CASE(text_tower_backward_matches_finite_differences) {
  using Text = TextTransformer<TinyTrain>;
  constexpr int E = Text::E, T = Text::T, C = Text::C;
  const int64_t batch = 3;
  // Start 38, end 39 (the largest id: where each caption pools), padding 0. Pooled at 2, 4, 3:
  // the forward runs 5 of the 8 positions. Id 5 occurs in two captions.
  const std::vector<int64_t> tokens = {38, 5, 39, 0, 0, 0, 0, 0,  //
                                       38, 7, 5, 12, 39, 0, 0, 0,  //
                                       38, 20, 21, 39, 0, 0, 0, 0};
  BOOST_TEST(Text::positions_needed(tokens.data(), batch) == 5);
  for (bool recompute : {false, true}) {
    BOOST_TEST_MESSAGE("text tower" << (recompute ? ", recomputing blocks:" : ":"));
    Text::Params p, g;
    randomize(p, 91);
    zero(g);
    std::vector<float> r = random_vector(batch * E, 93), features(batch * E), train_features(batch * E);
    auto loss = [&] {
      Text::forward(p, tokens.data(), features.data(), batch);
      return weighted_sum(features.data(), r);
    };
    Text::TrainActs acts(batch, recompute);
    Text::forward_train(p, acts, tokens.data(), train_features.data(), batch);
    loss();
    BOOST_TEST(max_relative_difference(train_features, features) <= 1e-6);
    Text::backward(p, acts, r.data(), g, batch);
    // The token embedding in full (40 x 32): the used rows against finite differences, the others
    // exactly untouched. Positions past the last pooled one get no gradient.
    check_params_fd(p, g, loss, "", recompute ? 12 : 40, {"token_embedding.weight"});
    check_fd("token_embedding.weight", p.token_embedding.weight.data(), g.token_embedding.weight.data(),
             decltype(p.token_embedding.weight)::numel, loss, decltype(p.token_embedding.weight)::numel);
    for (int id : {1, 2, 30, 37})
      for (int j = 0; j < C; ++j) BOOST_TEST_REQUIRE(g.token_embedding.weight[id * C + j] == 0.0f);
    for (int t = 5; t < T; ++t)
      for (int j = 0; j < C; ++j) BOOST_TEST_REQUIRE(g.positional_embedding[t * C + j] == 0.0f);
  }
}

BOOST_AUTO_TEST_CASE(gradients_do_not_depend_on_the_thread_count) {
#if defined(_OPENMP) && !defined(__AVX512F__)
  // Without AVX-512 the products run on Eigen's GEMM, whose K blocking depends on the size of each
  // thread's share, so the rounding (not the value) changes with the thread count.
  BOOST_TEST_MESSAGE("SKIPPED: bit-identical results across thread counts hold for the AVX-512 GEMM only; "
                     "this build has no AVX-512 (Eigen's GEMM)");
#elif defined(_OPENMP)
  // Large enough that every op and product splits over the threads.
  using Visual = VisionTransformer<TinyTrain>;
  constexpr int E = Visual::E, R = Visual::R;
  const int64_t batch = 400;
  Visual::Params p;
  randomize(p, 101);
  std::vector<float> images = random_vector(batch * 3 * R * R, 102), r = random_vector(batch * E, 103);
  Visual::TrainActs acts(batch);
  std::vector<float> features(batch * E);
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    auto g = std::make_unique<Visual::Params>();
    zero(*g);
    Visual::forward_train(p, acts, images.data(), features.data(), batch);
    Visual::backward(p, acts, r.data(), *g, batch);
    omp_set_num_threads(before);
    return g;
  };
  auto one = run(1), two = run(2);
  auto a = tensors_of(*one), b = tensors_of(*two);
  for (size_t i = 0; i < a.size(); ++i)
    BOOST_TEST(std::equal(a[i].second.first, a[i].second.first + a[i].second.second, b[i].second.first), a[i].first);
#endif
}
