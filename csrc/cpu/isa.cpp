// CPUID-based ISA detection for the CPU kernel dispatch (see isa.h).
#include "cpu/isa.h"
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace gk::cpu {
namespace {
Isa g_active = Isa::kBaseline;
bool g_initialised = false;

#if defined(__x86_64__) || defined(_M_X64)
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif
}  // namespace

Isa detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kBaseline;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return Isa::kBaseline;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6, zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (!ymm_state) return Isa::kBaseline;
  unsigned a7, b7, c7, d7;
  __cpuid_count(7, 0, a7, b7, c7, d7);
  unsigned a71 = 0, b71, c71, d71;
  __cpuid_count(7, 1, a71, b71, c71, d71);
  const bool avx2 = b7 & (1u << 5);
  const bool avx512f = b7 & (1u << 16), avx512dq = b7 & (1u << 17), avx512bw = b7 & (1u << 30),
             avx512vl = b7 & (1u << 31), avx512bf16 = a71 & (1u << 5);
  if (zmm_state && avx512f && avx512dq && avx512bw && avx512vl && avx512bf16 && avx2 && fma && f16c)
    return Isa::kAvx512;
  if (avx2 && fma && f16c) return Isa::kAvx2;
  return Isa::kBaseline;
#else
  return Isa::kNeon;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
  }
  return "unknown";
}

std::string compiled_isas() {
  std::string s;
#define GK_APPEND_ISA(ns) s += (s.empty() ? "" : ","), s += #ns;
  GK_CPU_FOR_EACH_ISA(GK_APPEND_ISA)
#undef GK_APPEND_ISA
  return s;
}

void set_isa_from_env() {
  const Isa best = detect_isa();
  Isa chosen = best;
  if (const char* env = std::getenv("GK_CPU_ISA"); env && *env) {
    Isa want;
    if (!std::strcmp(env, "baseline")) want = Isa::kBaseline;
    else if (!std::strcmp(env, "avx2")) want = Isa::kAvx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::kAvx512;
    else if (!std::strcmp(env, "neon")) want = Isa::kNeon;
    else throw std::invalid_argument(std::string("GK_CPU_ISA: unknown level '") + env + "' (expected baseline, avx2, avx512 or neon)");
    const bool arm = best == Isa::kNeon;
    if (arm != (want == Isa::kNeon) || static_cast<int>(want) > static_cast<int>(best))
      throw std::invalid_argument(std::string("GK_CPU_ISA: this CPU does not support '") + env + "' (best: " + isa_name(best) + ")");
    chosen = want;
  }
  g_active = chosen;
  g_initialised = true;
}

Isa active_isa() {
  if (!g_initialised) set_isa_from_env();
  return g_active;
}

}  // namespace gk::cpu
