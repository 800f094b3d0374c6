// bf16 matrix products (ops/gemm_bf16.hpp, gemm.hpp inside a bf16 MatmulPrecisionScope) against
// double-precision loops, and the run-time choice of the instruction set (ops/cpu_features.hpp).
//
// Error model. Rounding an operand to bf16 (8 significant bits, round to nearest) changes it by at
// most u = 2^-8 of its magnitude, so a product of two rounded operands is off by at most
// (2u + u^2) |a||b| and is itself exact in fp32; K such products (and y, when accumulating) summed
// in fp32 add at most (K + 1) 2^-24 of the sum of magnitudes. Hence, for every element,
//   |y - sum_k a_k b_k| <= (2^-7 + 2^-16 + (K + 1) 2^-24) sum_k |a_k||b_k|  (+ (K + 1) 2^-24 |y0|).
// Two sharper checks make sure the rounding really happens, and to nearest: the result equals the
// exact sum of the rounded operands within (K + 1) 2^-24 of its magnitudes, and differs from the
// fp32 product (which the bound alone would also accept).
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "clip/core/bf16.hpp"
#include "clip/ops/cpu_features.hpp"
#include "clip/ops/gemm.hpp"
#include "clip/ops/gemm_bf16.hpp"
#include "clip/ops/matmul_precision.hpp"
#include "messages.hpp"

namespace {

enum class Form { nt, nn, tn, packed_nt };

struct Problem {
  int64_t m, n, k;
  bool accumulate;
  Form form;
  int64_t ldx, ldb, ldy;
  std::vector<float> x, b, y0;

  Problem(int64_t m_, int64_t n_, int64_t k_, bool acc, Form f, uint32_t seed)
      : m(m_), n(n_), k(k_), accumulate(acc), form(f) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    const bool xt = form == Form::tn, bw = form == Form::nt || form == Form::packed_nt;
    ldx = (xt ? m : k) + 3;
    ldb = (bw ? k : n) + 5;
    ldy = n + 2;
    x.resize(size_t((xt ? k : m) * ldx));
    b.resize(size_t((bw ? n : k) * ldb));
    y0.resize(size_t(m * ldy));
    for (float& v : x) v = dist(gen);
    for (float& v : b) v = dist(gen);
    for (float& v : y0) v = dist(gen);
  }
  float xv(int64_t i, int64_t kk) const { return form == Form::tn ? x[size_t(kk * ldx + i)] : x[size_t(i * ldx + kk)]; }
  float bv(int64_t kk, int64_t j) const {
    return form == Form::nt || form == Form::packed_nt ? b[size_t(j * ldb + kk)] : b[size_t(kk * ldb + j)];
  }

  std::vector<float> run_gemm() const {
    std::vector<float> y = y0;
    switch (form) {
      case Form::nt: clip::gemm_nt(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
      case Form::nn: clip::gemm_nn(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
      case Form::tn: clip::gemm_tn(m, n, k, x.data(), ldx, b.data(), ldb, y.data(), ldy, accumulate); break;
      case Form::packed_nt: {
        const auto packed = clip::PackedMatrix::from_nt(b.data(), n, k, ldb);
        clip::gemm_packed(m, x.data(), ldx, packed, y.data(), ldy, accumulate);
        break;
      }
    }
    return y;
  }

  // The tile kernel on emulated tiles (any CPU) or the hardware's (AMX CPUs only).
  template <class TileOps>
  std::vector<float> run_tiles(int threads) const {
    namespace t = clip::detail::gemm_bf16;
    const t::Shape s{m, n, k};
    std::vector<uint16_t> a(size_t(s.a_elements())), bp(size_t(s.b_elements()));
    t::pack_a(x.data(), ldx, form == Form::tn, s, a.data());
    t::pack_b_vnni(b.data(), ldb, form == Form::nt || form == Form::packed_nt, s, bp.data());
    std::vector<float> y = y0;
    t::tile_product<TileOps>(s, a.data(), bp.data(), y.data(), ldy, accumulate, threads);
    return y;
  }

  // Every element within the error model, equal to the exact product of the rounded operands
  // within fp32 summation, and (over the whole matrix) not the fp32 product.
  void check(const std::vector<float>& y, const std::string& what) const {
    int64_t outside_model = 0, off_rounded = 0, differs_from_fp32 = 0;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double y_init = accumulate ? double(y0[size_t(i * ldy + j)]) : 0.0;
        double exact = y_init, rounded = y_init, magnitude = 0, rounded_magnitude = 0;
        float fp32 = accumulate ? y0[size_t(i * ldy + j)] : 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) {
          const double a = xv(i, kk), bb = bv(kk, j);
          const double ar = clip::round_to_bf16(xv(i, kk)), br = clip::round_to_bf16(bv(kk, j));
          exact += a * bb;
          rounded += ar * br;
          magnitude += std::abs(a * bb);
          rounded_magnitude += std::abs(ar * br);
          fp32 += xv(i, kk) * bv(kk, j);
        }
        const double got = y[size_t(i * ldy + j)];
        const double sum_err = double(k + 1) * std::ldexp(1.0, -24);
        const double bound = (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + sum_err) * magnitude + sum_err * std::abs(y_init);
        if (!(std::abs(got - exact) <= bound)) ++outside_model;
        if (!(std::abs(got - rounded) <= sum_err * (rounded_magnitude + std::abs(y_init)))) ++off_rounded;
        if (got != double(fp32)) ++differs_from_fp32;
      }
      for (int64_t j = n; j < ldy; ++j) BOOST_REQUIRE_EQUAL(y[size_t(i * ldy + j)], y0[size_t(i * ldy + j)]);
    }
    BOOST_TEST_CONTEXT(what << " m=" << m << " n=" << n << " k=" << k << " acc=" << accumulate) {
      BOOST_TEST(outside_model == 0);
      BOOST_TEST(off_rounded == 0);
      if (m * n * k >= 64) BOOST_TEST(differs_from_fp32 > 0);
    }
  }
};

const char* form_name(Form f) {
  switch (f) {
    case Form::nt: return "nt";
    case Form::nn: return "nn";
    case Form::tn: return "tn";
    default: return "packed_nt";
  }
}

struct Dims {
  int64_t m, n, k;
};
// Tile edges (16 rows, 32-row blocks, 32 K steps, 16-column panels) and model shapes (ViT-B/32's
// QKV and MLP at batch 1, a text block, a ResNet im2col product).
constexpr Dims edge_dims[] = {{1, 1, 1}, {15, 17, 31}, {16, 16, 32}, {17, 33, 33}, {33, 31, 64}, {50, 100, 97}};
constexpr Dims model_dims[] = {{50, 2304, 768}, {50, 768, 3072}, {77, 512, 512}, {64, 392, 576}};

}  // namespace

BOOST_AUTO_TEST_SUITE(gemm_bf16)

// The products the models call, inside a bf16 scope, on this process's path (CLIP_CPU_ISA picks
// a lower one): every form, edges and model shapes.
BOOST_AUTO_TEST_CASE(scoped_products_within_error_model) {
  BOOST_TEST_MESSAGE("bf16 products on the " << clip::cpu_isa_name(clip::cpu_isa()) << " path");
  clip::MatmulPrecisionScope bf16(clip::Precision::bf16);
  uint32_t seed = 1;
  for (const Dims& d : edge_dims)
    for (Form f : {Form::nt, Form::nn, Form::tn, Form::packed_nt}) {
      const Problem p(d.m, d.n, d.k, seed % 2 == 0, f, seed);
      ++seed;
      p.check(p.run_gemm(), form_name(f));
    }
  for (const Dims& d : model_dims) {
    const Problem p(d.m, d.n, d.k, true, Form::nt, seed++);
    p.check(p.run_gemm(), "model nt");
  }
}

// Outside a scope, and after one ends, the products are fp32 again (bit-identical to no scope).
BOOST_AUTO_TEST_CASE(scope_restores_fp32) {
  const Problem p(20, 30, 40, false, Form::nt, 7);
  const std::vector<float> before = p.run_gemm();
  {
    clip::MatmulPrecisionScope bf16(clip::Precision::bf16);
    BOOST_TEST((clip::matmul_precision() == clip::Precision::bf16));
    {
      clip::MatmulPrecisionScope fp32(clip::Precision::fp32);
      BOOST_TEST((p.run_gemm() == before));
    }
    BOOST_TEST((p.run_gemm() != before));
  }
  BOOST_TEST((p.run_gemm() == before));
}

// The tile kernel's packing and loops on emulated tiles (the instructions as Intel's SDM defines
// them), so they are checked on CPUs without AMX too.
BOOST_AUTO_TEST_CASE(emulated_tiles_within_error_model) {
  namespace t = clip::detail::gemm_bf16;
  uint32_t seed = 100;
  for (const Dims& d : edge_dims)
    for (Form f : {Form::nt, Form::nn, Form::tn}) {
      const Problem p(d.m, d.n, d.k, seed % 2 == 1, f, seed);
      ++seed;
      p.check(p.run_tiles<t::EmulatedTileOps>(1), std::string("emulated ") + form_name(f));
    }
  const Problem p(77, 64, 96, true, Form::nt, seed);
  p.check(p.run_tiles<t::EmulatedTileOps>(1), "emulated text shape");
}

// The hardware tiles, where this process has them: within the error model, and the same bits
// with 1 and 2 threads (each element's tile steps run in an order that depends on K alone). Not
// bit-identical to the emulation: on an Intel Xeon with AMX (2026-12-08) one tdpbf16ps with a
// single K pair gave c + (p0 + p1) in every element, but over several pairs its rounding matched
// none of the SDM's sequential sums, pairs first, a tree or one exact sum (14% to 62% of the
// elements differed in the last bits from each), so the emulation checks the packing and the loops.
BOOST_AUTO_TEST_CASE(amx_tiles_match_emulation) {
#if CLIP_GEMM_HAS_AMX
  namespace t = clip::detail::gemm_bf16;
  if (clip::cpu_isa() != clip::CpuIsa::amx) {
    BOOST_TEST_MESSAGE("SKIP amx_tiles_match_emulation: this process runs bf16 on the "
                       << clip::cpu_isa_name(clip::cpu_isa()) << " path (no AMX, or CLIP_CPU_ISA lowered it)");
    return;
  }
  uint32_t seed = 200;
  for (const Dims& d : edge_dims) {
    const Problem p(d.m, d.n, d.k, seed % 2 == 0, Form::nt, seed);
    ++seed;
    const std::vector<float> one_thread = p.run_tiles<t::AmxTileOps>(1);
    p.check(one_thread, "amx");
    BOOST_TEST((p.run_tiles<t::AmxTileOps>(2) == one_thread), d.m << " x " << d.n << " x " << d.k);
  }
  const Problem p(50, 768, 3072, true, Form::nt, seed);
  p.check(p.run_tiles<t::AmxTileOps>(2), "amx model shape");
#else
  BOOST_TEST_MESSAGE("SKIP amx_tiles_match_emulation: built without the AMX tile path");
#endif
}

// cpuid against the kernel's own reading of it (/proc/cpuinfo flags).
BOOST_AUTO_TEST_CASE(cpuid_matches_proc_cpuinfo) {
  std::ifstream in("/proc/cpuinfo");
  if (!in) {
    BOOST_TEST_MESSAGE("SKIP cpuid_matches_proc_cpuinfo: no /proc/cpuinfo on this system");
    return;
  }
  std::string line, flags;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      flags = " " + line.substr(line.find(':') + 1) + " ";
      break;
    }
  BOOST_REQUIRE(!flags.empty());
  auto has = [&](const char* flag) { return flags.find(std::string(" ") + flag + " ") != std::string::npos; };
  const clip::CpuFeatures f = clip::detect_cpu_features();
  BOOST_TEST(f.avx512f == has("avx512f"));
  BOOST_TEST(f.avx512bf16 == has("avx512_bf16"));
  BOOST_TEST(f.amx_tile == has("amx_tile"));
  BOOST_TEST(f.amx_bf16 == has("amx_bf16"));
  BOOST_TEST_MESSAGE("cpu: avx512f " << f.avx512f << ", avx512_bf16 " << f.avx512bf16 << ", amx_tile " << f.amx_tile
                                     << ", amx_bf16 " << f.amx_bf16 << "; bf16 path "
                                     << clip::cpu_isa_name(clip::cpu_isa()));
}

// The choice: the best the hardware has, lowered by CLIP_CPU_ISA, falling back (with the reason)
// when Linux refuses the tiles; a bad CLIP_CPU_ISA names itself and the valid values.
BOOST_AUTO_TEST_CASE(isa_choice) {
  clip::CpuFeatures amx_cpu;
  amx_cpu.avx512f = amx_cpu.avx512bf16 = amx_cpu.amx_tile = amx_cpu.amx_bf16 = true;
  amx_cpu.os_saves_zmm = amx_cpu.os_saves_tiles = true;
  auto grant = [] { return std::string(); };
  auto refuse = [] { return std::string("refused for the test"); };
  using clip::CpuIsa;

  BOOST_TEST((clip::choose_cpu_isa(amx_cpu, nullptr, grant).isa == CpuIsa::amx));
  BOOST_TEST(clip::choose_cpu_isa(amx_cpu, nullptr, grant).why_lower.empty());
  const auto refused = clip::choose_cpu_isa(amx_cpu, "amx", refuse);
  BOOST_TEST((refused.isa == CpuIsa::avx512bf16));
  BOOST_TEST(refused.why_lower == "refused for the test");
  BOOST_TEST((clip::choose_cpu_isa(amx_cpu, "avx512bf16", refuse).isa == CpuIsa::avx512bf16));
  BOOST_TEST(clip::choose_cpu_isa(amx_cpu, "fp32", refuse).why_lower.empty());
  BOOST_TEST((clip::choose_cpu_isa(amx_cpu, "fp32", refuse).isa == CpuIsa::fp32));

  clip::CpuFeatures tiles_not_saved = amx_cpu;  // an OS that does not save the tile state
  tiles_not_saved.os_saves_tiles = false;
  const auto no_os = clip::choose_cpu_isa(tiles_not_saved, nullptr, grant);
  BOOST_TEST((no_os.isa == CpuIsa::avx512bf16));
  BOOST_TEST(no_os.why_lower.find("no AMX-BF16") != std::string::npos);

  const auto avx2 = clip::choose_cpu_isa(clip::CpuFeatures{}, "amx", grant);
  BOOST_TEST((avx2.isa == CpuIsa::fp32));
  BOOST_TEST(avx2.why_lower.find("neither AMX-BF16 nor AVX512-BF16") != std::string::npos);

  const std::string bad = clip::test::message_of([&] { clip::choose_cpu_isa(amx_cpu, "avx9", grant); });
  for (const char* part : {"avx9", "CLIP_CPU_ISA", "amx, avx512bf16 or fp32"}) BOOST_TEST(bad.find(part) != std::string::npos);
}

BOOST_AUTO_TEST_SUITE_END()
