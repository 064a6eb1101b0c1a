// Philox4x32-10 counter-based random numbers and Box-Muller Gaussians, shared by the CPU
// kernels, the CUDA kernels and their emulation.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to 128 random bits. genkernels keys it by the 64-bit seed and
// puts the 64-bit offset (the sampler step) and the index of a group of 4 elements in the
// counter, so the noise of element i depends only on (seed, offset, i): bit-identical on the
// CPU, under emulation and on any GPU, whatever the launch grid or the thread count.
//
//   counter = (group_lo, group_hi, offset_lo, offset_hi), key = (seed_lo, seed_hi),
//   group = i / 4, and element i takes Gaussian (i % 4) of the group's 4.
//
// Gaussians: one Philox call gives two Box-Muller pairs. For bit identity across compilers and
// ISAs, the transform avoids libm: log and sin/cos are short polynomials evaluated with
// explicit fused multiply-adds (so no compiler can contract differently), the angle is reduced
// exactly in integer arithmetic, and only IEEE-exact operations (+, *, fma, sqrt, int->float)
// are used. u1 = (k + 1) / 2^24 with k the top 24 bits, so |z| <= sqrt(48 ln 2) ~ 5.77.
#pragma once
#include <cmath>
#include <cstdint>
#include "core/common.h"
#include "core/numeric.h"

namespace gk {

struct Philox4x32Result {
  uint32_t v[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt 3)

GK_HOST_DEVICE GK_INLINE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = uint64_t(a) * uint64_t(b);
  lo = uint32_t(p);
  hi = uint32_t(p >> 32);
#endif
}

// Fused multiply-add with one rounding on every target: the hardware FMA on the GPU and with
// -mfma, the correctly rounded libm fmaf otherwise. Writing every multiply-add of the Gaussian
// transform this way leaves no a*b+c that a compiler could contract on one target and not on
// another.
GK_HOST_DEVICE GK_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}
GK_HOST_DEVICE GK_INLINE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
}  // namespace philox_detail

/// Philox4x32 with 10 rounds: the Random123 `philox4x32_R(10, ctr, key)`.
GK_HOST_DEVICE GK_INLINE Philox4x32Result philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                        uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) k0 += kWeyl0, k1 += kWeyl1;
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return Philox4x32Result{{c0, c1, c2, c3}};
}

namespace philox_detail {
// -2 ln(u) for u = k / 2^24, k in [1, 2^24]: u = 2^e m with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^11 (truncation
// below 1e-10 relative). About 2 ulp.
GK_HOST_DEVICE GK_INLINE float minus_two_log_u24(uint32_t k) {
  constexpr float kLn2Hi = 0.693145751953125f;         // ln 2 with its low 12 bits zero: e * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187045e-06f;  // ln 2 - kLn2Hi
  const float u = float(k) * 5.9604644775390625e-08f;  // exact: k < 2^25, times 2^-24
  uint32_t bits = float_as_bits(u);
  int e = int(bits >> 23) - 127;
  bits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  float m = bits_as_float(bits);
  const bool halve = m > 1.41421356f;  // exact halving
  m = halve ? m * 0.5f : m;
  e += halve ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = fma_rn(p, s2, 1.0f / 9.0f);
  p = fma_rn(p, s2, 1.0f / 7.0f);
  p = fma_rn(p, s2, 1.0f / 5.0f);
  p = fma_rn(p, s2, 1.0f / 3.0f);
  const float s3 = s2 * s;
  const float ln_m = fma_rn(2.0f * s3, p, 2.0f * s);  // 2s + 2s^3 p(s^2)
  const float fe = float(e);
  const float ln_u = fma_rn(fe, kLn2Hi, fma_rn(fe, kLn2Lo, ln_m));
  return -2.0f * ln_u;
}

// sin and cos of a in [0, pi/4] by Taylor polynomials (error < 4e-9 before rounding).
GK_HOST_DEVICE GK_INLINE void sincos_octant(float a, float& s, float& c) {
  const float a2 = a * a;
  float ps = -1.0f / 39916800.0f;  // -1/11!
  ps = fma_rn(ps, a2, 1.0f / 362880.0f);
  ps = fma_rn(ps, a2, -1.0f / 5040.0f);
  ps = fma_rn(ps, a2, 1.0f / 120.0f);
  ps = fma_rn(ps, a2, -1.0f / 6.0f);
  s = fma_rn(ps * a2, a, a);
  float pc = 1.0f / 3628800.0f;  // 1/10!
  pc = fma_rn(pc, a2, -1.0f / 40320.0f);
  pc = fma_rn(pc, a2, 1.0f / 720.0f);
  pc = fma_rn(pc, a2, -1.0f / 24.0f);
  pc = fma_rn(pc, a2, 0.5f);
  c = fma_rn(-pc, a2, 1.0f);
}

// sin and cos of 2 pi b / 2^32. The octant (top 3 bits) is taken exactly; odd octants are
// reflected in integer arithmetic, so the polynomial only sees angles in [0, pi/4].
GK_HOST_DEVICE GK_INLINE void sincos_turns32(uint32_t b, float& sin_t, float& cos_t) {
  const uint32_t octant = b >> 29;
  uint32_t r = b & 0x1fffffffu;
  if (octant & 1u) r = 0x20000000u - r;                          // in (0, 2^29]
  const float a = float(r) * (0.78539816339744831f / 536870912.0f);  // r * (pi/4) / 2^29
  float s, c;
  sincos_octant(a, s, c);
  // octant o covers [o pi/4, (o+1) pi/4); by symmetry sin and cos swap in octants 1, 2, 5, 6,
  // sin is negative in 4..7 and cos in 2..5. Selects, not branches: the CPU loop vectorises.
  const bool swap = ((octant + 1u) >> 1) & 1u;
  const float sv = swap ? c : s, cv = swap ? s : c;
  sin_t = (octant & 4u) ? -sv : sv;
  cos_t = ((octant + 2u) & 4u) ? -cv : cv;
}

// Two standard normal numbers from two 32-bit words (Box-Muller).
GK_HOST_DEVICE GK_INLINE void box_muller(uint32_t w0, uint32_t w1, float& z0, float& z1) {
  const float r = sqrt_rn(minus_two_log_u24((w0 >> 8) + 1u));
  float s, c;
  sincos_turns32(w1, s, c);
  z0 = r * c;
  z1 = r * s;
}
}  // namespace philox_detail

/// The four standard normal numbers of element group `group` (elements 4 group .. 4 group + 3)
/// for (seed, offset).
struct Gaussian4 {
  float v[4];
};
GK_HOST_DEVICE GK_INLINE Gaussian4 philox_gaussian4(uint64_t seed, uint64_t offset, uint64_t group) {
  const Philox4x32Result r = philox4x32_10(uint32_t(group), uint32_t(group >> 32), uint32_t(offset),
                                           uint32_t(offset >> 32), uint32_t(seed), uint32_t(seed >> 32));
  Gaussian4 g;
  philox_detail::box_muller(r.v[0], r.v[1], g.v[0], g.v[1]);
  philox_detail::box_muller(r.v[2], r.v[3], g.v[2], g.v[3]);
  return g;
}

/// The standard normal number of element `index` for (seed, offset).
GK_HOST_DEVICE GK_INLINE float philox_gaussian(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox_gaussian4(seed, offset, index >> 2).v[index & 3];
}

}  // namespace gk
