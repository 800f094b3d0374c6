// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization") over a model's Params, with
// PyTorch's arithmetic, so one step from the same weights and gradients gives the same weights:
//
//   p  = p * (1 - lr * wd)                           decoupled decay (wd = 0 in the no-decay group)
//   m  = beta1 m + (1 - beta1) g
//   v  = beta2 v + (1 - beta2) g^2
//   p += -(lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// Scalars (bias corrections, step size, decay factor) are formed in double from the decimal
// values of the options (decimal.hpp), then rounded to float, as PyTorch does with Python floats.
// m's update is one FMA, as PyTorch's vectorised add(alpha) is; every other product is rounded
// before it is added, as in PyTorch's separate kernels. On the golden step this reproduces
// PyTorch's weights bit for bit.
//
// Weight-decay groups follow CLIP training practice (open_clip): no decay for tensors of rank < 2
// or whose name contains "bn", "ln", "bias" or "logit_scale" (gains, biases, embeddings of rank 1,
// the temperature). Buffers (BatchNorm statistics) are not trained and are skipped.
//
// The step is one pass over memory per tensor: it reads p, g, m, v and writes p, m, v and g = 0,
// so the gradients are ready for the next accumulation without a separate zeroing pass. The text
// token embedding alone is V x C floats and changes every step (decay, moments), so this loop is
// bandwidth-bound: it runs over fixed-size chunks on every OpenMP thread, 16 lanes at a time.
// Quiet blocks: most embedding rows belong to tokens the data has not used yet, so their g, m and
// v are exactly zero and the update reduces exactly to p *= 1 - lr wd. The optimizer remembers
// which 1024-float blocks still have zero moments and, where the gradient is zero too, only
// decays p: two streams instead of eight, with bit-identical results.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "clip/core/error.hpp"
#include "clip/tensor/param.hpp"
#include "clip/train/adamw_math.hpp"
#include "clip/train/decimal.hpp"

namespace clip {

struct AdamWOptions {
  float lr = 5e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.98f;
  float eps = 1e-6f;
  float weight_decay = 0.2f;
};

// Whether a parameter is in the weight-decay group (open_clip's rule, see above).
inline bool adamw_decays(const std::string& name, int rank) {
  const auto has = [&](const char* part) { return name.find(part) != std::string::npos; };
  return rank >= 2 && !has("bn") && !has("ln") && !has("bias") && !has("logit_scale");
}

// The storage of every trained tensor of `params` (buffers excluded), in visit order.
template <class Params>
std::vector<float*> trained_tensor_data(Params& params) {
  std::vector<float*> out;
  for_each_tensor(params, [&](const std::string&, auto& t, Role role) {
    if constexpr (!is_counter_v<decltype(t)>)
      if (role == Role::parameter) out.push_back(t.data());
  });
  return out;
}

namespace detail {

// The step's scalars and the element update are shared with the CUDA optimizer
// (adamw_math.hpp); the names stay available here for the CPU code and its tests.
using clip::AdamWScalars;
using clip::adamw_element;

inline void adamw_update(float* __restrict p, float* __restrict g, float* __restrict m, float* __restrict v,
                         int64_t n, const AdamWScalars& s) {
#if defined(__AVX512F__)
  // Every element, the tail included (masked), takes the same instructions, so the rounding of
  // an element never depends on where a chunk boundary falls. They are adamw_element's
  // operations (adamw_math.hpp), 16 lanes at a time: the same bits as the scalar path and the GPU.
  const __m512 decay = _mm512_set1_ps(s.decay), b1 = _mm512_set1_ps(s.beta1), omb1 = _mm512_set1_ps(s.one_minus_beta1);
  const __m512 b2 = _mm512_set1_ps(s.beta2), omb2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 neg_step = _mm512_set1_ps(s.neg_step), bc2 = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  const __m512 scale = _mm512_set1_ps(s.grad_scale), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 grad = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, g + i), scale);
    _mm512_mask_storeu_ps(g + i, k, zero);
    const __m512 mi = _mm512_fmadd_ps(grad, omb1, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m + i), b1));
    const __m512 vi = _mm512_add_ps(rounded(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), b2)),
                                    rounded(_mm512_mul_ps(_mm512_mul_ps(omb2, grad), grad)));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    const __m512 pd = rounded(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i), decay));
    _mm512_mask_storeu_ps(p + i, k, _mm512_add_ps(pd, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), denom)));
  }
#else
  for (int64_t i = 0; i < n; ++i) adamw_element(p[i], g[i], m[i], v[i], s);
#endif
}

// Whether n floats are all zero (either sign).
inline bool all_zero(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512i bits = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    bits = _mm512_or_si512(bits, _mm512_castps_si512(_mm512_maskz_loadu_ps(k, x + i)));
  }
  return _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x7FFFFFFF)) == 0;
#else
  uint32_t bits = 0;
  for (int64_t i = 0; i < n; ++i) bits |= std::bit_cast<uint32_t>(x[i]) & 0x7FFFFFFFu;
  return bits == 0;
#endif
}

// p *= decay: the whole update where g, m and v are zero (see AdamW's quiet blocks).
inline void decay_only(float* p, int64_t n, float decay) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] *= decay;
}

}  // namespace detail

template <class Params>
class AdamW {
 public:
  // The moments start at zero; `like` only fixes the tensors' shapes (they are static in Params).
  explicit AdamW([[maybe_unused]] const Params& like, AdamWOptions options = {})
      : options_(options), m_(std::make_unique<Params>()), v_(std::make_unique<Params>()) {
    CLIP_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1,
               "AdamW needs betas in [0, 1), got beta1 ", options.beta1, " and beta2 ", options.beta2);
    CLIP_CHECK(options.eps > 0, "AdamW needs a positive eps, got ", options.eps);
    CLIP_CHECK(options.weight_decay >= 0, "AdamW needs a non-negative weight decay, got ", options.weight_decay);
    zero(*m_);
    zero(*v_);
    // The tensor table and its chunks depend only on the Params type, so they are made once.
    for_each_tensor(*m_, [&](const std::string& name, const auto& t, Role role) {
      using T = std::remove_cvref_t<decltype(t)>;
      if constexpr (!is_counter_v<T>) {
        if (role == Role::parameter) {
          const int index = static_cast<int>(tensors_.size());
          tensors_.push_back({name, T::numel, decays(name, T::rank)});
          for (int64_t begin = 0; begin < T::numel; begin += kChunk) {
            chunks_.push_back({index, begin, std::min<int64_t>(T::numel, begin + kChunk),
                               static_cast<int64_t>(quiet_.size())});
            quiet_.resize(quiet_.size() + (chunks_.back().end - begin + kBlock - 1) / kBlock, 1);
          }
          elements_ += T::numel;
        }
      }
    });
  }

  static bool decays(const std::string& name, int rank) { return adamw_decays(name, rank); }

  // One step at learning rate `lr`; every gradient is multiplied by `grad_scale` as it is read
  // (gradient clipping without its own pass) and left at zero.
  void step(Params& params, Params& grads, float lr, float grad_scale = 1.0f) {
    const std::vector<float*> p = pointers(params), g = pointers(grads), m = pointers(*m_), v = pointers(*v_);
    ++steps_;
    const AdamWScalars with_decay = adamw_scalars(lr, options_.beta1, options_.beta2, options_.eps,
                                                  options_.weight_decay, steps_, grad_scale);
    AdamWScalars without_decay = with_decay;
    without_decay.decay = 1.0f;

    if (moments_touched_) find_quiet_blocks(m, v);
    const int64_t count = static_cast<int64_t>(chunks_.size());
#pragma omp parallel for schedule(static) if (elements_ >= (int64_t{1} << 16))
    for (int64_t c = 0; c < count; ++c) {
      const Chunk& k = chunks_[c];
      const int i = k.tensor;
      const AdamWScalars& s = tensors_[i].decays ? with_decay : without_decay;
      for (int64_t b = k.begin, block = k.first_block; b < k.end; b += kBlock, ++block) {
        const int64_t n = std::min(kBlock, k.end - b);
        if (quiet_[block]) {
          if (detail::all_zero(g[i] + b, n)) {
            if (s.decay != 1.0f) detail::decay_only(p[i] + b, n, s.decay);
            continue;
          }
          quiet_[block] = 0;
        }
        detail::adamw_update(p[i] + b, g[i] + b, m[i] + b, v[i] + b, n, s);
      }
    }
  }

  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) {  // a resumed run's count (the bias corrections depend on it)
    CLIP_CHECK(steps >= 0, "an optimizer step count cannot be negative (got ", steps, ")");
    steps_ = steps;
  }
  const AdamWOptions& options() const { return options_; }

  // First and second moments, as the model's tensors (checkpoints save and restore them). The
  // writable accessors make the next step re-scan which blocks are still all zero.
  Params& m() { return moments_touched_ = true, *m_; }
  const Params& m() const { return *m_; }
  Params& v() { return moments_touched_ = true, *v_; }
  const Params& v() const { return *v_; }

 private:
  static constexpr int64_t kChunk = int64_t{1} << 14;  // 64 KiB of each of p, g, m, v
  static constexpr int64_t kBlock = 1024;              // the unit of quiet-block tracking

  struct TensorInfo {
    std::string name;
    int64_t numel;
    bool decays;
  };
  struct Chunk {
    int tensor;
    int64_t begin, end;
    int64_t first_block;  // index into quiet_ of the block at `begin`
  };

  AdamWOptions options_;
  std::unique_ptr<Params> m_, v_;
  std::vector<TensorInfo> tensors_;  // the trained tensors, in visit order
  std::vector<Chunk> chunks_;
  std::vector<uint8_t> quiet_;  // per block: m and v are all zero
  bool moments_touched_ = false;  // m() or v() was handed out for writing since the last step
  int64_t elements_ = 0;
  int64_t steps_ = 0;

  void find_quiet_blocks(const std::vector<float*>& m, const std::vector<float*>& v) {
    const int64_t count = static_cast<int64_t>(chunks_.size());
#pragma omp parallel for schedule(static) if (elements_ >= (int64_t{1} << 16))
    for (int64_t c = 0; c < count; ++c) {
      const Chunk& k = chunks_[c];
      for (int64_t b = k.begin, block = k.first_block; b < k.end; b += kBlock, ++block) {
        const int64_t n = std::min(kBlock, k.end - b);
        quiet_[block] = detail::all_zero(m[k.tensor] + b, n) && detail::all_zero(v[k.tensor] + b, n);
      }
    }
    moments_touched_ = false;
  }

  // The trained tensors' storage, in the order of tensors_.
  static std::vector<float*> pointers(Params& params) { return trained_tensor_data(params); }
};

}  // namespace clip
