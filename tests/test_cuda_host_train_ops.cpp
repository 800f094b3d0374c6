// Host-side logic of the CUDA training ops (kernels/adamw.cuh, grad_norm.cuh, contrastive_loss.cuh),
// checked on the CPU without a GPU:
// - the shared AdamW element update (include/clip/train/adamw_math.hpp), which the kernel runs,
//   reproduces the CPU AdamW (its AVX-512 loop and AdamW::step with quiet blocks) bit for bit;
// - the multi-tensor chunk table covers every element of every trained tensor exactly once, with
//   its tensor's decay flag, for tiny, empty and huge tensors, and refuses bad layouts;
// - the two-stage gradient norm over the table equals clip::gradient_norm;
// - the contrastive loss's kernel decomposition (row pass, column pass that finalises G, per-row and
//   per-column partials, the gradient through the normalisation), run on the host, equals
//   clip::contrastive_loss;
// - the loss by rows (contrastive_loss_rows: its gemm calls with their shapes, strides and
//   offsets as kernels/gemm.cuh defines them, the in-place row kernel, the fixed-order finish),
//   run on the host, equals clip::contrastive_loss_rows for several slices.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "clip/dist/communicator.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw.hpp"
#include "clip/train/adamw_math.hpp"
#include "clip/train/contrastive_loss.hpp"
#include "clip/train/grad_clip.hpp"
#include "flat_params.hpp"
#include "messages.hpp"
#include "numeric.hpp"

namespace {

using clip::Role;

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return false;
  return true;
}

// ---- AdamW element -------------------------------------------------------------------------

// Random p, g, m, v with the awkward cases mixed in: zeros of both signs, tiny gradients (their
// squares underflow), large values, v = 0 with m != 0.
struct State {
  std::vector<float> p, g, m, v;
};

State random_state(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> kind(0, 9);
  State s{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
  for (int64_t i = 0; i < n; ++i) {
    s.p[i] = normal(rng);
    s.g[i] = normal(rng) * 1e-2f;
    s.m[i] = normal(rng) * 1e-3f;
    s.v[i] = std::abs(normal(rng)) * 1e-5f;
    switch (kind(rng)) {
      case 0: s.g[i] = 0.0f; break;
      case 1: s.g[i] = -0.0f, s.m[i] = 0.0f, s.v[i] = 0.0f; break;
      case 2: s.g[i] = normal(rng) * 1e-25f; break;
      case 3: s.g[i] = normal(rng) * 1e3f, s.p[i] *= 1e4f; break;
      case 4: s.v[i] = 0.0f; break;
      default: break;
    }
  }
  return s;
}

BOOST_AUTO_TEST_CASE(shared_element_matches_cpu_vector_loop_bit_for_bit) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  int64_t checked = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(unit(rng) * 5000);  // odd tails for the masked lanes
    State a = random_state(rng, n);
    State b = a;
    const float lr = std::pow(10.0f, -1.0f - 4.0f * unit(rng));
    const float beta1 = trial % 2 ? 0.9f : 0.5f + 0.49f * unit(rng);
    const float beta2 = trial % 3 ? 0.98f : 0.9f + 0.0999f * unit(rng);
    const float eps = trial % 2 ? 1e-6f : 1e-8f;
    const int64_t step = 1 + static_cast<int64_t>(unit(rng) * 2000);
    const float grad_scale = trial % 4 == 0 ? unit(rng) : 1.0f;
    clip::AdamWScalars s = clip::adamw_scalars(lr, beta1, beta2, eps, 0.2f, step, grad_scale);
    if (trial % 5 == 0) s.decay = 1.0f;  // the no-decay group
    clip::detail::adamw_update(a.p.data(), a.g.data(), a.m.data(), a.v.data(), n, s);  // AVX-512 where compiled in
    for (int64_t i = 0; i < n; ++i) clip::adamw_element(b.p[i], b.g[i], b.m[i], b.v[i], s);
    BOOST_TEST_REQUIRE(same_bits(a.p, b.p), "trial " << trial << ": weights");
    BOOST_TEST_REQUIRE(same_bits(a.m, b.m), "trial " << trial << ": first moments");
    BOOST_TEST_REQUIRE(same_bits(a.v, b.v), "trial " << trial << ": second moments");
    BOOST_TEST_REQUIRE(same_bits(a.g, b.g), "trial " << trial << ": consumed gradients");
    checked += n;
  }
#if defined(__AVX512F__)
  BOOST_TEST_MESSAGE("adamw_element vs the AVX-512 loop: " << checked << " elements bit-identical");
#else
  BOOST_TEST_MESSAGE("adamw_element vs the scalar loop (no AVX-512 here): " << checked << " elements bit-identical");
#endif
}

// A small model for the optimizer: a sparse embedding (the CPU's quiet-block path), a matrix,
// a buffer and two no-decay tensors.
struct Net {
  clip::Param<100, 100> token_embedding;
  clip::Param<13, 7> weight;
  clip::Param<3> running_var;  // buffer
  clip::Param<7> bias;
  clip::Param<1> logit_scale;

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    f(prefix + "token_embedding.weight", token_embedding, Role::parameter);
    f(prefix + "layer.weight", weight, Role::parameter);
    f(prefix + "layer.bn.running_var", running_var, Role::buffer);
    f(prefix + "layer.bias", bias, Role::parameter);
    f(prefix + "logit_scale", logit_scale, Role::parameter);
  }
};

using clip::test::flatten;
using clip::test::trained_slices;

// The GPU kernel's loop run on the host: chunk by chunk, decay from the chunk's flag.
void table_step(const std::vector<clip::TensorChunk>& table, std::vector<float>& p, std::vector<float>& g,
                std::vector<float>& m, std::vector<float>& v, const clip::AdamWScalars& s) {
  for (const clip::TensorChunk& c : table) {
    clip::AdamWScalars k = s;
    if (!c.decay) k.decay = 1.0f;
    for (int64_t i = c.offset; i < c.offset + c.length; ++i) clip::adamw_element(p[i], g[i], m[i], v[i], k);
  }
}

BOOST_AUTO_TEST_CASE(chunk_table_step_matches_adamw_step_over_steps) {
  auto params = std::make_unique<Net>(), grads = std::make_unique<Net>();
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  clip::for_each_tensor(*params, [&](const std::string&, auto& t, Role) {
    for (float& x : t.values) x = normal(rng);
  });
  clip::zero(*grads);
  const clip::AdamWOptions opt{2e-3f, 0.9f, 0.98f, 1e-6f, 0.2f};
  clip::AdamW<Net> adam(*params, opt);
  const std::vector<clip::TensorChunk> table = clip::build_chunk_table(trained_slices(*params), 1000);
  std::vector<float> p = flatten(*params), m(p.size(), 0.0f), v(p.size(), 0.0f);
  std::uniform_int_distribution<int> row(0, 99);
  for (int step = 1; step <= 8; ++step) {
    for (int r = 0; r < 2; ++r) {
      const int64_t first = row(rng) * 100;
      for (int64_t i = first; i < first + 100; ++i) grads->token_embedding[i] = normal(rng) * 1e-2f;
    }
    for (float& x : grads->weight.values) x = normal(rng);
    for (float& x : grads->bias.values) x = normal(rng) * 1e-4f;
    grads->logit_scale[0] = normal(rng);
    std::vector<float> g = flatten(*grads);
    const float lr = 2e-3f * (1.0f + std::cos(float(step))), grad_scale = step % 3 == 0 ? 0.375f : 1.0f;
    adam.step(*params, *grads, lr, grad_scale);
    table_step(table, p, g, m, v,
               clip::adamw_scalars(lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, adam.steps(), grad_scale));
    BOOST_TEST_REQUIRE(same_bits(p, flatten(*params)), "step " << step);
    BOOST_TEST_REQUIRE(same_bits(m, flatten(std::as_const(adam).m())), "step " << step);
    BOOST_TEST_REQUIRE(same_bits(v, flatten(std::as_const(adam).v())), "step " << step);
    BOOST_TEST_REQUIRE(std::all_of(g.begin(), g.end(), [](float x) { return x == 0.0f; }), "gradients consumed");
  }
  BOOST_TEST_MESSAGE("chunk-table AdamW vs clip::AdamW: 8 steps bit-identical (incl. quiet blocks, clipping)");
}

// ---- The chunk table --------------------------------------------------------------------------

// Whether `table` covers each listed tensor's elements once, in chunks within the tensor, with
// the tensor's flag, and nothing else ("" when it does; else what is wrong). Interval arithmetic,
// so huge tensors are fine; plain checks, since there are millions of chunks.
std::string table_problem(const std::vector<clip::TensorSlice>& tensors, const std::vector<clip::TensorChunk>& table,
                          int64_t chunk) {
  size_t c = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {  // chunks come tensor by tensor, in list order
    const clip::TensorSlice& s = tensors[t];
    int64_t next = s.offset;
    while (next < s.offset + s.numel) {
      if (c >= table.size()) return "tensor " + std::to_string(t) + " is not fully covered";
      const clip::TensorChunk& k = table[c++];
      if (k.offset != next || k.length < 1 || k.length > chunk || k.offset + k.length > s.offset + s.numel)
        return "chunk " + std::to_string(c - 1) + " is misplaced in tensor " + std::to_string(t);
      if (k.decay != (s.decay ? 1 : 0)) return "chunk " + std::to_string(c - 1) + " has the wrong decay flag";
      next += k.length;
    }
  }
  if (c != table.size()) return "chunks beyond the listed tensors";
  std::vector<clip::TensorChunk> sorted = table;  // exactly once overall: sorted chunks do not overlap
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.offset < b.offset; });
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i - 1].offset + sorted[i - 1].length > sorted[i].offset) return "chunks overlap";
  return "";
}

BOOST_AUTO_TEST_CASE(chunk_table_covers_every_element_once) {
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int> kind(0, 5);
  int64_t largest = 0, chunks = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t chunk = trial % 3 == 0 ? clip::kMultiTensorChunk : std::uniform_int_distribution<int64_t>(1, 5000)(rng);
    std::vector<clip::TensorSlice> tensors;
    int64_t offset = 0;
    const int count = std::uniform_int_distribution<int>(0, 40)(rng);
    for (int i = 0; i < count; ++i) {
      int64_t numel = 0;
      switch (kind(rng)) {
        case 0: numel = 1; break;
        case 1: numel = 0; break;                                                          // empty: no chunk
        case 2: numel = chunk * std::uniform_int_distribution<int64_t>(1, 4)(rng); break;  // whole chunks
        case 3: numel = chunk * 3 + 1; break;                                              // one past
        case 4: numel = std::uniform_int_distribution<int64_t>(1, 3 * chunk)(rng); break;
        default: numel = trial % 3 == 0 ? std::uniform_int_distribution<int64_t>(1, int64_t{3} << 30)(rng)  // huge
                                        : std::uniform_int_distribution<int64_t>(1, 100)(rng);
      }
      offset += std::uniform_int_distribution<int64_t>(0, 3)(rng);  // gaps: buffers, padding
      tensors.push_back({offset, numel, (rng() & 1) != 0});
      offset += numel;
      largest = std::max(largest, numel);
    }
    std::shuffle(tensors.begin(), tensors.end(), rng);  // any order: chunks follow the list
    const std::vector<clip::TensorChunk> table = clip::build_chunk_table(tensors, chunk, offset);
    const std::string problem = table_problem(tensors, table, chunk);
    BOOST_TEST_REQUIRE(problem.empty(), "trial " << trial << ": " << problem);
    chunks += static_cast<int64_t>(table.size());

    if (offset < 200000) {  // small layouts: count every element explicitly
      std::vector<int> seen(static_cast<size_t>(offset), 0), flag(static_cast<size_t>(offset), -1);
      for (const clip::TensorChunk& k : table)
        for (int64_t i = k.offset; i < k.offset + k.length; ++i) ++seen[i], flag[i] = k.decay;
      bool once = true, flags = true;
      for (const clip::TensorSlice& t : tensors)
        for (int64_t i = t.offset; i < t.offset + t.numel; ++i) {
          once &= seen[i] == 1;
          flags &= flag[i] == (t.decay ? 1 : 0);
          seen[i] = 0;
        }
      BOOST_TEST_REQUIRE(once, "trial " << trial << ": an element is not covered exactly once");
      BOOST_TEST_REQUIRE(flags, "trial " << trial << ": an element has the wrong decay flag");
      BOOST_TEST_REQUIRE(std::all_of(seen.begin(), seen.end(), [](int x) { return x == 0; }), "gaps not covered");
    }
  }
  BOOST_TEST_MESSAGE("chunk tables: 200 random layouts, " << chunks << " chunks, largest tensor " << largest);
}

BOOST_AUTO_TEST_CASE(chunk_table_refuses_bad_layouts) {
  using V = std::vector<clip::TensorSlice>;
  auto message = [](V t, int64_t chunk, int64_t total) {
    return clip::test::message_of([&] { clip::build_chunk_table(t, chunk, total); });
  };
  BOOST_TEST(message(V{{0, 10, true}, {9, 5, false}}, 4, -1).find("overlap") != std::string::npos);
  BOOST_TEST(message(V{{20, 10, true}, {0, 21, false}}, 4, -1).find("overlap") != std::string::npos);
  BOOST_TEST(message(V{{0, 10, true}}, 4, 9).find("past the end") != std::string::npos);
  BOOST_TEST(message(V{{-1, 10, true}}, 4, -1).find("non-negative") != std::string::npos);
  BOOST_TEST(message(V{{0, 10, true}}, 0, -1).find("chunk size") != std::string::npos);
  BOOST_TEST(message(V{{0, 10, true}, {10, 0, false}, {10, 5, false}}, 4, 15).empty(), "touching tensors and an empty one");
  BOOST_TEST(clip::build_chunk_table(V{}, 4).empty());
}

// ---- Gradient norm over the table ---------------------------------------------------------------

BOOST_AUTO_TEST_CASE(two_stage_norm_over_table_matches_cpu) {
  auto grads = std::make_unique<Net>();
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  clip::for_each_tensor(*grads, [&](const std::string&, auto& t, Role) {
    for (float& x : t.values) x = normal(rng);
  });
  grads->running_var.fill(1e6f);  // a buffer: not a gradient
  const std::vector<float> g = flatten(*grads);
  for (int64_t chunk : {int64_t{7}, int64_t{1000}, clip::kMultiTensorChunk}) {
    const std::vector<clip::TensorChunk> table = clip::build_chunk_table(trained_slices(*grads), chunk);
    std::vector<double> partial;  // stage 1: one per chunk
    for (const clip::TensorChunk& c : table) {
      double s = 0;
      for (int64_t i = c.offset; i < c.offset + c.length; ++i) s = std::fma(double(g[i]), double(g[i]), s);
      partial.push_back(s);
    }
    double total = 0;  // stage 2
    for (double s : partial) total += s;
    const double want = clip::gradient_norm(*grads);
    BOOST_TEST(std::abs(std::sqrt(total) - want) <= 1e-13 * want, "chunk " << chunk);
  }
}

// ---- Contrastive loss: the kernels' decomposition on the host --------------------------------

struct Emulated {
  double loss;
  float d_scale;
  std::vector<float> d_image, d_text, logits;
};

// What kernels/contrastive_loss.cuh computes, kernel by kernel (the gemms as plain fp32 loops).
template <int E>
Emulated emulate_kernels(const std::vector<float>& img, const std::vector<float>& txt, int64_t B, float logit_scale) {
  std::vector<float> a(B * E), b(B * E), na(B), nb(B);
  auto normalize = [&](const std::vector<float>& x, std::vector<float>& u, std::vector<float>& n) {  // normalize_kernel
    for (int64_t i = 0; i < B; ++i) {
      double sq = 0;
      for (int j = 0; j < E; ++j) sq = std::fma(double(x[i * E + j]), double(x[i * E + j]), sq);
      n[i] = static_cast<float>(std::sqrt(sq));
      for (int j = 0; j < E; ++j) u[i * E + j] = x[i * E + j] / n[i];
    }
  };
  normalize(img, a, na);
  normalize(txt, b, nb);
  const float s = static_cast<float>(std::exp(double(logit_scale)));
  std::vector<float> L(B * B), G(B * B);
  for (int64_t i = 0; i < B; ++i)  // gemm_nt
    for (int64_t j = 0; j < B; ++j) {
      float acc = 0;
      for (int k = 0; k < E; ++k) acc += a[i * E + k] * b[j * E + k];
      L[i * B + j] = acc;
    }
  std::vector<double> row_loss(B), col_loss(B), col_ds(B);
  for (int64_t i = 0; i < B; ++i) {  // softmax_rows_kernel
    float top = -INFINITY;
    for (int64_t j = 0; j < B; ++j) L[i * B + j] = clip::detail::mul_rn(L[i * B + j], s), top = std::max(top, L[i * B + j]);
    double sum = 0;
    for (int64_t j = 0; j < B; ++j) sum += std::exp(double(L[i * B + j]) - top);
    for (int64_t j = 0; j < B; ++j) G[i * B + j] = static_cast<float>(std::exp(double(L[i * B + j]) - top) / sum);
    row_loss[i] = (double(top) + std::log(sum)) - double(L[i * B + i]);
  }
  const float inv = 1.0f / static_cast<float>(2 * B);
  for (int64_t j = 0; j < B; ++j) {  // softmax_cols_kernel: 8 row phases, combined in order
    constexpr int R = 8;
    float top = -INFINITY;
    for (int64_t i = 0; i < B; ++i) top = std::max(top, L[i * B + j]);
    double sum_part[R] = {}, ds_part[R] = {};
    for (int64_t i = 0; i < B; ++i) sum_part[i % R] += std::exp(double(L[i * B + j]) - top);
    double sum = sum_part[0];
    for (int r = 1; r < R; ++r) sum += sum_part[r];
    for (int64_t i = 0; i < B; ++i) {
      const float p_col = static_cast<float>(std::exp(double(L[i * B + j]) - top) / sum);
      const float sum_p = clip::detail::add_rn(G[i * B + j], p_col);
      const float gij = clip::detail::mul_rn(clip::detail::rounded(sum_p - (i == j ? 2.0f : 0.0f)), inv);
      G[i * B + j] = gij;
      ds_part[i % R] += double(gij) * L[i * B + j];
    }
    double ds = ds_part[0];
    for (int r = 1; r < R; ++r) ds += ds_part[r];
    col_ds[j] = ds;
    col_loss[j] = (double(top) + std::log(sum)) - double(L[j * B + j]);
  }
  double l = 0, d = 0;  // finish_loss_kernel
  for (int64_t i = 0; i < B; ++i) l += row_loss[i] + col_loss[i], d += col_ds[i];
  Emulated out{l / double(2 * B), static_cast<float>(d), std::vector<float>(B * E), std::vector<float>(B * E), L};
  std::vector<float> da(B * E, 0.0f), db(B * E, 0.0f);
  for (int64_t i = 0; i < B; ++i)  // gemm_nn: G B; gemm_tn: G^T A
    for (int64_t k = 0; k < B; ++k)
      for (int j = 0; j < E; ++j) {
        da[i * E + j] += G[i * B + k] * b[k * E + j];
        db[i * E + j] += G[k * B + i] * a[k * E + j];
      }
  auto through_norm = [&](const std::vector<float>& u, const std::vector<float>& du, const std::vector<float>& n,
                          std::vector<float>& o) {  // through_norm_kernel
    for (int64_t i = 0; i < B; ++i) {
      double dot = 0;
      for (int j = 0; j < E; ++j) dot += (double(u[i * E + j]) * double(du[i * E + j])) * double(s);
      for (int j = 0; j < E; ++j)
        o[i * E + j] = static_cast<float>(
            (double(clip::detail::mul_rn(s, du[i * E + j])) - double(u[i * E + j]) * dot) / double(n[i]));
    }
  };
  through_norm(a, da, na, out.d_image);
  through_norm(b, db, nb, out.d_text);
  return out;
}

using clip::test::rel_err;  // max |got - want| / max |want|

BOOST_AUTO_TEST_CASE(contrastive_loss_kernel_decomposition_matches_cpu) {
  constexpr int E = 48;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  double worst = 0;
  for (int64_t B : {1, 2, 7, 33, 300})
    for (float ls : {0.0f, 2.6592600f, 4.6051701859880914f}) {
      std::vector<float> img(B * E), txt(B * E);
      for (float& x : img) x = normal(rng);
      for (float& x : txt) x = normal(rng);
      std::vector<float> d_img(B * E), d_txt(B * E), logits(B * B);
      const clip::ContrastiveLoss want =
          clip::contrastive_loss<E>(img.data(), txt.data(), B, ls, d_img.data(), d_txt.data(), logits.data());
      const Emulated got = emulate_kernels<E>(img, txt, B, ls);
      const double e_loss = std::abs(got.loss - want.loss) / std::max(1e-3, want.loss);
      const double e_ds = std::abs(double(got.d_scale) - want.d_logit_scale) /
                          std::max(1e-3, std::abs(double(want.d_logit_scale)));
      const double e_img = rel_err(got.d_image, d_img), e_txt = rel_err(got.d_text, d_txt),
                   e_l = rel_err(got.logits, logits);
      BOOST_TEST(e_loss <= 1e-6, "B=" << B << " logit_scale=" << ls << ": loss " << got.loss << " vs " << want.loss);
      BOOST_TEST(e_ds <= 1e-5, "B=" << B << " logit_scale=" << ls << ": d_logit_scale " << got.d_scale << " vs "
                                    << want.d_logit_scale);
      BOOST_TEST(e_img <= 1e-5, "B=" << B << " logit_scale=" << ls);
      BOOST_TEST(e_txt <= 1e-5, "B=" << B << " logit_scale=" << ls);
      BOOST_TEST(e_l <= 1e-6, "B=" << B << " logit_scale=" << ls);
      worst = std::max({worst, e_loss, e_ds, e_img, e_txt, e_l});
    }
  BOOST_TEST_MESSAGE("contrastive loss, kernel decomposition vs clip::contrastive_loss: worst relative error " << worst);
}

// ---- Contrastive loss by rows: the kernels' decomposition on the host --------------------------

// kernels/gemm.cuh's row-major products, as plain fp32 loops over the same arguments:
//   nt: Y[m, n] = X[m, k] W[n, k]^T;  nn: Y[m, n] = X[m, k] P[k, n];  tn: Y[m, n] = X[k, m]^T P[k, n]
// (beta 1: added to Y). Element (r, c) of X is x[r * ldx + c], and so on.
enum class Op { nt, nn, tn };
void host_gemm(Op op, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, const float* p, int64_t ldp,
               float* y, int64_t ldy, float beta = 0) {
  BOOST_REQUIRE(ldy >= n);
  BOOST_REQUIRE(ldx >= (op == Op::tn ? m : k));
  BOOST_REQUIRE(ldp >= (op == Op::nt ? k : n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0;
      for (int64_t q = 0; q < k; ++q) {
        const float xv = op == Op::tn ? x[q * ldx + i] : x[i * ldx + q];
        const float pv = op == Op::nt ? p[j * ldp + q] : p[q * ldp + j];
        acc += xv * pv;
      }
      y[i * ldy + j] = beta != 0 ? y[i * ldy + j] + acc : acc;
    }
}

// What contrastive_loss_rows in kernels/contrastive_loss.cuh computes for rows [first, first + n).
template <int E>
Emulated emulate_rows_kernels(const std::vector<float>& img, const std::vector<float>& txt, int64_t B, int64_t first,
                              int64_t n, float logit_scale) {
  std::vector<float> a(B * E), b(B * E), na(B), nb(B);
  auto normalize = [&](const std::vector<float>& x, std::vector<float>& u, std::vector<float>& norms) {
    for (int64_t i = 0; i < B; ++i) {  // normalize_kernel
      double sq = 0;
      for (int j = 0; j < E; ++j) sq = std::fma(double(x[i * E + j]), double(x[i * E + j]), sq);
      norms[i] = static_cast<float>(std::sqrt(sq));
      for (int j = 0; j < E; ++j) u[i * E + j] = x[i * E + j] / norms[i];
    }
  };
  normalize(img, a, na);
  normalize(txt, b, nb);
  const float s = static_cast<float>(std::exp(double(logit_scale)));
  const float* a_own = a.data() + first * E;
  const float* b_own = b.data() + first * E;
  std::vector<float> lr(n * B), lc(n * B), logits(n * B);
  host_gemm(Op::nt, n, B, E, a_own, E, b.data(), E, lr.data(), B);
  host_gemm(Op::nt, n, B, E, b_own, E, a.data(), E, lc.data(), B);
  std::vector<double> row_loss(2 * n), row_ds(2 * n);
  const float inv = 1.0f / static_cast<float>(2 * B);
  for (int y = 0; y < 2; ++y)  // own_rows_softmax_kernel, grid (n, 2)
    for (int64_t i = 0; i < n; ++i) {
      float* row = (y == 1 ? lc.data() : lr.data()) + i * B;
      float top = -INFINITY;
      for (int64_t j = 0; j < B; ++j) {
        row[j] = clip::detail::mul_rn(row[j], s);
        if (y == 0) logits[i * B + j] = row[j];
        top = std::max(top, row[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < B; ++j) sum += std::exp(double(row[j]) - top);
      const float target = row[first + i];
      double ds = 0;
      for (int64_t j = 0; j < B; ++j) {
        const float l = row[j];
        const float prob = static_cast<float>(std::exp(double(l) - top) / sum);
        const float g = clip::detail::mul_rn(clip::detail::rounded(prob - (j == first + i ? 1.0f : 0.0f)), inv);
        ds += double(g) * l;
        row[j] = g;
      }
      row_loss[y * n + i] = (double(top) + std::log(sum)) - double(target);
      row_ds[y * n + i] = ds;
    }
  double l = 0, d = 0;  // finish_rows_loss_kernel
  for (int64_t k = 0; k < 2 * n; ++k) l += row_loss[k], d += row_ds[k];
  Emulated out{l / double(2 * B), static_cast<float>(d), std::vector<float>(B * E), std::vector<float>(B * E), logits};
  std::vector<float> da(B * E), db(B * E);
  host_gemm(Op::tn, B, E, n, lc.data(), B, b_own, E, da.data(), E);
  host_gemm(Op::nn, n, E, B, lr.data(), B, b.data(), E, da.data() + first * E, E, 1.0f);
  host_gemm(Op::tn, B, E, n, lr.data(), B, a_own, E, db.data(), E);
  host_gemm(Op::nn, n, E, B, lc.data(), B, a.data(), E, db.data() + first * E, E, 1.0f);
  auto through_norm = [&](const std::vector<float>& u, const std::vector<float>& du, const std::vector<float>& norms,
                          std::vector<float>& o) {  // through_norm_kernel
    for (int64_t i = 0; i < B; ++i) {
      double dot = 0;
      for (int j = 0; j < E; ++j) dot += (double(u[i * E + j]) * double(du[i * E + j])) * double(s);
      for (int j = 0; j < E; ++j)
        o[i * E + j] = static_cast<float>(
            (double(clip::detail::mul_rn(s, du[i * E + j])) - double(u[i * E + j]) * dot) / double(norms[i]));
    }
  };
  through_norm(a, da, na, out.d_image);
  through_norm(b, db, nb, out.d_text);
  return out;
}

BOOST_AUTO_TEST_CASE(contrastive_loss_rows_kernel_decomposition_matches_cpu) {
  constexpr int E = 48;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  double worst = 0;
  for (int64_t B : {1, 2, 7, 33, 130})
    for (float ls : {0.0f, 2.6592600f, 4.6051701859880914f}) {
      std::vector<float> img(B * E), txt(B * E);
      for (float& x : img) x = normal(rng);
      for (float& x : txt) x = normal(rng);
      std::vector<clip::dist::Slice> slices = {{0, B}, {0, 1}, {B - 1, 1}};
      for (int world : {2, 3})
        for (int r = 0; r < world; ++r)
          if (clip::dist::batch_slice(B, world, r).rows > 0) slices.push_back(clip::dist::batch_slice(B, world, r));
      for (const clip::dist::Slice& sl : slices) {
        std::vector<float> d_img(B * E), d_txt(B * E), logits(sl.rows * B);
        const clip::ContrastiveLoss want = clip::contrastive_loss_rows<E>(img.data(), txt.data(), B, sl.first, sl.rows,
                                                                          ls, d_img.data(), d_txt.data(), logits.data());
        const Emulated got = emulate_rows_kernels<E>(img, txt, B, sl.first, sl.rows, ls);
        const double e_loss = std::abs(got.loss - want.loss) / std::max(1e-3, want.loss);
        const double e_ds = std::abs(double(got.d_scale) - want.d_logit_scale) /
                            std::max(1e-3, std::abs(double(want.d_logit_scale)));
        // Logits relative to their bound s = exp(logit_scale) (a lone logit may be near zero).
        double l_diff = 0;
        for (size_t i = 0; i < logits.size(); ++i) l_diff = std::max(l_diff, std::abs(double(got.logits[i]) - logits[i]));
        const double e_img = rel_err(got.d_image, d_img), e_txt = rel_err(got.d_text, d_txt),
                     e_l = l_diff / std::exp(double(ls));
        const std::string where = "B=" + std::to_string(B) + " rows [" + std::to_string(sl.first) + ", " +
                                  std::to_string(sl.first + sl.rows) + ") logit_scale=" + std::to_string(ls);
        BOOST_TEST(e_loss <= 1e-6, where << ": loss " << got.loss << " vs " << want.loss);
        BOOST_TEST(e_ds <= 1e-5, where << ": d_logit_scale " << got.d_scale << " vs " << want.d_logit_scale);
        BOOST_TEST(e_img <= 1e-5, where);
        BOOST_TEST(e_txt <= 1e-5, where);
        BOOST_TEST(e_l <= 1e-6, where);
        worst = std::max({worst, e_loss, e_ds, e_img, e_txt, e_l});
      }
    }
  BOOST_TEST_MESSAGE("contrastive loss by rows, kernel decomposition vs clip::contrastive_loss_rows: worst relative "
                     "error " << worst);
}

}  // namespace
