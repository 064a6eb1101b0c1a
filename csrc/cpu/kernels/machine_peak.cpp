// Machine peak probes for the benchmarks: fp32 FMA throughput and (where the ISA has it) bf16
// dot-product throughput, measured with independent accumulator chains long enough to hide
// the instruction latency (latency 4 x 2 ports -> at least 8 chains; 12 used).
// Compiled once per ISA level like every CPU kernel; the bench reports the active level's peak.
#include <omp.h>

#include <chrono>

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {
constexpr int kChains = 12;

double run_parallel(int num_threads, int64_t iters, double flops_per_iter, float (*body)(int64_t)) {
  float sink = 0.f;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(num_threads) reduction(+ : sink)
  sink += body(iters);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // `sink` keeps the chains alive; it is never 12345 for random-free inputs, but the compiler
  // cannot know that.
  if (sink == 12345.f) return 0.0;
  return flops_per_iter * double(iters) * num_threads / s / 1e9;
}

float fma_chains(int64_t iters) {
  VecF acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = VecF::set1(0.001f * float(c));
  const VecF a = VecF::set1(0.999999f), b = VecF::set1(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = fmadd(acc[c], a, b);
  VecF s = acc[0];
  for (int c = 1; c < kChains; ++c) s = s + acc[c];
  return reduce_add(s);
}

#if defined(GK_SIMD_AVX512)
float bf16_dot_chains(int64_t iters) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * float(c));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}
#endif
}  // namespace

void peak_gflops(PeakKind kind, int num_threads, int64_t iters, double* gflops) {
  if (kind == PeakKind::kFma) {
    // one fmadd = 2 flops per lane
    *gflops = run_parallel(num_threads, iters, 2.0 * VecF::kWidth * kChains, fma_chains);
    return;
  }
#if defined(GK_SIMD_AVX512)
  // vdpbf16ps: 32 bf16 products summed pairwise into 16 fp32 lanes = 64 flops
  *gflops = run_parallel(num_threads, iters, 64.0 * kChains, bf16_dot_chains);
#else
  *gflops = 0.0;  // no bf16 dot-product instruction at this ISA level
#endif
}

}  // namespace gk::cpu::GK_CPU_ISA_NS
