// Matrix products on cuBLASLt with the row-major interface of include/clip/ops/gemm.hpp:
//
//   gemm_nt: Y[m, n] = alpha X[m, k] W[n, k]^T + beta C[m, n] (+ bias[n])   (nn.Linear, W [out, in])
//   gemm_nn: Y[m, n] = alpha X[m, k] P[k, n]   + beta C[m, n] (+ bias[n])   (projections, d_in = dY W)
//   gemm_tn: Y[m, n] = alpha X[k, m]^T P[k, n] + beta C[m, n] (+ bias[n])   (weight gradients:
//            dW[out, in] += dY^T X is gemm_tn(out, in, rows, dY, out, X, in, dW, in, {.beta = 1}))
//
// Every matrix has a row stride (ld, in elements) so column slices can be addressed. C is the
// matrix beta scales: null means Y itself (accumulate in place); another pointer is a residual
// added in the same pass. The bias is added by cuBLASLt's epilogue, not by a separate kernel
// (unless it is less than 16-byte aligned: see bias_epilogue_alignment).
// Y must not overlap X or W/P; C may be Y (with the same stride) or a separate matrix.
//
// Precision: products accumulate in fp32 (CUBLAS_COMPUTE_32F; never TF32, so fp32 mode matches the
// CPU at ~1e-6). Supported (TA, TY): (float, float), (bf16, bf16), and (bf16, float) for fp32
// gradients of bf16 activations. alpha and beta are float.
//
// Plans: the row-major request is turned into a column-major call (clip/cuda/gemm_plan.hpp, tested
// on the CPU); the matmul descriptor, the four matrix layouts and the algorithm chosen by
// cublasLtMatmulAlgoGetHeuristic are built on the first product of a shape and cached in
// ctx.plans() under a key that includes the pointer alignments (the heuristic's kernels may
// assume them). Batch sizes change rows only, so a training run builds a handful of plans.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/cuda/gemm_plan.hpp"
#include "kernels/check.cuh"
#include "kernels/context.cuh"
#include "kernels/storage.cuh"

namespace clip::cuda {

template <class TY>
struct GemmEpilogue {
  float alpha = 1, beta = 0;
  const TY* c = nullptr;    // the matrix beta scales [m, n]; null: y itself
  int64_t ldc = 0;          // its row stride; 0: ldy
  const TY* bias = nullptr; // [n], added to every row; null: none
};

template <class TA, class TY>
inline constexpr bool is_supported_gemm = (std::is_same_v<TA, float> && std::is_same_v<TY, float>) ||
                                          (std::is_same_v<TA, bf16> && std::is_same_v<TY, bf16>) ||
                                          (std::is_same_v<TA, bf16> && std::is_same_v<TY, float>);

namespace detail {

// cuBLASLt's bias epilogue needs a bias at least 16-byte aligned (marian-nmt reports alignment
// errors on A100 below that, and the heuristic is not told the bias's alignment); a less aligned
// bias is added by this kernel after the product instead: y[i, j] += bias[j] (an extra rounding
// of y in bf16).
inline constexpr int32_t bias_epilogue_alignment = 16;

template <class TY>
__global__ void add_bias_kernel(TY* y, int64_t ldy, const TY* bias, int64_t m, int64_t n) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    TY& v = y[r * ldy + c];
    v = from_float<TY>(to_float(v) + to_float(bias[c]));
  }
}

// Builds the cuBLASLt objects for one key: descriptor (fp32 compute and scale, transposes,
// epilogue), layouts, and the heuristic's best algorithm for the context's workspace.
inline std::unique_ptr<GemmPlan> build_gemm_plan(Context& ctx, const GemmKey& key, const ColumnMajorGemm& g,
                                                 const void* bias) {
  auto plan = std::make_unique<GemmPlan>();
  const auto a_type = static_cast<cudaDataType_t>(key.a_type);
  const auto y_type = static_cast<cudaDataType_t>(key.y_type);
  CLIP_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t transa = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t transb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  CLIP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof transa));
  CLIP_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof transb));
  if (key.bias) {
    const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const int32_t bias_type = y_type;
    CLIP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
    CLIP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    // The heuristic reads the bias pointer's alignment (it does not dereference it).
    CLIP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  }
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  CLIP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, a_type, u(g.a_rows), u(g.a_cols), g.lda));
  CLIP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, a_type, u(g.b_rows), u(g.b_cols), g.ldb));
  CLIP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, y_type, u(g.m), u(g.n), g.ldc));
  CLIP_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, y_type, u(g.m), u(g.n), g.ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  CLIP_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  {
    const uint64_t workspace = ctx.workspace_bytes();
    // Column-major A is the row-major second operand (W or P), B is X, C is C, D is Y.
    const uint32_t align_a = static_cast<uint32_t>(key.align_b), align_b = static_cast<uint32_t>(key.align_x);
    const uint32_t align_c = static_cast<uint32_t>(key.align_c), align_d = static_cast<uint32_t>(key.align_y);
    status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                  sizeof workspace);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                    sizeof align_a);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                    sizeof align_b);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                    sizeof align_c);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                                    sizeof align_d);
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulAlgoGetHeuristic(ctx.lt(), plan->desc, plan->a, plan->b, plan->c, plan->d, pref, 1,
                                              &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  CLIP_CUBLAS_CHECK(status);
  CLIP_CHECK(found > 0, "cuBLASLt found no algorithm for the product m = ", key.m, ", n = ", key.n, ", k = ", key.k,
             " (op ", static_cast<int>(key.op), ", strides ", key.ldx, "/", key.ldb, "/", key.ldy,
             ", alignments ", key.align_x, "/", key.align_b, "/", key.align_y, ")");
  plan->algo = result.algo;
  plan->workspace_bytes = result.workspaceSize;
  return plan;
}

template <class TA, class TY>
void gemm(Context& ctx, GemmOp op, int64_t m, int64_t n, int64_t k, const TA* x, int64_t ldx, const TA* b, int64_t ldb,
          TY* y, int64_t ldy, const GemmEpilogue<TY>& e) {
  static_assert(is_supported_gemm<TA, TY>,
                "the supported GEMM types (inputs, output) are (float, float), (bf16, bf16) and (bf16, float)");
  if (m == 0 || n == 0) return;
  CLIP_CHECK(k > 0, "a GEMM needs a positive inner size k, got ", k);
  CLIP_CHECK(x && b && y, "a GEMM operand is null");
  // beta = 0: C is not read; use Y so that every beta = 0 product of a shape shares one plan.
  const TY* c = e.beta != 0 && e.c ? e.c : y;
  const int64_t ldc = e.beta != 0 && e.c && e.ldc ? e.ldc : ldy;
  CLIP_CHECK(c != y || ldc == ldy, "C is Y itself but with a different row stride (", ldc, " vs ", ldy, ")");
  const ColumnMajorGemm g = to_column_major(op, m, n, k, ldx, ldb, ldy, ldc);
  const TY* epilogue_bias = pointer_alignment(e.bias) >= bias_epilogue_alignment ? e.bias : nullptr;

  GemmKey key;
  key.op = op;
  key.m = m;
  key.n = n;
  key.k = k;
  key.ldx = ldx;
  key.ldb = ldb;
  key.ldy = ldy;
  key.ldc = ldc;
  key.a_type = static_cast<int32_t>(cuda_type<TA>);
  key.y_type = static_cast<int32_t>(cuda_type<TY>);
  key.bias = epilogue_bias != nullptr;
  key.align_x = pointer_alignment(x);
  key.align_b = pointer_alignment(b);
  key.align_y = pointer_alignment(y);
  key.align_c = pointer_alignment(c);
  key.align_bias = pointer_alignment(epilogue_bias);

  GemmPlan* plan = ctx.plans().find(key);
  if (!plan) plan = &ctx.plans().insert(key, build_gemm_plan(ctx, key, g, epilogue_bias));
  if (epilogue_bias) {
    const void* bias = epilogue_bias;
    CLIP_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  }
  const float alpha = e.alpha, beta = e.beta;
  // Column-major: D = op(A) op(B) with A the second row-major operand and B = X (gemm_plan.hpp).
  CLIP_CUBLAS_CHECK(cublasLtMatmul(ctx.lt(), plan->desc, &alpha, b, plan->a, x, plan->b, &beta, c, plan->c, y,
                                   plan->d, &plan->algo, ctx.workspace(), plan->workspace_bytes, ctx.stream()));
  if (e.bias && !epilogue_bias) {
    const int64_t blocks = std::min<int64_t>((m * n + 255) / 256, 4096);
    add_bias_kernel<TY><<<static_cast<unsigned>(blocks), 256, 0, ctx.stream()>>>(y, ldy, e.bias, m, n);
    CLIP_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace detail

// Y[m, n] = alpha X[m, k] W[n, k]^T + beta C (+ bias). Strides: ldx >= k, ldw >= k, ldy >= n.
template <class TA, class TY>
void gemm_nt(Context& ctx, int64_t m, int64_t n, int64_t k, const TA* x, int64_t ldx, const TA* w, int64_t ldw, TY* y,
             int64_t ldy, const GemmEpilogue<TY>& e = {}) {
  detail::gemm(ctx, GemmOp::nt, m, n, k, x, ldx, w, ldw, y, ldy, e);
}

// Y[m, n] = alpha X[m, k] P[k, n] + beta C (+ bias). Strides: ldx >= k, ldp >= n, ldy >= n.
template <class TA, class TY>
void gemm_nn(Context& ctx, int64_t m, int64_t n, int64_t k, const TA* x, int64_t ldx, const TA* p, int64_t ldp, TY* y,
             int64_t ldy, const GemmEpilogue<TY>& e = {}) {
  detail::gemm(ctx, GemmOp::nn, m, n, k, x, ldx, p, ldp, y, ldy, e);
}

// Y[m, n] = alpha X[k, m]^T P[k, n] + beta C (+ bias). Strides: ldx >= m, ldp >= n, ldy >= n.
template <class TA, class TY>
void gemm_tn(Context& ctx, int64_t m, int64_t n, int64_t k, const TA* x, int64_t ldx, const TA* p, int64_t ldp, TY* y,
             int64_t ldy, const GemmEpilogue<TY>& e = {}) {
  detail::gemm(ctx, GemmOp::tn, m, n, k, x, ldx, p, ldp, y, ldy, e);
}

}  // namespace clip::cuda
