// Which instructions run the bf16 matrix products on this CPU, decided once per process at run time
// (a binary built on one x86-64 machine runs on another):
//
//   amx         AMX tiles (tdpbf16ps): cpuid leaf 7 AMX-TILE and AMX-BF16, the OS saving the tile
//               state (XCR0 bits 17-18), and Linux granting this process the tile data
//               (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); refused e.g. under a
//               sigaltstack too small for the 8 KiB of tile state, or by a seccomp filter)
//   avx512bf16  cpuid AVX512F and AVX512_BF16 (leaf 7 subleaf 1), the OS saving the zmm state
//               (XCR0 bits 5-7). No vdpbf16ps kernel yet: the GEMM runs these CPUs on the fp32
//               path below (the AVX-512 fp32 GEMM), which gives the same numbers
//   fp32        the fp32 GEMM on operands rounded to bf16: the same numbers as the bf16
//               instructions (a product of two bf16 is exact in fp32), none of their speed
//
// CLIP_CPU_ISA=amx|avx512bf16|fp32 asks for a path; a path the CPU lacks is lowered to the best
// it has. Tests use it to run every path this machine has. When the path is lower than what was
// asked for (or than AMX, asked for nothing), the first bf16 product says why in one line on
// stderr.
//
// Nothing here includes AMX intrinsics: this header is safe for every compiler, nvcc included.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "clip/core/error.hpp"

namespace clip {

// Ordered from the most portable to the fastest.
enum class CpuIsa { fp32, avx512bf16, amx };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::amx: return "amx";
    case CpuIsa::avx512bf16: return "avx512bf16";
    default: return "fp32";
  }
}

// "amx", "avx512bf16" or "fp32" (CLIP_CPU_ISA's values).
inline CpuIsa parse_cpu_isa(std::string_view name) {
  if (name == "amx") return CpuIsa::amx;
  if (name == "avx512bf16") return CpuIsa::avx512bf16;
  if (name == "fp32") return CpuIsa::fp32;
  CLIP_FAIL("unknown CPU instruction set '", name, "' (CLIP_CPU_ISA): use amx, avx512bf16 or fp32");
}

// What cpuid and XCR0 report (all false off x86-64).
struct CpuFeatures {
  bool avx512f = false;
  bool avx512bf16 = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool os_saves_zmm = false;   // XCR0 opmask, ZMM_Hi256, Hi16_ZMM
  bool os_saves_tiles = false; // XCR0 XTILECFG, XTILEDATA
};

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return f;  // OSXSAVE: xgetbv usable
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (uint64_t{hi} << 32) | lo;
  f.os_saves_zmm = (xcr0 & 0xE6u) == 0xE6u;             // SSE, AVX, opmask, ZMM
  f.os_saves_tiles = (xcr0 & (3u << 17)) == (3u << 17);  // XTILECFG, XTILEDATA
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx512f = b & (1u << 16);
  f.amx_bf16 = d & (1u << 22);
  f.amx_tile = d & (1u << 24);
  const unsigned subleaves = a;
  if (subleaves >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = a & (1u << 5);
  }
#endif
  return f;
}

// The best path the hardware and the OS offer, before asking Linux for the tiles.
inline CpuIsa hardware_cpu_isa(const CpuFeatures& f) {
  if (f.amx_tile && f.amx_bf16 && f.os_saves_tiles && f.avx512f && f.os_saves_zmm) return CpuIsa::amx;
  if (f.avx512f && f.avx512bf16 && f.os_saves_zmm) return CpuIsa::avx512bf16;
  return CpuIsa::fp32;
}

// Asks Linux to let this process use the AMX tile data (once per process; threads inherit it).
// Empty when granted, else why not.
inline std::string request_amx_permission() {
#if defined(__x86_64__) && defined(__linux__)
  constexpr int arch_req_xcomp_perm = 0x1023;  // ARCH_REQ_XCOMP_PERM (asm/prctl.h)
  constexpr int xfeature_xtiledata = 18;
  if (syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0) return {};
  return "Linux refused the AMX tile permission (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed)";
#else
  return "AMX needs x86-64 Linux";
#endif
}

struct CpuIsaChoice {
  CpuIsa isa = CpuIsa::fp32;
  std::string why_lower;  // empty, or why the path is below the one asked for (or AMX)
};

// The path for `features`, `requested` (CLIP_CPU_ISA's value, or null for the best), and
// `request_amx` (the permission request; a parameter so tests can refuse it).
template <class RequestAmx>
CpuIsaChoice choose_cpu_isa(const CpuFeatures& features, const char* requested, RequestAmx&& request_amx) {
  const CpuIsa wanted = requested && *requested ? parse_cpu_isa(requested) : CpuIsa::amx;
  const CpuIsa hardware = hardware_cpu_isa(features);
  CpuIsaChoice choice{std::min(wanted, hardware), {}};
  if (hardware < wanted)
    choice.why_lower = hardware == CpuIsa::avx512bf16 ? "this CPU (or its OS) has no AMX-BF16"
                                                      : "this CPU (or its OS) has neither AMX-BF16 nor AVX512-BF16";
  if (choice.isa == CpuIsa::amx) {
    if (std::string refused = request_amx(); !refused.empty()) {
      choice.isa = features.avx512bf16 ? CpuIsa::avx512bf16 : CpuIsa::fp32;
      choice.why_lower = std::move(refused);
    }
  }
  return choice;
}

// This process's path: chosen on first use from cpuid and CLIP_CPU_ISA, with its one line on
// stderr when lower than wanted. A bad CLIP_CPU_ISA throws clip::Error on every call.
inline CpuIsa cpu_isa() {
  static const CpuIsaChoice choice = [] {
    CpuIsaChoice c = choose_cpu_isa(detect_cpu_features(), std::getenv("CLIP_CPU_ISA"), request_amx_permission);
    if (!c.why_lower.empty())
      std::fprintf(stderr, "clip: bf16 products run on the %s path: %s\n", cpu_isa_name(c.isa), c.why_lower.c_str());
    return c;
  }();
  return choice.isa;
}

}  // namespace clip
