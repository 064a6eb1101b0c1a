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
inline void reduce_add4(const VecF (&a)[4], float* out) {
  for (int j = 0; j < 4; ++j) out[j] = reduce_add(a[j]);
}
inline float reduce_max(VecF a) { return _mm512_reduce_max_ps(a.v); }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm512_abs_ps(a.v)}; }
// a < b ? x : y per lane (y where either of a, b is NaN).
inline VecF select_lt(VecF a, VecF b, VecF x, VecF y) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), y.v, x.v)};
}
inline VecF round_nearest(VecF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// x * 2^n for integral n with |n| <= 127.
inline VecF scale_pow2(VecF x, VecF n) { return {_mm512_scalef_ps(x.v, n.v)}; }
// The first n < kWidth lanes of p (the others 0), and their store: head-dim tails.
inline VecF load_first(const float* p, int n) { return {_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p)}; }
inline VecF load_first(const fp16_t* p, int n) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p))};
}
inline VecF load_first(const bf16_t* p, int n) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
template <class T> inline void store_first(VecF x, T* p, int n) {
  alignas(64) T tmp[VecF::kWidth];
  x.store(tmp);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}
template <> inline void store_first(VecF x, float* p, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), x.v); }

// bf16 dot products (AVX512-BF16 VDPBF16PS): `a` and `b` hold 16 pairs of bf16; lane l of the
// result is acc[l] + a[2l] * b[2l] + a[2l+1] * b[2l+1], with fp32 accumulation. Like the
// instruction, treats bf16 denormal inputs as zero.
struct VecBF16Pairs {
  __m512i v;
  static VecBF16Pairs load(const void* p) { return {_mm512_loadu_si512(p)}; }
  // One pair (32 bits) repeated in every lane.
  static VecBF16Pairs broadcast(const void* pair) {
    uint32_t u;
    std::memcpy(&u, pair, 4);
    return {_mm512_set1_epi32(int(u))};
  }
  // Lane l = (bf16(lo[l]), bf16(hi[l])), rounded to nearest even (denormals flushed).
  static VecBF16Pairs interleave(VecF lo, VecF hi) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi.v, lo.v);  // lo in words 0..15, hi in 16..31
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return {_mm512_permutexvar_epi16(idx, both)};
  }
  void store(void* p) const { _mm512_storeu_si512(p, v); }
};
inline VecF dot_bf16_pairs(VecBF16Pairs a, VecBF16Pairs b, VecF acc) {
  return {_mm512_dpbf16_ps(acc.v, (__m512bh)a.v, (__m512bh)b.v)};
}

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
// out[j] = the sum of a[j]'s lanes for 4 vectors at once: 3 horizontal adds and one add where
// four reduce_add calls take 12 shuffles and 12 adds.
inline void reduce_add4(const VecF (&a)[4], float* out) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0].v, a[1].v), _mm256_hadd_ps(a[2].v, a[3].v));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}
// 16 bf16 values split by parity without a widening conversion: bf16 is the top half of an
// fp32, so the 32-bit lanes of the raw load, masked to their top half, are the odd elements, and
// shifted left by 16 the even ones (one load and one op per 8 values, where VecF::load(bf16)
// takes a load and two ops).
inline void load_bf16_even_odd(const bf16_t* p, VecF& even, VecF& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even.v = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd.v = _mm256_and_ps(_mm256_castsi256_ps(raw), _mm256_castsi256_ps(_mm256_set1_epi32(int(0xffff0000u))));
}
inline float reduce_max(VecF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
// a < b ? x : y per lane (y where either of a, b is NaN).
inline VecF select_lt(VecF a, VecF b, VecF x, VecF y) { return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))}; }
inline VecF round_nearest(VecF a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// x * 2^n for integral n in [-126, 127] (builds 2^n in the exponent field).
inline VecF scale_pow2(VecF x, VecF n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(x.v, _mm256_castsi256_ps(e))};
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
inline void reduce_add4(const VecF (&a)[4], float* out) {
  for (int j = 0; j < 4; ++j) out[j] = reduce_add(a[j]);
}
inline float reduce_max(VecF a) { float s = a.v[0]; for (float e : a.v) s = e > s ? e : s; return s; }
inline VecF operator-(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] -= b.v[i]; return a; }
inline VecF operator/(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] /= b.v[i]; return a; }
inline VecF min(VecF a, VecF b) { for (int i = 0; i < VecF::kWidth; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i]; return a; }
inline VecF vabs(VecF a) { for (float& e : a.v) e = e < 0.f ? -e : e; return a; }
inline VecF select_lt(VecF a, VecF b, VecF x, VecF y) { for (int i = 0; i < VecF::kWidth; ++i) y.v[i] = a.v[i] < b.v[i] ? x.v[i] : y.v[i]; return y; }
inline VecF round_nearest(VecF a) { for (float& e : a.v) e = __builtin_nearbyintf(e); return a; }
inline VecF scale_pow2(VecF x, VecF n) { for (int i = 0; i < VecF::kWidth; ++i) x.v[i] = __builtin_ldexpf(x.v[i], int(n.v[i])); return x; }
#endif

#if !defined(GK_SIMD_AVX512)
// The first n < kWidth lanes of p (the others 0), and their store (AVX-512 has masked versions).
template <class T> inline VecF load_first(const T* p, int n) {
  alignas(64) T tmp[VecF::kWidth] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return VecF::load(tmp);
}
template <class T> inline void store_first(VecF x, T* p, int n) {
  alignas(64) T tmp[VecF::kWidth];
  x.store(tmp);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}
#endif

// exp(x) on every lane: x = n ln2 + r with |r| <= ln2 / 2 (two-constant Cody-Waite split),
// exp(r) by a degree-6 polynomial fitted for relative error, times 2^n: about 1 ulp.
// Results below FLT_MIN (x < -87.33), exp(-inf) included, are exactly 0, so masked scores weigh
// nothing; NaN stays NaN; x above 88.3 saturates at exp(88.3) (attention only takes exp of
// values <= 0). The polynomial runs on xc (x clamped, or x itself where that is safe); the
// result is 0 where x < -87.33.
inline VecF exp_of_clamped(VecF xc, VecF x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -87.33f;
  const VecF n = round_nearest(xc * VecF::set1(kLog2e));
  VecF r = fmadd(n, VecF::set1(-kLn2Hi), xc);
  r = fmadd(n, VecF::set1(-kLn2Lo), r);
  VecF p = VecF::set1(0.0013836867874488235f);
  p = fmadd(p, r, VecF::set1(0.008374803699553013f));
  p = fmadd(p, r, VecF::set1(0.04166822507977486f));
  p = fmadd(p, r, VecF::set1(0.16666419804096222f));
  p = fmadd(p, r, VecF::set1(0.49999991059303284f));
  p = fmadd(p, r, VecF::set1(1.f));
  p = fmadd(p, r, VecF::set1(1.f));
  return select_lt(x, VecF::set1(kMin), VecF::zero(), scale_pow2(p, n));
}

inline VecF vexp(VecF x) {
  // max(lo, x) keeps a NaN x (the second operand wins on NaN)
  return exp_of_clamped(min(VecF::set1(88.3f), max(VecF::set1(-87.5f), x)), x);
}

// exp(x) for the online softmax, where x = score - running max is <= 0, -inf or NaN: there the
// clamps of vexp are the identity or overridden by the final select (x < -87.33 gives 0), so on
// AVX-512, whose VSCALEFPS takes any exponent (-inf, NaN, huge) without undefined behaviour, they
// are dropped: 2 of the 15 instructions of the loop that dominates the softmax, bit-identical
// results. Other ISA levels convert n to an integer exponent and keep the clamps.
inline VecF vexp_nonpos(VecF x) {
#if defined(GK_SIMD_AVX512)
  return exp_of_clamped(x, x);
#else
  return vexp(x);
#endif
}

#if defined(GK_SIMD_AVX512)
// In-register transpose of a 16 x 16 fp32 block: r[i] lane j becomes r[j] lane i.
inline void transpose16x16(__m512 (&r)[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of single floats
    a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // 4 x 4 blocks: pairs of floats
    for (int j = 0; j < 2; ++j) {
      b[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i + j]), _mm512_castps_pd(a[i + j + 2])));
      b[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i + j]), _mm512_castps_pd(a[i + j + 2])));
    }
  // b[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+3; now gather the lanes
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      a[i + j] = _mm512_shuffle_f32x4(b[i + j], b[i + j + 4], _MM_SHUFFLE(2, 0, 2, 0));
      a[i + j + 4] = _mm512_shuffle_f32x4(b[i + j], b[i + j + 4], _MM_SHUFFLE(3, 1, 3, 1));
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(a[j], a[j + 8], _MM_SHUFFLE(2, 0, 2, 0));
    r[j + 8] = _mm512_shuffle_f32x4(a[j], a[j + 8], _MM_SHUFFLE(3, 1, 3, 1));
  }
}
#endif

// The SIMD operations of the online-softmax rule (core/softmax_state.h, softmax_rescale), one
// state per lane. Empty lanes (m = -inf) are found by comparison with the lowest finite float.
struct VecSoftmaxOps {
  static VecF max(VecF a, VecF b) { return cpu::max(a, b); }
  static VecF exp(VecF x) { return vexp(x); }
  static VecF zero() { return VecF::zero(); }
  static VecF select_empty(VecF m, VecF zero, VecF x) { return select_lt(m, VecF::set1(-3.0e38f), zero, x); }
};

// tanh(x) on every lane, about 1 ulp: an odd polynomial fitted for relative error below 0.625
// (where 1 - 2 / (e^2x + 1) would cancel), that formula above; exactly +-1 beyond 9.
inline VecF vtanh(VecF x) {
  const VecF ax = vabs(x), x2 = x * x;
  VecF p = VecF::set1(-0.005660330411046743f);
  p = fmadd(p, x2, VecF::set1(0.02059129625558853f));
  p = fmadd(p, x2, VecF::set1(-0.05372116342186928f));
  p = fmadd(p, x2, VecF::set1(0.13331128656864166f));
  p = fmadd(p, x2, VecF::set1(-0.3333325982093811f));
  p = fmadd(p, x2, VecF::set1(1.f));
  const VecF small = p * x;
  const VecF t = vexp(min(ax, VecF::set1(9.f)) * VecF::set1(2.f));
  const VecF big = VecF::set1(1.f) - VecF::set1(2.f) / (t + VecF::set1(1.f));
  const VecF signed_big = select_lt(x, VecF::zero(), VecF::zero() - big, big);
  return select_lt(ax, VecF::set1(0.625f), small, signed_big);
}

}  // namespace gk::cpu
