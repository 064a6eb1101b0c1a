// 16-bit floating point storage types and conversions used by every kernel.
//
// The kernels store fp16/bf16 as plain 16-bit structs so that the same source compiles for the
// CPU, for nvcc and for the CUDA-on-CPU emulator without any CUDA header. Conversions round to
// nearest even, like __float2bfloat16_rn / __float2half_rn, and preserve NaN and infinities.
// Device code uses the hardware conversion instructions; host code uses the bit-exact
// software versions below (the CPU SIMD paths convert with their own instructions).
#pragma once
#include <cstdint>
#include <cstring>
#include "core/common.h"
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace gk {

struct alignas(2) bf16_t { uint16_t bits; };
struct alignas(2) fp16_t { uint16_t bits; };

GK_HOST_DEVICE GK_INLINE uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
GK_HOST_DEVICE GK_INLINE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// ---- bf16 ----
GK_HOST_DEVICE GK_INLINE float to_float(bf16_t x) { return bits_as_float(uint32_t(x.bits) << 16); }

GK_HOST_DEVICE GK_INLINE bf16_t bf16_from_float(float f) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat16 h = __float2bfloat16_rn(f);
  return bf16_t{__bfloat16_as_ushort(h)};
#else
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
#endif
}

// ---- fp16 (IEEE binary16) ----
GK_HOST_DEVICE GK_INLINE float to_float(fp16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu, man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_as_float(sign);
    // subnormal: value = man * 2^-24, exact in fp32
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_as_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

GK_HOST_DEVICE GK_INLINE fp16_t fp16_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return fp16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_as_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // NaN
  if (a >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal or zero: its integer mantissa is a * 2^24 (< 1024), rounded to
    // nearest even by adding and subtracting 2^23 in fp32 (exact for these magnitudes)
    const float x = bits_as_float(a) * 16777216.0f;
    // round half to even for x < 1024 using the 2^23 magic number
    const float r = (x + 8388608.0f) - 8388608.0f;
    return fp16_t{uint16_t(sign | uint16_t(r))};
  }
  // normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even
  uint32_t v = a - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return fp16_t{uint16_t(sign | uint16_t(v >> 13))};
#endif
}

// Generic load/store of one element as float, for scalar code paths.
GK_HOST_DEVICE GK_INLINE float to_float(float x) { return x; }
template <class T> GK_HOST_DEVICE GK_INLINE T from_float(float x);
template <> GK_HOST_DEVICE GK_INLINE float from_float<float>(float x) { return x; }
template <> GK_HOST_DEVICE GK_INLINE bf16_t from_float<bf16_t>(float x) { return bf16_from_float(x); }
template <> GK_HOST_DEVICE GK_INLINE fp16_t from_float<fp16_t>(float x) { return fp16_from_float(x); }

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::kFloat32; };
template <> struct dtype_of<fp16_t> { static constexpr DType value = DType::kFloat16; };
template <> struct dtype_of<bf16_t> { static constexpr DType value = DType::kBFloat16; };

}  // namespace gk

// Runs the statement with `T` bound to the C++ element type of the dtype code; throws
// std::invalid_argument for an unknown code. One switch for every entry point.
#define GK_DISPATCH_DTYPE(code, T, ...)                                          \
  switch (static_cast<::gk::DType>(code)) {                                      \
    case ::gk::DType::kFloat32: { using T = float; __VA_ARGS__; break; }         \
    case ::gk::DType::kFloat16: { using T = ::gk::fp16_t; __VA_ARGS__; break; }  \
    case ::gk::DType::kBFloat16: { using T = ::gk::bf16_t; __VA_ARGS__; break; } \
    default: throw std::invalid_argument("genkernels: unknown dtype code");      \
  }
