// CLIP's symmetric contrastive loss on the GPU, forward and backward in one call, mirroring
// include/clip/train/contrastive_loss.hpp operation for operation (B batch, E embed):
//
//   a_i = img_i / |img_i|,  b_j = txt_j / |txt_j|       no epsilon; |.| summed in double
//   L = s A B^T,  s = exp(logit_scale)                    gemm (fp32), then a rounded scaling
//   loss = (CE(rows of L, diagonal) + CE(columns of L, diagonal)) / 2     statistics in double
//   G = (softmax_rows(L) - I + softmax_cols(L) - I) / (2B)
//   dA = G B, dB = G^T A (gemms), d img_i = (s dA_i - a_i (a_i . s dA_i)) / |img_i|, same for text
//   d logit_scale = sum_ij G[i, j] L[i, j]
//
// Kernels, in stream order:
//   normalize_kernel   one block per row of A and of B: the norm (double sum, a fixed tree) and
//                      the unit row in fp32.
//   gemm_nt            logits = A B^T (kernels/gemm.cuh, CUBLAS_COMPUTE_32F: plain fp32).
//   softmax_rows_kernel one block per row i: scales the row by s in place, its max and double
//                      sum of exponentials, the row's loss term, and G[i, :] = P_rows[i, :].
//   softmax_cols_kernel 32 columns per block (8 rows of threads, so the reads of a row of L are
//                      coalesced): the column's statistics and loss term, then G's final value
//                      (P_rows + P_cols - 2 I) / (2B) and the column's share of d logit_scale.
//   finish_kernel      one block: the loss and d logit_scale from the per-row/column doubles in a
//                      fixed order. Deterministic: no atomics anywhere.
//   gemm_nn, gemm_tn   dA = G B, dB = G^T A.
//   through_norm_kernel one block per row: the gradient through the normalisation, written as S.
//
// Features and their gradients are S (the towers' storage); everything inside is fp32, the
// statistics double, as the CPU. In fp32 the differences from the CPU are the summation orders
// of the gemms and the double reductions (results agree to ~1e-6 relative).
//
// Data parallel, by rows (contrastive_loss_rows, mirroring the CPU's function of that name): a
// rank owning rows [first, first + n) of the global batch computes, from every rank's features,
//   Lr [n, B] = s A_own B^T   its rows of L         Lc [n, B] = s B_own A^T   its columns of L
// (two gemm_nt), then one block per row of each (own_rows_softmax_kernel): scaled in place, its
// max and double sum of exponentials, its loss term (target column first + i), and in place
// G = (softmax - one-hot) / (2B) with the row's share of d logit_scale. The loss share is the
// sum of the 2n terms / (2B) (finish_rows_loss_kernel, a fixed order), and the gradients of ALL
// B rows of both feature matrices (the rank's share, fp32, to be reduce-scattered to the owners)
// come from four gemms, in the CPU's order:
//   dA = Gc^T B_own,  dA_own += Gr B,  dB = Gr^T A_own,  dB_own += Gc A,
// then through_norm_kernel. Scratch is [n, B] twice, never [B, B]; n = B is the one-process
// loss computed with L twice (Lr and Lc = L^T), which is why one GPU without a communicator keeps
// the single-matrix contrastive_loss above.
//
// The CPU throws when a feature row has a zero or non-finite norm. A kernel cannot throw: the
// loss is written as NaN instead and d logit_scale is left untouched; the caller checks that the
// loss is finite before it uses the gradients, as clip::Trainer does.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/device_buffer.cuh"
#include "kernels/gemm.cuh"
#include "kernels/grad_norm.cuh"  // detail::block_all_reduce, Plus, Max
#include "kernels/storage.cuh"

namespace clip::cuda {

// The loss's working memory for batches of up to `capacity` pairs, taken from an Arena.
template <int E>
struct ContrastiveLossScratch {
  static_assert(E > 0, "the embedding needs a positive size");
  int64_t capacity = 0;
  float* a = nullptr;        // [B, E] unit image features
  float* b = nullptr;        // [B, E] unit text features
  float* norm_a = nullptr;   // [B]
  float* norm_b = nullptr;   // [B]
  float* logits = nullptr;   // [B, B] logits_per_image (s A B^T) after a call
  float* g = nullptr;        // [B, B] d loss / d logits
  float* da = nullptr;       // [B, E] G B
  float* db = nullptr;       // [B, E] G^T A
  double* row_loss = nullptr;    // [B]
  double* col_loss = nullptr;    // [B]
  double* col_dscale = nullptr;  // [B]

  ContrastiveLossScratch(Arena& arena, int64_t capacity_) : capacity(capacity_) {
    CLIP_CHECK(capacity > 0, "the contrastive loss needs room for at least one pair, got ", capacity);
    a = arena.take<float>(capacity * E);
    b = arena.take<float>(capacity * E);
    norm_a = arena.take<float>(capacity);
    norm_b = arena.take<float>(capacity);
    logits = arena.take<float>(capacity * capacity);
    g = arena.take<float>(capacity * capacity);
    da = arena.take<float>(capacity * E);
    db = arena.take<float>(capacity * E);
    row_loss = arena.take<double>(capacity);
    col_loss = arena.take<double>(capacity);
    col_dscale = arena.take<double>(capacity);
  }
  // What the constructor takes from an arena, rounded up to the arena's alignment (so the sum of
  // several bytes() is enough for all of them in one arena).
  static size_t bytes(int64_t capacity) {
    Arena plan = Arena::planner();
    ContrastiveLossScratch sizing(plan, capacity);
    return (plan.used() + Arena::alignment - 1) / Arena::alignment * Arena::alignment;
  }
};

// The rows variant's working memory, for `rows` owned rows of batches of up to `batch` pairs.
template <int E>
struct ContrastiveLossRowsScratch {
  static_assert(E > 0, "the embedding needs a positive size");
  int64_t batch = 0, rows = 0;
  float* a = nullptr;        // [B, E] unit image features (every rank's)
  float* b = nullptr;        // [B, E] unit text features
  float* norm_a = nullptr;   // [B]
  float* norm_b = nullptr;   // [B]
  float* lr = nullptr;       // [n, B] the owned rows of L, then their G
  float* lc = nullptr;       // [n, B] the owned columns of L (transposed), then their G
  float* da = nullptr;       // [B, E] d loss / d A (before the factor s)
  float* db = nullptr;       // [B, E] d loss / d B
  double* row_loss = nullptr;    // [2n] the loss terms of the rows of Lr, then of Lc
  double* row_dscale = nullptr;  // [2n] their shares of d logit_scale

  ContrastiveLossRowsScratch(Arena& arena, int64_t batch_, int64_t rows_) : batch(batch_), rows(rows_) {
    CLIP_CHECK(batch > 0 && rows > 0 && rows <= batch, "the contrastive loss by rows needs 1 to ", batch,
               " owned rows of a batch of at least one pair, got ", rows);
    a = arena.take<float>(batch * E);
    b = arena.take<float>(batch * E);
    norm_a = arena.take<float>(batch);
    norm_b = arena.take<float>(batch);
    lr = arena.take<float>(rows * batch);
    lc = arena.take<float>(rows * batch);
    da = arena.take<float>(batch * E);
    db = arena.take<float>(batch * E);
    row_loss = arena.take<double>(2 * rows);
    row_dscale = arena.take<double>(2 * rows);
  }
  // As ContrastiveLossScratch::bytes.
  static size_t bytes(int64_t batch, int64_t rows) {
    Arena plan = Arena::planner();
    ContrastiveLossRowsScratch sizing(plan, batch, rows);
    return (plan.used() + Arena::alignment - 1) / Arena::alignment * Arena::alignment;
  }
};

namespace detail {

inline constexpr int kLossThreads = 256;

// s = exp(logit_scale) rounded to float. The CPU's std::exp(float) is glibc's expf; the double
// exponential rounded once gives the correctly rounded value, which expf returns but in rare
// cases (then they differ by one ulp).
__device__ inline float logit_temperature(const float* logit_scale) {
  return static_cast<float>(exp(static_cast<double>(*logit_scale)));
}

// grid (B, 2): blockIdx.y 0 normalises image row blockIdx.x, 1 the text row.
template <int E, class S>
__global__ void __launch_bounds__(kLossThreads)
    normalize_kernel(const S* __restrict__ image, const S* __restrict__ text, float* __restrict__ a,
                     float* __restrict__ b, float* __restrict__ norm_a, float* __restrict__ norm_b) {
  const int64_t i = blockIdx.x;
  const bool is_text = blockIdx.y == 1;
  const S* x = (is_text ? text : image) + i * E;
  float* u = (is_text ? b : a) + i * E;
  double sq = 0;
  for (int j = threadIdx.x; j < E; j += kLossThreads) {
    const double xj = to_float(x[j]);
    sq = fma(xj, xj, sq);
  }
  sq = block_all_reduce<kLossThreads>(sq, Plus{});
  const float norm = static_cast<float>(sqrt(sq));
  if (threadIdx.x == 0) (is_text ? norm_b : norm_a)[i] = norm;
  for (int j = threadIdx.x; j < E; j += kLossThreads) u[j] = __fdiv_rn(to_float(x[j]), norm);
}

// One block per row i of the [B, B] logits (unscaled on entry, scaled on exit).
static __global__ void __launch_bounds__(kLossThreads)
    softmax_rows_kernel(float* __restrict__ logits, float* __restrict__ g, double* __restrict__ row_loss,
                        const float* __restrict__ logit_scale, int64_t B) {
  const int64_t i = blockIdx.x;
  const float s = logit_temperature(logit_scale);
  float* row = logits + i * B;
  float* gr = g + i * B;
  float top = -INFINITY;
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads) {
    const float x = __fmul_rn(row[j], s);
    row[j] = x;
    top = fmaxf(top, x);
  }
  top = block_all_reduce<kLossThreads>(top, Max{});
  double sum = 0;
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads) sum += exp(static_cast<double>(row[j]) - top);
  sum = block_all_reduce<kLossThreads>(sum, Plus{});  // its barriers also publish row[] to the block
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads)
    gr[j] = static_cast<float>(exp(static_cast<double>(row[j]) - top) / sum);
  if (threadIdx.x == 0) row_loss[i] = (static_cast<double>(top) + log(sum)) - static_cast<double>(row[i]);
}

// 32 columns per block, threads (32 columns) x (8 row phases); reads the scaled logits.
inline constexpr int kColumns = 32, kColumnRows = 8;

static __global__ void __launch_bounds__(kColumns* kColumnRows)
    softmax_cols_kernel(const float* __restrict__ logits, float* __restrict__ g, double* __restrict__ col_loss,
                        double* __restrict__ col_dscale, int64_t B) {
  __shared__ float max_part[kColumnRows][kColumns];
  __shared__ double sum_part[kColumnRows][kColumns];
  __shared__ double ds_part[kColumnRows][kColumns];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumns + tx;
  const bool valid = j < B;

  float top = -INFINITY;
  if (valid)
    for (int64_t i = ty; i < B; i += kColumnRows) top = fmaxf(top, logits[i * B + j]);
  max_part[ty][tx] = top;
  __syncthreads();
  top = max_part[0][tx];
  for (int r = 1; r < kColumnRows; ++r) top = fmaxf(top, max_part[r][tx]);

  double sum = 0;
  if (valid)
    for (int64_t i = ty; i < B; i += kColumnRows) sum += exp(static_cast<double>(logits[i * B + j]) - top);
  sum_part[ty][tx] = sum;
  __syncthreads();
  sum = sum_part[0][tx];
  for (int r = 1; r < kColumnRows; ++r) sum += sum_part[r][tx];

  // G = (P_rows + P_cols - 2 I) / (2B), as the CPU: the float sum, minus 2 on the diagonal, times
  // the float 1 / (2B).
  const float inv = __fdiv_rn(1.0f, static_cast<float>(2 * B));
  double ds = 0;
  if (valid)
    for (int64_t i = ty; i < B; i += kColumnRows) {
      const float l = logits[i * B + j];
      const float p_col = static_cast<float>(exp(static_cast<double>(l) - top) / sum);
      const float gij = __fmul_rn(__fsub_rn(__fadd_rn(g[i * B + j], p_col), i == j ? 2.0f : 0.0f), inv);
      g[i * B + j] = gij;
      ds += static_cast<double>(gij) * l;
    }
  ds_part[ty][tx] = ds;
  __syncthreads();
  if (ty == 0 && valid) {
    for (int r = 1; r < kColumnRows; ++r) ds += ds_part[r][tx];
    col_dscale[j] = ds;
    col_loss[j] = (static_cast<double>(top) + log(sum)) - static_cast<double>(logits[j * B + j]);
  }
}

// The end of both finish kernels: this block's threads' partial loss terms `l`, d logit_scale
// terms `d` and bad-norm flags reduced, the loss (NaN when a norm was zero or not finite) and
// d logit_scale written by thread 0.
static __device__ void write_loss(double l, double d, int bad, int64_t B, float* __restrict__ loss,
                                  double* __restrict__ loss_exact, float* __restrict__ d_logit_scale) {
  l = block_all_reduce<kLossThreads>(l, Plus{});
  d = block_all_reduce<kLossThreads>(d, Plus{});
  bad = block_all_reduce<kLossThreads>(bad, Plus{});
  if (threadIdx.x == 0) {
    const double value = bad ? static_cast<double>(NAN) : l / static_cast<double>(2 * B);
    if (loss) *loss = static_cast<float>(value);
    if (loss_exact) *loss_exact = value;
    if (!bad && d_logit_scale) *d_logit_scale += static_cast<float>(d);
  }
}

// One block: the loss and d logit_scale.
static __global__ void __launch_bounds__(kLossThreads)
    finish_loss_kernel(const double* __restrict__ row_loss, const double* __restrict__ col_loss,
                       const double* __restrict__ col_dscale, const float* __restrict__ norm_a,
                       const float* __restrict__ norm_b, int64_t B, float* __restrict__ loss,
                       double* __restrict__ loss_exact, float* __restrict__ d_logit_scale) {
  double l = 0, d = 0;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < B; i += kLossThreads) {
    l += row_loss[i] + col_loss[i];
    d += col_dscale[i];
    bad |= !(norm_a[i] > 0.0f && isfinite(norm_a[i]) && norm_b[i] > 0.0f && isfinite(norm_b[i]));
  }
  write_loss(l, d, bad, B, loss, loss_exact, d_logit_scale);
}

// grid (B, 2): the gradient of row blockIdx.x of the image (y = 0) or text (y = 1) features
// through the normalisation: (s du - u (u . s du)) / |x|, the dot product in double.
template <int E, class S>
__global__ void __launch_bounds__(kLossThreads)
    through_norm_kernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ da,
                        const float* __restrict__ db, const float* __restrict__ norm_a,
                        const float* __restrict__ norm_b, const float* __restrict__ logit_scale,
                        S* __restrict__ d_image, S* __restrict__ d_text) {
  const int64_t i = blockIdx.x;
  const bool is_text = blockIdx.y == 1;
  const float* u = (is_text ? b : a) + i * E;
  const float* du = (is_text ? db : da) + i * E;
  S* out = (is_text ? d_text : d_image) + i * E;
  const double norm = (is_text ? norm_b : norm_a)[i];
  const float s = logit_temperature(logit_scale);
  double dot = 0;
  for (int j = threadIdx.x; j < E; j += kLossThreads)
    dot += (static_cast<double>(u[j]) * static_cast<double>(du[j])) * static_cast<double>(s);
  dot = block_all_reduce<kLossThreads>(dot, Plus{});
  for (int j = threadIdx.x; j < E; j += kLossThreads) {
    const double num = static_cast<double>(__fmul_rn(s, du[j])) - static_cast<double>(u[j]) * dot;
    out[j] = from_float<S>(static_cast<float>(num / norm));
  }
}

// grid (n, 2): blockIdx.y 0 takes row i of Lr (image first + i against every text), 1 row i of
// Lc (text first + i against every image); both target column first + i. Unscaled on entry; on
// exit the row holds G's row (softmax - one-hot) / (2B), and logits_per_image (if not null) the
// scaled rows of Lr, as the CPU's contrastive_loss_rows.
static __global__ void __launch_bounds__(kLossThreads)
    own_rows_softmax_kernel(float* __restrict__ lr, float* __restrict__ lc, float* __restrict__ logits_per_image,
                            double* __restrict__ row_loss, double* __restrict__ row_dscale,
                            const float* __restrict__ logit_scale, int64_t B, int64_t first, int64_t n) {
  const int64_t i = blockIdx.x;
  const bool is_col = blockIdx.y == 1;
  const float s = logit_temperature(logit_scale);
  float* row = (is_col ? lc : lr) + i * B;
  float* keep = is_col || !logits_per_image ? nullptr : logits_per_image + i * B;
  float top = -INFINITY;
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads) {
    const float x = __fmul_rn(row[j], s);
    row[j] = x;
    if (keep) keep[j] = x;
    top = fmaxf(top, x);
  }
  top = block_all_reduce<kLossThreads>(top, Max{});
  double sum = 0;
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads) sum += exp(static_cast<double>(row[j]) - top);
  sum = block_all_reduce<kLossThreads>(sum, Plus{});  // its barriers also publish row[] to the block
  const int64_t target = first + i;
  const float target_logit = row[target];
  __syncthreads();  // every thread has read the target before its owner overwrites it with G
  const float inv = __fdiv_rn(1.0f, static_cast<float>(2 * B));
  double ds = 0;
  for (int64_t j = threadIdx.x; j < B; j += kLossThreads) {
    const float l = row[j];
    const float p = static_cast<float>(exp(static_cast<double>(l) - top) / sum);
    const float g = __fmul_rn(__fsub_rn(p, j == target ? 1.0f : 0.0f), inv);
    ds += static_cast<double>(g) * l;
    row[j] = g;
  }
  ds = block_all_reduce<kLossThreads>(ds, Plus{});
  if (threadIdx.x == 0) {
    const int64_t k = (is_col ? n : 0) + i;
    row_loss[k] = (static_cast<double>(top) + log(sum)) - static_cast<double>(target_logit);
    row_dscale[k] = ds;
  }
}

// One block: the rank's share of the loss (its 2n terms / 2B) and of d logit_scale; NaN when any
// of the B feature rows has a zero or non-finite norm (every rank sees every row).
static __global__ void __launch_bounds__(kLossThreads)
    finish_rows_loss_kernel(const double* __restrict__ row_loss, const double* __restrict__ row_dscale,
                            const float* __restrict__ norm_a, const float* __restrict__ norm_b, int64_t B, int64_t n,
                            float* __restrict__ loss, double* __restrict__ loss_exact,
                            float* __restrict__ d_logit_scale) {
  double l = 0, d = 0;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < 2 * n; k += kLossThreads) {
    l += row_loss[k];
    d += row_dscale[k];
  }
  for (int64_t i = threadIdx.x; i < B; i += kLossThreads)
    bad |= !(norm_a[i] > 0.0f && isfinite(norm_a[i]) && norm_b[i] > 0.0f && isfinite(norm_b[i]));
  write_loss(l, d, bad, B, loss, loss_exact, d_logit_scale);
}

}  // namespace detail

// Loss of `batch` matching pairs (row i of each feature matrix is a pair) and the gradients:
//   image_features, text_features  S [B, E]
//   logit_scale    device float: the fp32 master value (the CPU reads params.logit_scale[0])
//   d_image, d_text S [B, E], assigned
//   loss           device float, assigned (null: not written); loss_exact device double (optional)
//   d_logit_scale  device float, += (the gradient slot of logit_scale; null: not written)
// After the call scratch.logits holds logits_per_image [B, B].
template <int E, class S>
void contrastive_loss(Context& ctx, ContrastiveLossScratch<E>& scratch, const S* image_features,
                      const S* text_features, int64_t batch, const float* logit_scale, S* d_image, S* d_text,
                      float* loss, float* d_logit_scale, double* loss_exact = nullptr) {
  static_assert(is_storage_type<S>, "features are float or bf16");
  CLIP_CHECK(batch > 0, "the contrastive loss needs at least one pair, got ", batch);
  CLIP_CHECK(batch <= scratch.capacity, "the contrastive loss's scratch holds ", scratch.capacity,
             " pairs, the batch has ", batch);
  CLIP_CHECK(batch < (int64_t{1} << 31), "the batch is too large for one grid (", batch, " pairs)");
  CLIP_CHECK(image_features && text_features && logit_scale && d_image && d_text,
             "the contrastive loss needs both feature matrices, logit_scale and both gradient outputs");
  const int64_t B = batch;
  const cudaStream_t stream = ctx.stream();
  auto& s = scratch;

  detail::normalize_kernel<E, S><<<dim3(static_cast<unsigned>(B), 2), detail::kLossThreads, 0, stream>>>(
      image_features, text_features, s.a, s.b, s.norm_a, s.norm_b);
  CLIP_CUDA_CHECK(cudaGetLastError());
  gemm_nt<float, float>(ctx, B, B, E, s.a, E, s.b, E, s.logits, B);  // A B^T, unscaled
  detail::softmax_rows_kernel<<<static_cast<unsigned>(B), detail::kLossThreads, 0, stream>>>(s.logits, s.g, s.row_loss,
                                                                                           logit_scale, B);
  CLIP_CUDA_CHECK(cudaGetLastError());
  detail::softmax_cols_kernel<<<static_cast<unsigned>((B + detail::kColumns - 1) / detail::kColumns),
                                dim3(detail::kColumns, detail::kColumnRows), 0, stream>>>(s.logits, s.g, s.col_loss,
                                                                                          s.col_dscale, B);
  CLIP_CUDA_CHECK(cudaGetLastError());
  detail::finish_loss_kernel<<<1, detail::kLossThreads, 0, stream>>>(s.row_loss, s.col_loss, s.col_dscale, s.norm_a,
                                                                     s.norm_b, B, loss, loss_exact, d_logit_scale);
  CLIP_CUDA_CHECK(cudaGetLastError());
  gemm_nn<float, float>(ctx, B, E, B, s.g, B, s.b, E, s.da, E);  // G B
  gemm_tn<float, float>(ctx, B, E, B, s.g, B, s.a, E, s.db, E);  // G^T A
  detail::through_norm_kernel<E, S><<<dim3(static_cast<unsigned>(B), 2), detail::kLossThreads, 0, stream>>>(
      s.a, s.b, s.da, s.db, s.norm_a, s.norm_b, logit_scale, d_image, d_text);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

// A rank's share, for its rows [first, first + rows) of `batch` pairs (contrastive_loss_rows on
// the CPU): every rank's features in, its share of the loss and of the gradients of all `batch`
// rows of both feature matrices out:
//   image_features, text_features  S [B, E], every rank's (gathered)
//   logit_scale    device float: the fp32 master value
//   d_image, d_text float [B, E], assigned: this rank's share of every row's gradient (zero
//                  where its terms do not reach), fp32 for the reduce-scatter that sums them
//   loss           device float, assigned (null: not written); loss_exact device double (optional)
//   d_logit_scale  device float, += this rank's share (null: not written)
//   logits_per_image device float [rows, B] (optional): this rank's rows of L
template <int E, class S>
void contrastive_loss_rows(Context& ctx, ContrastiveLossRowsScratch<E>& scratch, const S* image_features,
                           const S* text_features, int64_t batch, int64_t first, int64_t rows,
                           const float* logit_scale, float* d_image, float* d_text, float* loss, float* d_logit_scale,
                           double* loss_exact = nullptr, float* logits_per_image = nullptr) {
  static_assert(is_storage_type<S>, "features are float or bf16");
  CLIP_CHECK(batch > 0, "the contrastive loss needs at least one pair, got ", batch);
  CLIP_CHECK(first >= 0 && rows > 0 && first + rows <= batch, "the rows [", first, ", ", first + rows,
             ") are not a slice of a batch of ", batch);
  CLIP_CHECK(batch <= scratch.batch && rows <= scratch.rows, "the contrastive loss's scratch holds ", scratch.rows,
             " rows of ", scratch.batch, " pairs, the call needs ", rows, " rows of ", batch);
  CLIP_CHECK(batch < (int64_t{1} << 31), "the batch is too large for one grid (", batch, " pairs)");
  CLIP_CHECK(image_features && text_features && logit_scale && d_image && d_text,
             "the contrastive loss needs both feature matrices, logit_scale and both gradient outputs");
  const int64_t B = batch, n = rows;
  const cudaStream_t stream = ctx.stream();
  auto& s = scratch;
  const float* a_own = s.a + first * E;  // [n, E]
  const float* b_own = s.b + first * E;  // [n, E]

  detail::normalize_kernel<E, S><<<dim3(static_cast<unsigned>(B), 2), detail::kLossThreads, 0, stream>>>(
      image_features, text_features, s.a, s.b, s.norm_a, s.norm_b);
  CLIP_CUDA_CHECK(cudaGetLastError());
  gemm_nt<float, float>(ctx, n, B, E, a_own, E, s.b, E, s.lr, B);  // A_own B^T, unscaled
  gemm_nt<float, float>(ctx, n, B, E, b_own, E, s.a, E, s.lc, B);  // B_own A^T, unscaled
  detail::own_rows_softmax_kernel<<<dim3(static_cast<unsigned>(n), 2), detail::kLossThreads, 0, stream>>>(
      s.lr, s.lc, logits_per_image, s.row_loss, s.row_dscale, logit_scale, B, first, n);
  CLIP_CUDA_CHECK(cudaGetLastError());
  detail::finish_rows_loss_kernel<<<1, detail::kLossThreads, 0, stream>>>(
      s.row_loss, s.row_dscale, s.norm_a, s.norm_b, B, n, loss, loss_exact, d_logit_scale);
  CLIP_CUDA_CHECK(cudaGetLastError());
  const float* gr = s.lr;  // [n, B]
  const float* gc = s.lc;  // [n, B]
  GemmEpilogue<float> add;
  add.beta = 1;
  gemm_tn<float, float>(ctx, B, E, n, gc, B, b_own, E, s.da, E);             // dA = Gc^T B_own
  gemm_nn<float, float>(ctx, n, E, B, gr, B, s.b, E, s.da + first * E, E, add);  // dA_own += Gr B
  gemm_tn<float, float>(ctx, B, E, n, gr, B, a_own, E, s.db, E);             // dB = Gr^T A_own
  gemm_nn<float, float>(ctx, n, E, B, gc, B, s.a, E, s.db + first * E, E, add);  // dB_own += Gc A
  detail::through_norm_kernel<E, float><<<dim3(static_cast<unsigned>(B), 2), detail::kLossThreads, 0, stream>>>(
      s.a, s.b, s.da, s.db, s.norm_a, s.norm_b, logit_scale, d_image, d_text);
  CLIP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace clip::cuda
