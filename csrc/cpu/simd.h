// A thin fp32 SIMD vector for the CPU kernels, compiled once per ISA level.
//
// Each CPU kernel source is compiled several times (see CMakeLists.txt, GK_CPU_ISAS) with the
// flags of one ISA level; this header picks the widest implementation the flags allow:
//   AVX-512 (16 lanes, with AVX512-BF16 conversions), AVX2+FMA+F16C (8 lanes),
//   NEON (4 lanes), and a scalar fallback for the x86-64 baseline.
// Loads and stores convert fp16/bf16 <-> fp32 with the same rounding as csrc/core/numeric.h
// (nearest even, NaN kept quiet), so every ISA level gives bit-identical conversions.
#pragma once
#include <cstdint>
#include <cstring>
#include "core/numeric.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace gk::cpu {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define GK_SIMD_AVX512 1
struct VecF {
  static constexpr int kWidth = 16;
  __m512 v;
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const fp16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static VecF load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(fp16_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(bf16_t* p) const {
    // integer round-to-nearest-even rather than VCVTNEPS2BF16, which flushes fp32 denormals to
    // zero: every ISA level and the GPU must round alike
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float reduce_add(VecF a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(VecF a) { return _mm512_reduce_max_ps(a.v); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GK_SIMD_AVX2 1
struct VecF {
  static constexpr int kWidth = 8;
  __m256 v;
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const fp16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static VecF load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(fp16_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(bf16_t* p) const {
    // round to nearest even on the integer bits; NaN lanes keep their top bits and are made quiet
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, nan);
    // pack the low 16 bits of the 8 lanes
    const __m256i packed = _mm256_packus_epi32(r, r);  // values are < 65536, no saturation
    const __m128i lo = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), lo);
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float reduce_add(VecF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(VecF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#else
// Portable fallback (x86-64 baseline, NEON through the compiler's auto-vectoriser): a small
// array the compiler keeps in registers.
#define GK_SIMD_PORTABLE 1
struct VecF {
  static constexpr int kWidth = 4;
  float v[kWidth];
  static VecF zero() { return set1(0.f); }
  static VecF set1(float x) { VecF r; for (float& e : r.v) e = x; return r; }
  template <class T> static VecF load(const T* p) { VecF r; for (int i = 0; i < kWidth; ++i) r.v[i] = to_float(p[i]); return r; }
  template <class T> void store(T* p) const { for (int i = 0; i < kWidth; ++i) p[i] = from_float<T>(v[i]); }
};
inline VecF operator+(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] += b.v[i]; return a; }
inline VecF operator*(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] *= b.v[i]; return a; }
// a*b+c without std::fma: the x86-64 baseline has no FMA unit and std::fma would be a libm call
inline VecF fmadd(VecF a, VecF b, VecF c) { for (int i = 0; i < VecF::kWidth; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i]; return c; }
inline VecF max(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
inline float reduce_add(VecF a) { float s = 0.f; for (float e : a.v) s += e; return s; }
inline float reduce_max(VecF a) { float s = a.v[0]; for (float e : a.v) s = e > s ? e : s; return s; }
#endif

}  // namespace gk::cpu
