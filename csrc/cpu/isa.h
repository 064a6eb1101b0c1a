// Run-time choice of the CPU ISA level. Every CPU kernel source is compiled once per level into
// namespace gk::cpu::<level> (see CMakeLists.txt); GK_CPU_DISPATCH calls the version for the
// level chosen at import from CPUID, or the lower level forced by the environment variable
// GK_CPU_ISA=baseline|avx2|avx512 (so the tests can exercise every level on one machine).
#pragma once
#include <string>

namespace gk::cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

// The best level this CPU and OS support (x86: AVX/AVX-512 state enabled in XCR0).
Isa detect_isa();
// The level in use: detect_isa(), lowered by GK_CPU_ISA if set. Throws std::invalid_argument
// for an unknown name or a level the CPU lacks. Re-read on each call to set_isa_from_env().
Isa active_isa();
void set_isa_from_env();
const char* isa_name(Isa isa);
// The levels this build compiled kernels for, e.g. "baseline,avx2,avx512".
std::string compiled_isas();

}  // namespace gk::cpu

// Calls gk::cpu::<level>::fn<targs>(args...) for the active level.
#if defined(__x86_64__) || defined(_M_X64)
#define GK_CPU_DISPATCH(fn, ...)                                                         \
  do {                                                                                   \
    switch (::gk::cpu::active_isa()) {                                                   \
      case ::gk::cpu::Isa::kAvx512: ::gk::cpu::avx512::fn(__VA_ARGS__); break;           \
      case ::gk::cpu::Isa::kAvx2: ::gk::cpu::avx2::fn(__VA_ARGS__); break;               \
      default: ::gk::cpu::baseline::fn(__VA_ARGS__); break;                              \
    }                                                                                    \
  } while (0)
#define GK_CPU_FOR_EACH_ISA(X) X(baseline) X(avx2) X(avx512)
#else
#define GK_CPU_DISPATCH(fn, ...) ::gk::cpu::neon::fn(__VA_ARGS__)
#define GK_CPU_FOR_EACH_ISA(X) X(neon)
#endif
