// Online softmax and the per-row steps of fused (FlashAttention-style) attention, written once for
// the CUDA kernels (kernels/attention.cuh) and for a host loop that replays them on the CPU
// (tests/test_cuda_host_attention.cpp), so the host test checks the kernels' exact arithmetic.
//
// A softmax over a row of scores s_0..s_{n-1} never needs the whole row at once: keep the running
// maximum m and the running sum l = Σ exp(s_j - m); when a new chunk raises the maximum to m',
// everything accumulated so far is multiplied by exp(m - m'). Attention keeps, next to (m, l), the
// unnormalised output acc = Σ exp(s_j - m) v_j, rescaled the same way; out = acc / l at the end and
// logsumexp = m + log l is all the backward pass needs to recompute p_j = exp(s_j - logsumexp).
//
// Order of work (the kernels and the host loop both follow it):
//   forward, per query row i:  key chunks of attention_key_chunk keys, j0 = 0, 16, 32, ... in order;
//                              inside a chunk, scores first, one rescale, then keys in order.
//   dQ, per query row i:       keys j = 0, 1, ... in order (chunked the same way).
//   dK/dV, per key row j:      queries i = 0, 1, ... in order (chunks of attention_query_chunk).
// Masking is explicit (keys past the row's limit are never visited), so a masked p is exactly 0.
//
// Rows of q, k, v are passed as anything indexable by [d] (a register array in a kernel, a pointer
// into shared memory or a host buffer); chunks of staged rows as a pointer and a row stride.
#pragma once

#include <math.h>

#include <cstdint>

#include "clip/core/host_device.hpp"

// Full unrolling of the D-long loops keeps a kernel's per-row arrays in registers; g++ needs no hint.
#if defined(__CUDACC__)
#define CLIP_ATTENTION_UNROLL _Pragma("unroll")
#else
#define CLIP_ATTENTION_UNROLL
#endif

namespace clip {

// Keys scored at once in the forward pass: the scores of one chunk live in registers, and the
// accumulator is rescaled once per chunk rather than once per key.
inline constexpr int attention_key_chunk = 16;
// Queries per step of the dK/dV loop (the size of the query tile the kernel stages).
inline constexpr int attention_query_chunk = 16;

// Tile shapes of the kernels, shared with the host replay. Threads per block own one row each:
// query rows in the forward and dQ kernels, key rows in the dK/dV kernel.
template <int D, int TMax>
struct AttentionTiles {
  // D = 64 for every CLIP variant (16 and 32 in the tiny test models). Larger heads would need
  // more than the 48 KiB of static shared memory the K/V tiles take at D = 64.
  static_assert(D > 0 && D <= 64, "the attention kernels support head sizes from 1 to 64");
  static_assert(TMax > 0, "attention needs a positive maximum sequence length");
  static constexpr int rows = TMax <= 32 ? 32 : 64;  // threads (rows) per block
  // Keys per staged K/V tile: a multiple of the key chunk, at most 64 (2 x 64 x D floats of shared memory).
  static constexpr int keys = (TMax + attention_key_chunk - 1) / attention_key_chunk * attention_key_chunk < 64
                                  ? (TMax + attention_key_chunk - 1) / attention_key_chunk * attention_key_chunk
                                  : 64;
  // Keys per staged K/V tile of the dQ kernel: at most 32, leaving shared memory for the block's
  // own q rows (at D = 64, q, dO and dq in registers spilled 72 bytes per thread).
  static constexpr int dq_keys = keys < 32 ? keys : 32;
  static constexpr int queries = attention_query_chunk;  // queries per staged Q/dO tile (dK/dV kernel)
  static constexpr int own_ld = D + 1;  // padded stride of a thread's own rows in shared memory: no bank conflicts
  static_assert(keys % attention_key_chunk == 0 && dq_keys % attention_key_chunk == 0,
                "a key tile holds whole key chunks");
};

// Running state of one row's softmax: max of the scores seen, and Σ exp(score - max).
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.0f;
};

// exp(from - to) for rescaling a state kept relative to `from` so that it is relative to `to`
// (to >= from). An empty state (from = -inf) scales by 0, not by exp(nan).
CLIP_HOST_DEVICE inline float online_softmax_rescale(float from, float to) {
  return from == -INFINITY ? 0.0f : expf(from - to);
}

// Combines two partial states of the same row (e.g. two halves of its keys); *scale_a and
// *scale_b receive the factors by which the matching partial accumulators must be multiplied
// before they are added.
CLIP_HOST_DEVICE inline OnlineSoftmax online_softmax_merge(const OnlineSoftmax& a, const OnlineSoftmax& b,
                                                           float* scale_a, float* scale_b) {
  OnlineSoftmax r;
  r.max = fmaxf(a.max, b.max);
  *scale_a = online_softmax_rescale(a.max, r.max);
  *scale_b = online_softmax_rescale(b.max, r.max);
  r.sum = a.sum * *scale_a + b.sum * *scale_b;
  return r;
}

// log Σ exp(score) of the row (-inf for a row that saw no key).
CLIP_HOST_DEVICE inline float online_softmax_logsumexp(const OnlineSoftmax& st) {
  return st.sum > 0.0f ? st.max + logf(st.sum) : -INFINITY;
}

// Number of keys query row i (0-based) of a sample sees: all tk keys, or with the causal mask keys
// j <= i + q_offset, and never past last_key (< 0: no per-sample limit). Matches the CPU
// attention_forward, whose causal shift is q_offset = tk - tq, and its last_key argument.
CLIP_HOST_DEVICE inline int64_t attention_key_limit(int64_t i, int64_t tk, bool causal, int64_t q_offset,
                                                    int64_t last_key) {
  int64_t n = tk;
  if (causal && i + q_offset + 1 < n) n = i + q_offset + 1;
  if (last_key >= 0 && last_key + 1 < n) n = last_key + 1;
  return n < 0 ? 0 : n;
}

// First query row (0-based) that sees key j under the causal mask (0 without it).
CLIP_HOST_DEVICE inline int64_t attention_first_query(int64_t j, bool causal, int64_t q_offset) {
  return causal && j - q_offset > 0 ? j - q_offset : 0;
}

template <int D, class Row, class Vec>
CLIP_HOST_DEVICE inline float attention_dot(const Row& a, const Vec& b) {
  float s = 0.0f;
CLIP_ATTENTION_UNROLL
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// Forward step of one query row over one chunk of n <= attention_key_chunk visible keys:
// k and v point at the chunk's first key, rows `ld` floats apart. st and acc (Σ p v, relative to
// st.max) are updated in place.
template <int D, class QRow>
CLIP_HOST_DEVICE inline void attention_forward_chunk(OnlineSoftmax& st, float (&acc)[D], const QRow& q,
                                                     const float* k, const float* v, int ld, int n, float scale) {
  constexpr int N = attention_key_chunk;
  float s[N];
  float m = st.max;
CLIP_ATTENTION_UNROLL
  for (int j = 0; j < N; ++j) {
    if (j < n) {
      s[j] = attention_dot<D>(q, k + j * ld) * scale;
      m = fmaxf(m, s[j]);
    }
  }
  const float c = online_softmax_rescale(st.max, m);
  float sum = st.sum * c;
CLIP_ATTENTION_UNROLL
  for (int d = 0; d < D; ++d) acc[d] *= c;
CLIP_ATTENTION_UNROLL
  for (int j = 0; j < N; ++j) {
    if (j < n) {
      const float p = expf(s[j] - m);
      sum += p;
      const float* vj = v + j * ld;
CLIP_ATTENTION_UNROLL
      for (int d = 0; d < D; ++d) acc[d] += p * vj[d];
    }
  }
  st.max = m;
  st.sum = sum;
}

// End of the forward row: the normalised output (out[d] = acc[d] / sum) and the logsumexp.
template <int D>
CLIP_HOST_DEVICE inline float attention_forward_finish(const OnlineSoftmax& st, float (&acc)[D]) {
  const float inv = st.sum > 0.0f ? 1.0f / st.sum : 0.0f;
CLIP_ATTENTION_UNROLL
  for (int d = 0; d < D; ++d) acc[d] *= inv;
  return online_softmax_logsumexp(st);
}

// delta_i = Σ_d dO_i[d] O_i[d] = Σ_j p_ij (dO_i · v_j), the row sum the softmax backward subtracts.
template <int D, class ORow, class DORow>
CLIP_HOST_DEVICE inline float attention_delta(const ORow& o, const DORow& d_o) {
  return attention_dot<D>(d_o, o);
}

// dQ step of one query row over n visible keys (k, v rows `ld` apart):
//   p = exp(q.k_j scale - lse),  ds = p (dO.v_j - delta),  dq += ds k_j    (dq *= scale at the end)
template <int D, class QRow, class DORow>
CLIP_HOST_DEVICE inline void attention_dq_chunk(float (&dq)[D], const QRow& q, const DORow& d_o, float lse,
                                                float delta, const float* k, const float* v, int ld, int n,
                                                float scale) {
  for (int j = 0; j < n; ++j) {
    const float* kj = k + j * ld;
    const float p = expf(attention_dot<D>(q, kj) * scale - lse);
    const float ds = p * (attention_dot<D>(d_o, v + j * ld) - delta);
CLIP_ATTENTION_UNROLL
    for (int d = 0; d < D; ++d) dq[d] += ds * kj[d];
  }
}

// dK/dV step of one key row over the queries [begin, n) of a chunk (q, dO rows `ld` apart; lse and
// delta per query of the chunk):
//   p = exp(q_i.k scale - lse_i),  dv += p dO_i,  ds = p (dO_i.v - delta_i),  dk += ds q_i
// (dk *= scale at the end).
template <int D, class KRow, class VRow>
CLIP_HOST_DEVICE inline void attention_dkv_chunk(float (&dk)[D], float (&dv)[D], const KRow& k, const VRow& v,
                                                 const float* q, const float* d_o, int ld, const float* lse,
                                                 const float* delta, int begin, int n, float scale) {
  for (int i = begin; i < n; ++i) {
    const float* qi = q + i * ld;
    const float* doi = d_o + i * ld;
    const float p = expf(attention_dot<D>(qi, k) * scale - lse[i]);
    const float ds = p * (attention_dot<D>(doi, v) - delta[i]);
CLIP_ATTENTION_UNROLL
    for (int d = 0; d < D; ++d) {
      dv[d] += p * doi[d];
      dk[d] += ds * qi[d];
    }
  }
}

}  // namespace clip

#undef CLIP_ATTENTION_UNROLL
