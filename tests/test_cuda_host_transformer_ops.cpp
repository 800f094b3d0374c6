// Host side of the CUDA transformer ops (kernels/layernorm.cuh, activation.cuh, embedding.cuh),
// checked on the CPU with g++: the scalar math the kernels share with the CPU
// (include/clip/ops/quick_gelu_math.hpp) against clip's CPU ops, and the kernels' reduction and
// index schemes replayed on the host in the kernels' order against the CPU ops.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <vector>

#include "clip/models/vision_transformer.hpp"
#include "clip/ops/activation.hpp"
#include "clip/ops/embedding.hpp"
#include "clip/ops/layernorm.hpp"
#include "clip/ops/quick_gelu_math.hpp"
#include "numeric.hpp"

namespace {

using clip::test::random_vector;  // (n, seed, scale, mean)

// |a - b| in units of the float spacing at max(|a|, |b|) (0 when equal).
double ulps(float a, float b) {
  if (a == b) return 0.0;
  const float m = std::max(std::fabs(a), std::fabs(b));
  const float spacing = std::nextafter(m, INFINITY) - m;
  return std::fabs(static_cast<double>(a) - b) / std::max(spacing, std::numeric_limits<float>::denorm_min());
}

// The warp's butterfly reduction (warp_sum in kernels/layernorm.cuh): lane l adds lane l^o for
// o = 16, 8, 4, 2, 1. Every lane ends with the same bits; lane 0's are returned.
float warp_sum_emulated(std::vector<float> lanes) {
  for (int o = 16; o > 0; o >>= 1) {
    std::vector<float> next(32);
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ o];
    lanes = next;
  }
  for (int l = 1; l < 32; ++l) BOOST_REQUIRE(lanes[l] == lanes[0]);
  return lanes[0];
}

// layernorm_forward_kernel<C, VW> replayed on one row: lane l owns vectors l, l + 32, ... of VW
// elements and adds them in that order; the lane sums meet in the butterfly.
struct RowStats {
  float mean, rstd;
};
RowStats kernel_row_stats(const float* x, int C, int VW) {
  const int NV = (C / VW + 31) / 32;
  std::vector<float> sum(32, 0.0f), sq(32, 0.0f);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < NV; ++i) {
      const int j = (l + 32 * i) * VW;
      if (j < C)
        for (int e = 0; e < VW; ++e) sum[l] += x[j + e];
    }
  const float m = clip::layernorm_mean(warp_sum_emulated(sum), C);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < NV; ++i) {
      const int j = (l + 32 * i) * VW;
      if (j < C)
        for (int e = 0; e < VW; ++e) sq[l] += (x[j + e] - m) * (x[j + e] - m);
    }
  return {m, clip::layernorm_rstd(warp_sum_emulated(sq), C)};
}

template <int C>
void check_layernorm_rows(int VW, int64_t rows, uint32_t seed) {
  const auto in = random_vector(rows * C, seed, 2.0f, 0.5f);
  const auto w = random_vector(C, seed + 1, 0.2f, 1.0f);
  const auto b = random_vector(C, seed + 2, 0.2f);
  const auto dy = random_vector(rows * C, seed + 3);
  const auto res = random_vector(rows * C, seed + 4);
  std::vector<float> out(rows * C), mean(rows), rstd(rows);
  clip::layernorm_forward<C>(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), rows);
  std::vector<float> dx(rows * C), dw(C, 0.0f), db(C, 0.0f);
  clip::layernorm_backward<C>(dx.data(), dw.data(), db.data(), dy.data(), in.data(), mean.data(), rstd.data(),
                              w.data(), rows, res.data());
  double worst_mean = 0, worst_rstd = 0, worst_out = 0, worst_dx = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in.data() + r * C;
    const RowStats s = kernel_row_stats(x, C, VW);
    // The statistics differ from the CPU's only by summation order. The CPU's `omp simd` sum is
    // serial where the loop is not vectorised (the sanitizer builds): its rounding errors then
    // grow like sqrt(C) ulps of a running sum up to sum |x|. In units of that scale, a lost or
    // repeated element, off by about |x| / C, would score 200 (C = 768) to 20,000 (C = 36).
    double abs_sum = 0;
    for (int j = 0; j < C; ++j) abs_sum += std::fabs(x[j]);
    const double order_scale = 4.0 * std::sqrt(double(C)) * 0x1p-24 * abs_sum / C;
    worst_mean = std::max(worst_mean, std::fabs(double(s.mean) - mean[r]) / order_scale);
    worst_rstd = std::max(worst_rstd, std::fabs(double(s.rstd) - rstd[r]) / rstd[r]);
    // The element formulas with the CPU's statistics give the CPU's values (FMA contraction aside).
    float sum_g = 0, sum_gx = 0;
    for (int j = 0; j < C; ++j) {
      const float g = dy[r * C + j] * w[j];
      sum_g += g;
      sum_gx += g * ((x[j] - mean[r]) * rstd[r]);
    }
    for (int j = 0; j < C; ++j) {
      const float y = (x[j] - mean[r]) * rstd[r] * w[j] + b[j];
      worst_out = std::max(worst_out, std::fabs(double(y) - out[r * C + j]));
      const float d = res[r * C + j] + clip::layernorm_backward_element(dy[r * C + j], x[j], w[j], mean[r], rstd[r],
                                                                        sum_g / C, sum_gx / C);
      worst_dx = std::max(worst_dx, std::fabs(double(d) - dx[r * C + j]));
    }
  }
  std::cout << "layernorm C=" << C << " VW=" << VW << " rows=" << rows << ": mean err / order scale " << worst_mean
            << ", rstd rel err " << worst_rstd << ", out err " << worst_out << ", d_in err " << worst_dx << "\n";
  BOOST_TEST(worst_mean <= 1.0);  // in units of order_scale
  BOOST_TEST(worst_rstd <= 2e-6);
  BOOST_TEST(worst_out <= 1e-5);
  BOOST_TEST(worst_dx <= 1e-5);
}

// The statistics' final step: the same sums give the CPU's bits.
float cpu_rstd(float sq, int C) { return 1.0f / std::sqrt(sq / C + clip::layernorm_eps); }

struct PatchA {  // 3 x 3 patches of 8 pixels
  static constexpr const char* name = "patch-a";
  static constexpr int embed_dim = 16, image_resolution = 24, vision_layers = 1, vision_width = 64,
                       vision_patch_size = 8, context_length = 8, vocab_size = 50, transformer_width = 32,
                       transformer_heads = 2, transformer_layers = 1;
};
struct PatchB {  // 7 x 7 patches of 4 pixels
  static constexpr const char* name = "patch-b";
  static constexpr int embed_dim = 16, image_resolution = 28, vision_layers = 1, vision_width = 64,
                       vision_patch_size = 4, context_length = 8, vocab_size = 50, transformer_width = 32,
                       transformer_heads = 2, transformer_layers = 1;
};

template <class Cfg>
int64_t check_patch_index(int64_t batch) {
  using VT = clip::VisionTransformer<Cfg>;
  constexpr int R = VT::R, Patch = VT::patch, N = VT::N, P = VT::P;
  std::vector<float> images(static_cast<size_t>(batch * 3 * R * R));
  for (size_t i = 0; i < images.size(); ++i) images[i] = static_cast<float>(i);  // each pixel its own index
  std::vector<float> patches(static_cast<size_t>(batch * N * P));
  VT::im2col(patches.data(), images.data(), batch);
  int64_t mismatches = 0;
  for (int64_t row = 0; row < batch * N; ++row)
    for (int k = 0; k < P; ++k)
      if (clip::patch_pixel_index<R, Patch>(row, k) != static_cast<int64_t>(patches[row * P + k])) ++mismatches;
  return mismatches;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_host_transformer_ops)

// QuickGELU and its derivative (the kernels' scalar math) against the CPU ops (Eigen's vectorised
// exp) on 400001 values in [-20, 20] plus the extremes.
BOOST_AUTO_TEST_CASE(quick_gelu_math_matches_the_cpu_op) {
  std::vector<float> x;
  for (int i = -200000; i <= 200000; ++i) x.push_back(i * 1e-4f);
  for (float v : {-1e30f, -100.0f, -60.0f, -52.0f, -51.0f, 30.0f, 100.0f, 1e30f, 0.0f, -0.0f, 1e-30f, -1e-30f})
    x.push_back(v);
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> y(n), ones(n, 1.0f), d(n);
  clip::quick_gelu_forward(y.data(), x.data(), n);
  // quick_gelu_backward with d_out = 1 gives the derivative itself; rows of 1 column.
  clip::quick_gelu_backward<1>(d.data(), nullptr, ones.data(), x.data(), n);
  double worst_y = 0, worst_d = 0, worst_abs_y = 0, worst_abs_d = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float gy = clip::quick_gelu(x[i]), gd = clip::quick_gelu_derivative(x[i]);
    BOOST_REQUIRE(std::isfinite(gy) && std::isfinite(gd));
    worst_abs_y = std::max(worst_abs_y, std::fabs(double(gy) - y[i]));
    worst_abs_d = std::max(worst_abs_d, std::fabs(double(gd) - d[i]));
    if (std::fabs(y[i]) > 1e-30f) worst_y = std::max(worst_y, ulps(gy, y[i]));
    if (std::fabs(d[i]) > 1e-6f) worst_d = std::max(worst_d, ulps(gd, d[i]));
  }
  std::cout << "quick_gelu over " << n << " values: forward max " << worst_y << " ulp (abs " << worst_abs_y
            << "), derivative max " << worst_d << " ulp (abs " << worst_abs_d << ")\n";
  BOOST_TEST(worst_y <= 8.0);
  BOOST_TEST(worst_abs_d <= 2e-6);  // |derivative| <= 1.1; cancellation near its zero at x ~ -1.5
  // Saturation as the CPU: 0 far left, x far right, derivative 0 and 1.
  BOOST_TEST(clip::quick_gelu(-1e30f) == 0.0f);
  BOOST_TEST(clip::quick_gelu(1e30f) == 1e30f);
  BOOST_TEST(clip::quick_gelu_derivative(-100.0f) == 0.0f);
  BOOST_TEST(clip::quick_gelu_derivative(100.0f) == 1.0f);
}

// layernorm_rstd / layernorm_mean are the CPU's final step exactly (same sums -> same bits).
BOOST_AUTO_TEST_CASE(row_statistics_final_step_is_the_cpu_formula) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(0.0f, 1e4f);
  int64_t differ = 0;
  for (int i = 0; i < 100000; ++i) {
    const float s = u(gen);
    const int C = 1 + i % 1024;
    if (clip::layernorm_rstd(s, C) != cpu_rstd(s, C)) ++differ;
    if (clip::layernorm_mean(s, C) != s / C) ++differ;
  }
  BOOST_TEST(differ == 0);
}

// The kernel's per-lane + butterfly reduction order, replayed on the host, against
// layernorm_forward's mean / rstd; forward and backward element formulas against the CPU ops.
// Widths: vectorised (float4: VW 4, bf16x8: VW 8) and scalar, C below, at and above 32 lanes.
BOOST_AUTO_TEST_CASE(layernorm_row_statistics_in_kernel_order) {
  check_layernorm_rows<768>(4, 5, 11);
  check_layernorm_rows<768>(8, 3, 12);
  check_layernorm_rows<512>(1, 4, 13);
  check_layernorm_rows<36>(4, 7, 14);
  check_layernorm_rows<36>(1, 1, 15);
  check_layernorm_rows<20>(1, 3, 16);
  check_layernorm_rows<1024>(4, 2, 17);
}

// patch_pixel_index (patch_im2col's source index) against VisionTransformer::im2col.
BOOST_AUTO_TEST_CASE(patch_index_matches_im2col) {
  BOOST_TEST(check_patch_index<PatchA>(1) == 0);
  BOOST_TEST(check_patch_index<PatchA>(3) == 0);
  BOOST_TEST(check_patch_index<PatchB>(2) == 0);
}

// token_embedding_backward's deterministic scheme replayed on the host: the first row holding an
// id sums, from d_wte[id], every row with that id in row order; d_wpe[t] adds b in order. It gives
// embedding_backward's bits.
BOOST_AUTO_TEST_CASE(token_embedding_backward_scheme_gives_the_cpu_bits) {
  constexpr int C = 24, V = 9;
  for (const auto [batch, context, tokens] : {std::array<int64_t, 3>{1, 8, 8}, {3, 8, 5}, {5, 10, 7}}) {
    std::mt19937 gen(static_cast<uint32_t>(batch * 100 + tokens));
    std::uniform_int_distribution<int32_t> id(0, V - 1);
    std::vector<int32_t> ids(batch * context);
    for (auto& i : ids) i = id(gen);
    const auto d_x = random_vector(batch * tokens * C, 21);
    const auto wte0 = random_vector(V * C, 22), wpe0 = random_vector(context * C, 23);
    auto cpu_wte = wte0, cpu_wpe = wpe0;
    clip::embedding_backward<C>(cpu_wte.data(), cpu_wpe.data(), d_x.data(), ids.data(), batch, context, tokens);
    auto wte = wte0, wpe = wpe0;
    const int64_t rows = batch * tokens;
    auto id_of = [&](int64_t r) { return ids[(r / tokens) * context + r % tokens]; };
    for (int64_t r = 0; r < rows; ++r) {  // block r
      bool leader = true;
      for (int64_t q = 0; q < r; ++q) leader = leader && id_of(q) != id_of(r);
      if (!leader) continue;
      for (int j = 0; j < C; ++j) {
        float acc = wte[id_of(r) * C + j];
        for (int64_t q = r; q < rows; ++q)
          if (id_of(q) == id_of(r)) acc += d_x[q * C + j];
        wte[id_of(r) * C + j] = acc;
      }
    }
    for (int64_t i = 0; i < tokens * C; ++i) {
      float acc = wpe[i];
      for (int64_t b = 0; b < batch; ++b) acc += d_x[b * tokens * C + i];
      wpe[i] = acc;
    }
    BOOST_TEST(wte == cpu_wte);
    BOOST_TEST(wpe == cpu_wpe);
  }
}

BOOST_AUTO_TEST_SUITE_END()
