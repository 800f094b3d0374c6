// The CUDA attention kernels' arithmetic, replayed on the CPU: the host loops below follow
// kernels/attention.cuh (same tiles, same key / query order, the same CLIP_HOST_DEVICE row steps
// of include/clip/ops/online_softmax.hpp) and are compared with clip's CPU attention forward and
// backward (causal and not, tq != tk with a query offset, per-sample last keys, packed and pooled
// layouts, D = 16 / 32 / 64, up to 257 keys). The max relative errors are printed. The bf16 mode's
// arithmetic is replayed too (rounded inputs, out and gradients) against the GPU test's tolerance.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <tuple>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "clip/core/bf16.hpp"
#include "clip/ops/attention.hpp"
#include "clip/ops/online_softmax.hpp"
#include "attention_reference.hpp"

namespace {

using clip::AttentionTiles;
using clip::OnlineSoftmax;
using clip::RowsView;

// Element offsets of q, k, v, out rows in their buffers (as the kernels' AttentionLayout).
struct Layout {
  int64_t q_row, k_row, v_row, o_row;
  int64_t q_batch, k_batch, v_batch, o_batch;
};

template <int D>
struct Row {
  float v[D];
};

// Copies n rows of one head into a staged tile, as the kernels' stage_rows.
template <int D>
void stage(float* dst, int ld, const float* src, int64_t row, int n) {
  for (int r = 0; r < n; ++r)
    for (int d = 0; d < D; ++d) dst[r * ld + d] = src[r * row + d];
}

int64_t last_key_of(const int64_t* last_key, int64_t b) { return last_key ? last_key[b] : -1; }

// forward_kernel, block by block.
template <int D, int TMax>
void replay_forward(float* out, float* lse, const float* q, const float* k, const float* v, const Layout& L,
                    int64_t batch, int heads, int64_t tq, int64_t tk, float scale, bool causal, int64_t q_offset,
                    const int64_t* last_key) {
  using Tiles = AttentionTiles<D, TMax>;
  std::vector<float> ks(Tiles::keys * D), vs(Tiles::keys * D);
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i0 = 0; i0 < tq; i0 += Tiles::rows) {
        const int64_t lk = last_key_of(last_key, b);
        const int64_t i_last = std::min<int64_t>(i0 + Tiles::rows, tq) - 1;
        const int64_t block_keys = clip::attention_key_limit(i_last, tk, causal, q_offset, lk);
        const int rows = static_cast<int>(i_last + 1 - i0);
        std::vector<Row<D>> qr(rows), acc(rows);
        std::vector<OnlineSoftmax> st(rows);
        for (int r = 0; r < rows; ++r)
          for (int d = 0; d < D; ++d) {
            qr[r].v[d] = q[b * L.q_batch + (i0 + r) * L.q_row + h * D + d];
            acc[r].v[d] = 0.0f;
          }
        for (int64_t j0 = 0; j0 < block_keys; j0 += Tiles::keys) {
          const int n_tile = static_cast<int>(std::min<int64_t>(block_keys - j0, Tiles::keys));
          stage<D>(ks.data(), D, k + b * L.k_batch + j0 * L.k_row + h * D, L.k_row, n_tile);
          stage<D>(vs.data(), D, v + b * L.v_batch + j0 * L.v_row + h * D, L.v_row, n_tile);
          for (int r = 0; r < rows; ++r) {
            const int64_t my_keys = clip::attention_key_limit(i0 + r, tk, causal, q_offset, lk);
            for (int c = 0; c < n_tile; c += clip::attention_key_chunk) {
              const int64_t left = my_keys - (j0 + c);
              if (left <= 0) break;
              const int n = static_cast<int>(std::min<int64_t>(left, clip::attention_key_chunk));
              clip::attention_forward_chunk<D>(st[r], acc[r].v, qr[r].v, ks.data() + c * D, vs.data() + c * D, D, n,
                                               scale);
            }
          }
        }
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const float l = clip::attention_forward_finish<D>(st[r], acc[r].v);
          for (int d = 0; d < D; ++d) out[b * L.o_batch + i * L.o_row + h * D + d] = acc[r].v[d];
          lse[(b * heads + h) * tq + i] = l;
        }
      }
}

// delta_kernel, dq_kernel and dkv_kernel, block by block.
template <int D, int TMax>
void replay_backward(float* d_q, float* d_k, float* d_v, const float* d_out, const float* q, const float* k,
                     const float* v, const float* out, const float* lse, const Layout& L, int64_t batch, int heads,
                     int64_t tq, int64_t tk, float scale, bool causal, int64_t q_offset, const int64_t* last_key) {
  using Tiles = AttentionTiles<D, TMax>;
  std::vector<float> delta(batch * heads * tq);
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i = 0; i < tq; ++i) {
        const int64_t off = b * L.o_batch + i * L.o_row + h * D;
        delta[(b * heads + h) * tq + i] = clip::attention_delta<D>(out + off, d_out + off);
      }
  // dQ
  std::vector<float> ks(Tiles::dq_keys * D), vs(Tiles::dq_keys * D), own_q(Tiles::rows * Tiles::own_ld);
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i0 = 0; i0 < tq; i0 += Tiles::rows) {
        const int64_t bh = b * heads + h;
        const int64_t lk = last_key_of(last_key, b);
        const int64_t i_last = std::min<int64_t>(i0 + Tiles::rows, tq) - 1;
        const int64_t block_keys = clip::attention_key_limit(i_last, tk, causal, q_offset, lk);
        const int rows = static_cast<int>(i_last + 1 - i0);
        stage<D>(own_q.data(), Tiles::own_ld, q + b * L.q_batch + i0 * L.q_row + h * D, L.q_row, rows);
        std::vector<Row<D>> gr(rows), dq(rows);
        for (int r = 0; r < rows; ++r)
          for (int d = 0; d < D; ++d) {
            gr[r].v[d] = d_out[b * L.o_batch + (i0 + r) * L.o_row + h * D + d];
            dq[r].v[d] = 0.0f;
          }
        for (int64_t j0 = 0; j0 < block_keys; j0 += Tiles::dq_keys) {
          const int n_tile = static_cast<int>(std::min<int64_t>(block_keys - j0, Tiles::dq_keys));
          stage<D>(ks.data(), D, k + b * L.k_batch + j0 * L.k_row + h * D, L.k_row, n_tile);
          stage<D>(vs.data(), D, v + b * L.v_batch + j0 * L.v_row + h * D, L.v_row, n_tile);
          for (int r = 0; r < rows; ++r) {
            const int64_t my_keys = clip::attention_key_limit(i0 + r, tk, causal, q_offset, lk);
            for (int c = 0; c < n_tile; c += clip::attention_key_chunk) {
              const int64_t left = my_keys - (j0 + c);
              if (left <= 0) break;
              const int n = static_cast<int>(std::min<int64_t>(left, clip::attention_key_chunk));
              clip::attention_dq_chunk<D>(dq[r].v, own_q.data() + r * Tiles::own_ld, gr[r].v, lse[bh * tq + i0 + r],
                                          delta[bh * tq + i0 + r], ks.data() + c * D, vs.data() + c * D, D, n, scale);
            }
          }
        }
        for (int r = 0; r < rows; ++r)
          for (int d = 0; d < D; ++d) d_q[b * L.q_batch + (i0 + r) * L.q_row + h * D + d] = dq[r].v[d] * scale;
      }
  // dK, dV
  constexpr int Q = Tiles::queries;
  std::vector<float> own_k(Tiles::rows * Tiles::own_ld), own_v(Tiles::rows * Tiles::own_ld), qs(Q * D), gs(Q * D);
  float ls[Q], es[Q];
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t j0 = 0; j0 < tk; j0 += Tiles::rows) {
        const int64_t bh = b * heads + h;
        const int64_t lk = last_key_of(last_key, b);
        const int n_own = static_cast<int>(std::min<int64_t>(tk - j0, Tiles::rows));
        const bool block_seen = lk < 0 || j0 <= lk;
        stage<D>(own_k.data(), Tiles::own_ld, k + b * L.k_batch + j0 * L.k_row + h * D, L.k_row, n_own);
        stage<D>(own_v.data(), Tiles::own_ld, v + b * L.v_batch + j0 * L.v_row + h * D, L.v_row, n_own);
        std::vector<Row<D>> dk(n_own), dv(n_own);
        for (auto& r : dk) std::fill(r.v, r.v + D, 0.0f);
        for (auto& r : dv) std::fill(r.v, r.v + D, 0.0f);
        const int64_t first = block_seen ? clip::attention_first_query(j0, causal, q_offset) / Q * Q : tq;
        for (int64_t i0 = first; i0 < tq; i0 += Q) {
          const int n = static_cast<int>(std::min<int64_t>(tq - i0, Q));
          stage<D>(qs.data(), D, q + b * L.q_batch + i0 * L.q_row + h * D, L.q_row, n);
          stage<D>(gs.data(), D, d_out + b * L.o_batch + i0 * L.o_row + h * D, L.o_row, n);
          for (int r = 0; r < n; ++r) {
            ls[r] = lse[bh * tq + i0 + r];
            es[r] = delta[bh * tq + i0 + r];
          }
          for (int t = 0; t < n_own; ++t) {
            const int64_t j = j0 + t;
            if (!(lk < 0 || j <= lk)) continue;
            const int64_t skip = clip::attention_first_query(j, causal, q_offset) - i0;
            if (skip >= n) continue;
            const int begin = static_cast<int>(std::max<int64_t>(skip, 0));
            clip::attention_dkv_chunk<D>(dk[t].v, dv[t].v, own_k.data() + t * Tiles::own_ld,
                                         own_v.data() + t * Tiles::own_ld, qs.data(), gs.data(), D, ls, es, begin, n,
                                         scale);
          }
        }
        for (int t = 0; t < n_own; ++t)
          for (int d = 0; d < D; ++d) {
            d_k[b * L.k_batch + (j0 + t) * L.k_row + h * D + d] = dk[t].v[d] * scale;
            d_v[b * L.v_batch + (j0 + t) * L.v_row + h * D + d] = dv[t].v[d];
          }
      }
}

// max |got - ref| / max |ref| over the listed elements.
struct RelErr {
  double diff = 0, ref = 0;
  void add(float got, float want) {
    diff = std::max(diff, std::abs(double(got) - double(want)));
    ref = std::max(ref, std::abs(double(want)));
  }
  double value() const { return ref > 0 ? diff / ref : diff; }
};

template <int D>
void add_rows(RelErr& e, const float* got, const float* want, int64_t batch, int64_t rows, int heads, int64_t row,
              int64_t bstride) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t c = 0; c < int64_t{heads} * D; ++c) {
        const int64_t o = b * bstride + t * row + c;
        e.add(got[o], want[o]);
      }
}

double worst_bf16_out = 0, worst_bf16_dq = 0, worst_bf16_dk = 0, worst_bf16_dv = 0;
double worst_forward = 0, worst_lse = 0, worst_dq = 0, worst_dk = 0, worst_dv = 0;

// One case: H = 2 heads of D. packed: q, k, v rows of one [B, t, 3C] buffer (needs tq == tk);
// pooled: q, out rows C apart per sample (tq = 1); else separate [B, t, C] buffers.
template <int D, int TMax>
void run_case(int64_t batch, int64_t tq, int64_t tk, bool causal, bool packed, bool with_last_key, uint32_t seed) {
  constexpr int H = 2;
  constexpr int64_t C = int64_t{H} * D;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  Layout L;
  int64_t q_size, k_size, v_size, o_size;
  std::vector<float> qkv, qb, kb, vb;
  const float *q, *k, *v;
  if (packed) {
    L = {3 * C, 3 * C, 3 * C, C, tk * 3 * C, tk * 3 * C, tk * 3 * C, tq * C};
    qkv.resize(batch * tk * 3 * C);
    for (auto& x : qkv) x = normal(rng);
    q = qkv.data(), k = qkv.data() + C, v = qkv.data() + 2 * C;
    q_size = k_size = v_size = static_cast<int64_t>(qkv.size());
  } else {
    L = {C, C, C, C, tq * C, tk * C, tk * C, tq * C};
    qb.resize(batch * tq * C), kb.resize(batch * tk * C), vb.resize(batch * tk * C);
    for (auto* b : {&qb, &kb, &vb})
      for (auto& x : *b) x = normal(rng);
    q = qb.data(), k = kb.data(), v = vb.data();
    q_size = static_cast<int64_t>(qb.size()), k_size = v_size = static_cast<int64_t>(kb.size());
  }
  o_size = batch * tq * C;
  std::vector<int64_t> last(batch);
  for (int64_t b = 0; b < batch; ++b) last[b] = (b * 37 + 5) % tk;
  const int64_t* last_key = with_last_key ? last.data() : nullptr;
  // CPU: causal shift = tk - tq.
  const int64_t q_offset = tk - tq;
  const float scale = 1.0f / std::sqrt(float(D));

  // CPU reference
  std::vector<float> out_ref(o_size), probs(batch * H * tq * tk);
  clip::attention_forward<H, D>(RowsView<float>{out_ref.data(), L.o_row, L.o_batch}, probs.data(),
                                RowsView<const float>{q, L.q_row, L.q_batch}, RowsView<const float>{k, L.k_row, L.k_batch},
                                RowsView<const float>{v, L.v_row, L.v_batch}, batch, tq, tk, causal, last_key);
  std::vector<float> d_out(o_size);
  for (auto& x : d_out) x = normal(rng);
  std::vector<float> dq_ref(q_size, 0.0f), dk_ref(k_size, 0.0f), dv_ref(v_size, 0.0f);
  clip::attention_backward<H, D>(
      RowsView<float>{dq_ref.data() + (q - (packed ? qkv.data() : qb.data())), L.q_row, L.q_batch},
      RowsView<float>{dk_ref.data() + (k - (packed ? qkv.data() : kb.data())), L.k_row, L.k_batch},
      RowsView<float>{dv_ref.data() + (v - (packed ? qkv.data() : vb.data())), L.v_row, L.v_batch},
      RowsView<const float>{d_out.data(), L.o_row, L.o_batch}, probs.data(), RowsView<const float>{q, L.q_row, L.q_batch},
      RowsView<const float>{k, L.k_row, L.k_batch}, RowsView<const float>{v, L.v_row, L.v_batch}, batch, tq, tk);
  // logsumexp in double
  const std::vector<float> lse_ref =
      clip::test::reference_lse(q, k, L, batch, H, D, tq, tk, scale, causal, q_offset, last_key);

  // replay
  std::vector<float> out(o_size), lse(batch * H * tq);
  replay_forward<D, TMax>(out.data(), lse.data(), q, k, v, L, batch, H, tq, tk, scale, causal, q_offset, last_key);
  std::vector<float> dq(q_size, 0.0f), dk(k_size, 0.0f), dv(v_size, 0.0f);
  const int64_t q0 = q - (packed ? qkv.data() : qb.data()), k0 = k - (packed ? qkv.data() : kb.data()),
                v0 = v - (packed ? qkv.data() : vb.data());
  replay_backward<D, TMax>(dq.data() + q0, dk.data() + k0, dv.data() + v0, d_out.data(), q, k, v, out.data(),
                           lse.data(), L, batch, H, tq, tk, scale, causal, q_offset, last_key);

  RelErr eo, el, eq, ek, ev;
  add_rows<D>(eo, out.data(), out_ref.data(), batch, tq, H, L.o_row, L.o_batch);
  for (size_t i = 0; i < lse.size(); ++i) el.add(lse[i], lse_ref[i]);
  add_rows<D>(eq, dq.data() + q0, dq_ref.data() + q0, batch, tq, H, L.q_row, L.q_batch);
  add_rows<D>(ek, dk.data() + k0, dk_ref.data() + k0, batch, tk, H, L.k_row, L.k_batch);
  add_rows<D>(ev, dv.data() + v0, dv_ref.data() + v0, batch, tk, H, L.v_row, L.v_batch);
  BOOST_TEST_CONTEXT("D " << D << " TMax " << TMax << " B " << batch << " tq " << tq << " tk " << tk << " causal "
                          << causal << " packed " << packed << " last_key " << with_last_key) {
    BOOST_TEST(eo.value() <= 1e-5);
    BOOST_TEST(el.value() <= 1e-5);
    BOOST_TEST(eq.value() <= 1e-5);
    BOOST_TEST(ek.value() <= 1e-5);
    BOOST_TEST(ev.value() <= 1e-5);
  }
  worst_forward = std::max(worst_forward, eo.value());
  worst_lse = std::max(worst_lse, el.value());
  worst_dq = std::max(worst_dq, eq.value());
  worst_dk = std::max(worst_dk, ek.value());
  worst_dv = std::max(worst_dv, ev.value());

  // bf16 storage, as the kernels run it with S = bf16: inputs rounded, fp32 arithmetic, out (also
  // the backward's input for delta) and the gradients rounded. Tolerance as the GPU test's: twice
  // the error of the CPU op on rounded inputs with rounded outputs.
  auto R = [](std::vector<float> x) {
    for (auto& e : x) e = clip::round_to_bf16(e);
    return x;
  };
  const std::vector<float> qkv_r = R(qkv), qb_r = R(qb), kb_r = R(kb), vb_r = R(vb), d_out_r = R(d_out);
  const float* qr = (packed ? qkv_r.data() : qb_r.data()) + q0;
  const float* kr = (packed ? qkv_r.data() : kb_r.data()) + k0;
  const float* vr = (packed ? qkv_r.data() : vb_r.data()) + v0;
  std::vector<float> out_b(o_size), lse_b(batch * H * tq), dq_b(q_size, 0.0f), dk_b(k_size, 0.0f),
      dv_b(v_size, 0.0f);
  replay_forward<D, TMax>(out_b.data(), lse_b.data(), qr, kr, vr, L, batch, H, tq, tk, scale, causal, q_offset,
                          last_key);
  out_b = R(out_b);
  replay_backward<D, TMax>(dq_b.data() + q0, dk_b.data() + k0, dv_b.data() + v0, d_out_r.data(), qr, kr, vr,
                           out_b.data(), lse_b.data(), L, batch, H, tq, tk, scale, causal, q_offset, last_key);
  dq_b = R(dq_b), dk_b = R(dk_b), dv_b = R(dv_b);
  std::vector<float> out_e(o_size), dq_e(q_size, 0.0f), dk_e(k_size, 0.0f), dv_e(v_size, 0.0f);
  clip::attention_forward<H, D>(RowsView<float>{out_e.data(), L.o_row, L.o_batch}, probs.data(),
                                RowsView<const float>{qr, L.q_row, L.q_batch}, RowsView<const float>{kr, L.k_row, L.k_batch},
                                RowsView<const float>{vr, L.v_row, L.v_batch}, batch, tq, tk, causal, last_key);
  clip::attention_backward<H, D>(
      RowsView<float>{dq_e.data() + q0, L.q_row, L.q_batch}, RowsView<float>{dk_e.data() + k0, L.k_row, L.k_batch},
      RowsView<float>{dv_e.data() + v0, L.v_row, L.v_batch}, RowsView<const float>{d_out_r.data(), L.o_row, L.o_batch},
      probs.data(), RowsView<const float>{qr, L.q_row, L.q_batch}, RowsView<const float>{kr, L.k_row, L.k_batch},
      RowsView<const float>{vr, L.v_row, L.v_batch}, batch, tq, tk);
  out_e = R(out_e), dq_e = R(dq_e), dk_e = R(dk_e), dv_e = R(dv_e);
  RelErr bo, bq, bk, bv, xo, xq, xk, xv;  // b: replayed bf16 kernels, x: CPU emulation (both vs fp32 ref)
  add_rows<D>(bo, out_b.data(), out_ref.data(), batch, tq, H, L.o_row, L.o_batch);
  add_rows<D>(xo, out_e.data(), out_ref.data(), batch, tq, H, L.o_row, L.o_batch);
  add_rows<D>(bq, dq_b.data() + q0, dq_ref.data() + q0, batch, tq, H, L.q_row, L.q_batch);
  add_rows<D>(xq, dq_e.data() + q0, dq_ref.data() + q0, batch, tq, H, L.q_row, L.q_batch);
  add_rows<D>(bk, dk_b.data() + k0, dk_ref.data() + k0, batch, tk, H, L.k_row, L.k_batch);
  add_rows<D>(xk, dk_e.data() + k0, dk_ref.data() + k0, batch, tk, H, L.k_row, L.k_batch);
  add_rows<D>(bv, dv_b.data() + v0, dv_ref.data() + v0, batch, tk, H, L.v_row, L.v_batch);
  add_rows<D>(xv, dv_e.data() + v0, dv_ref.data() + v0, batch, tk, H, L.v_row, L.v_batch);
  BOOST_TEST_CONTEXT("bf16 D " << D << " TMax " << TMax << " B " << batch << " tq " << tq << " tk " << tk
                               << " causal " << causal << " packed " << packed << " last_key " << with_last_key) {
    BOOST_TEST(bo.value() <= 2 * xo.value());
    // dq, dk: 3x (see bf16_gradient_tolerance in tests/cuda/test_cuda_attention.cu)
    BOOST_TEST(bq.value() <= 3 * xq.value());
    BOOST_TEST(bk.value() <= 3 * xk.value());
    BOOST_TEST(bv.value() <= 2 * xv.value());
  }
  for (auto [b, x, w] : {std::tuple{&bo, &xo, &worst_bf16_out}, std::tuple{&bq, &xq, &worst_bf16_dq},
                         std::tuple{&bk, &xk, &worst_bf16_dk}, std::tuple{&bv, &xv, &worst_bf16_dv}})
    if (x->value() > 0) *w = std::max(*w, b->value() / x->value());
}

template <int D>
void run_all() {
  uint32_t seed = 1000 * D;
  for (bool causal : {false, true})
    for (int64_t t : {1, 7, 50, 77, 257}) {
      for (int64_t batch : {1, 3}) {
        run_case<D, 257>(batch, t, t, causal, /*packed=*/true, false, ++seed);
      }
      if (t <= 77) run_case<D, 77>(2, t, t, causal, true, false, ++seed);
    }
  // short sequences: 32-row blocks, 16- and 32-key tiles
  run_case<D, 7>(3, 7, 7, true, true, false, ++seed);
  run_case<D, 20>(2, 20, 20, true, true, false, ++seed);
  run_case<D, 32>(2, 9, 32, false, false, false, ++seed);
  // cross attention: tq != tk (causal: q_offset = tk - tq as the CPU op)
  run_case<D, 257>(3, 5, 20, false, false, false, ++seed);
  run_case<D, 257>(3, 5, 20, true, false, false, ++seed);
  run_case<D, 257>(2, 70, 257, true, false, false, ++seed);
  run_case<D, 257>(2, 100, 130, false, false, false, ++seed);
  // attention pool: one query per sample over 50 keys (ResNet), over 257 keys
  run_case<D, 50>(3, 1, 50, false, false, false, ++seed);
  run_case<D, 257>(1, 1, 257, false, false, false, ++seed);
  // a caption's pooled position attending its causal prefix (CPU forward_pooled)
  run_case<D, 77>(5, 1, 77, false, false, true, ++seed);
  run_case<D, 257>(4, 3, 200, false, false, true, ++seed);
}

}  // namespace

BOOST_AUTO_TEST_CASE(online_softmax_merge_matches_one_pass) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> s(40);
  for (auto& x : s) x = normal(rng);
  auto fold = [](const float* x, int n) {
    OnlineSoftmax st;
    for (int i = 0; i < n; ++i) {
      const float m = std::max(st.max, x[i]);
      st.sum = st.sum * clip::online_softmax_rescale(st.max, m) + std::exp(x[i] - m);
      st.max = m;
    }
    return st;
  };
  const OnlineSoftmax all = fold(s.data(), 40);
  float ca, cb;
  const OnlineSoftmax merged = clip::online_softmax_merge(fold(s.data(), 13), fold(s.data() + 13, 27), &ca, &cb);
  BOOST_TEST(merged.max == all.max);
  BOOST_TEST(std::abs(merged.sum - all.sum) <= 1e-6f * all.sum);
  const OnlineSoftmax empty;
  const OnlineSoftmax same = clip::online_softmax_merge(empty, all, &ca, &cb);
  BOOST_TEST(ca == 0.0f);
  BOOST_TEST(cb == 1.0f);
  BOOST_TEST(same.sum == all.sum);
  BOOST_TEST(clip::online_softmax_logsumexp(empty) == -INFINITY);
}

BOOST_AUTO_TEST_CASE(key_limits_match_the_cpu_masks) {
  // causal with q_offset = tk - tq; last_key caps every row
  BOOST_TEST(clip::attention_key_limit(0, 10, true, 0, -1) == 1);
  BOOST_TEST(clip::attention_key_limit(2, 10, true, 5, -1) == 8);
  BOOST_TEST(clip::attention_key_limit(9, 10, true, 5, -1) == 10);
  BOOST_TEST(clip::attention_key_limit(3, 10, false, 0, -1) == 10);
  BOOST_TEST(clip::attention_key_limit(3, 10, false, 0, 4) == 5);
  BOOST_TEST(clip::attention_first_query(7, true, 5) == 2);
  BOOST_TEST(clip::attention_first_query(3, true, 5) == 0);
  BOOST_TEST(clip::attention_first_query(3, false, 0) == 0);
}

BOOST_AUTO_TEST_CASE(replayed_kernels_match_cpu_attention) {
  run_all<16>();
  run_all<32>();
  run_all<64>();
  std::cout << "attention host replay vs CPU, max rel err: out " << worst_forward << ", lse " << worst_lse << ", dq "
            << worst_dq << ", dk " << worst_dk << ", dv " << worst_dv
            << "; bf16 storage, worst (replay error) / (CPU bf16 emulation error): out " << worst_bf16_out << ", dq "
            << worst_bf16_dq << ", dk " << worst_bf16_dk << ", dv " << worst_bf16_dv << std::endl;
}
