// CUDA device intrinsics for the emulator: barriers, warp collectives, atomics and math.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include "emu/runtime.h"

namespace gk::emu {
namespace detail {

// Warp collectives are emulated for all live lanes of a warp. A mask that leaves out a live lane
// (a genuinely partial collective) is not supported: it would need one barrier per mask.
inline void check_full_warp_mask(const CudaThread& t, unsigned mask, const char* op) {
  const uint32_t live = t.warp->live_lanes.load(std::memory_order_relaxed);
  if ((mask & live) != live || (mask & (1u << t.lane)) == 0)
    fatal("%s with mask 0x%08x in warp %d (live lanes 0x%08x), lane %d of block (%u,%u,%u): the "
          "emulator supports collectives over all live lanes of a warp only",
          op, mask, t.warp->index, live, t.lane, t.block->index.x, t.block->index.y, t.block->index.z);
}

}  // namespace detail

// The building block of every warp collective (shuffles, ballot, and ldmatrix/mma in ptx.cuh):
// each lane publishes `mine`; once the whole warp has, `compute(all, lane)` runs in every lane
// with `all[l]` = lane l's value (garbage for lanes that do not exist) and its result is returned.
template <class T, class Compute>
auto warp_collective(unsigned mask, const char* op, const T& mine, Compute&& compute) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= kLaneExchangeBytes, "bad exchange type");
  detail::CudaThread& self = detail::current_thread();
  detail::check_full_warp_mask(self, mask, op);
  detail::Warp& warp = *self.warp;
  unsigned char* slots = warp.exchange;
  new (slots + self.lane * sizeof(T)) T(mine);
  warp.barrier.arrive_and_wait();  // everyone has published
  auto result = compute(std::launder(reinterpret_cast<const T*>(slots)), self.lane);
  warp.barrier.arrive_and_wait();  // everyone has read: the slots may be reused
  return result;
}

// For instructions with .aligned semantics over the whole warp (ldmatrix, mma): every one of the
// 32 lanes must exist and take part, otherwise the hardware result is undefined.
inline void require_whole_warp(const char* op) {
  const detail::CudaThread& t = detail::current_thread();
  const uint32_t live = t.warp->live_lanes.load(std::memory_order_relaxed);
  if (live != 0xffffffffu)
    detail::fatal("%s needs all 32 lanes of warp %d, but only lanes 0x%08x are live (block (%u,%u,%u))",
                  op, t.warp->index, live, t.block->index.x, t.block->index.y, t.block->index.z);
}

inline unsigned lane_id() { return static_cast<unsigned>(detail::current_thread().lane); }

}  // namespace gk::emu

// ---- barriers ----
inline void __syncthreads() { gk::emu::detail::current_thread().block->syncthreads.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  gk::emu::detail::CudaThread& t = gk::emu::detail::current_thread();
  gk::emu::detail::check_full_warp_mask(t, mask, "__syncwarp");
  t.warp->barrier.arrive_and_wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned __activemask() {
  return gk::emu::detail::current_thread().warp->live_lanes.load(std::memory_order_relaxed);
}

// ---- shuffles (source lanes outside the segment or the warp return the caller's own value) ----
template <class T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return gk::emu::warp_collective(mask, "__shfl_sync", value, [&](const T* all, int lane) {
    const int segment_start = lane & ~(width - 1);
    return all[segment_start + (src_lane & (width - 1))];
  });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return gk::emu::warp_collective(mask, "__shfl_xor_sync", value, [&](const T* all, int lane) {
    // CUDA: a lane may read from its own or an earlier segment of `width` lanes; asking a later
    // segment returns the caller's own value.
    const int src = lane ^ lane_mask;
    return src < 32 && src < (lane & ~(width - 1)) + width ? all[src] : all[lane];
  });
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return gk::emu::warp_collective(mask, "__shfl_up_sync", value, [&](const T* all, int lane) {
    const int in_segment = lane & (width - 1);
    return in_segment >= static_cast<int>(delta) ? all[lane - static_cast<int>(delta)] : all[lane];
  });
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return gk::emu::warp_collective(mask, "__shfl_down_sync", value, [&](const T* all, int lane) {
    const int in_segment = lane & (width - 1);
    return in_segment + static_cast<int>(delta) < width ? all[lane + static_cast<int>(delta)] : all[lane];
  });
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return gk::emu::warp_collective(mask, "__ballot_sync", predicate != 0, [&](const bool* all, int lane) {
    const uint32_t live = gk::emu::detail::current_thread().warp->live_lanes.load(std::memory_order_relaxed);
    (void)lane;
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
      if (((mask & live) >> l & 1u) && all[l]) bits |= 1u << l;
    return bits;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  const uint32_t live = gk::emu::detail::current_thread().warp->live_lanes.load(std::memory_order_relaxed);
  return __ballot_sync(mask, predicate) == (mask & live);
}

// ---- atomics ----
// GPU atomics are relaxed; so are these (the __atomic builtins are understood by TSan, and cost
// nothing extra in fiber mode).
namespace gk::emu::detail {
template <class T, class Update>
T atomic_update(T* address, Update update) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired = update(old);
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    desired = update(old);
  return old;
}
}  // namespace gk::emu::detail

#define GK_EMU_INTEGER_ATOMICS(T)                                                                   \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }             \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }             \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }           \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }             \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }               \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }             \
  inline T atomicMax(T* a, T v) {                                                                  \
    return gk::emu::detail::atomic_update(a, [v](T old) { return old < v ? v : old; });            \
  }                                                                                                \
  inline T atomicMin(T* a, T v) {                                                                  \
    return gk::emu::detail::atomic_update(a, [v](T old) { return v < old ? v : old; });            \
  }                                                                                                \
  inline T atomicCAS(T* a, T compare, T v) {                                                       \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);        \
    return compare; /* holds the old value whether or not the exchange happened */                 \
  }
GK_EMU_INTEGER_ATOMICS(int)
GK_EMU_INTEGER_ATOMICS(unsigned int)
GK_EMU_INTEGER_ATOMICS(unsigned long long)
GK_EMU_INTEGER_ATOMICS(long long)
#undef GK_EMU_INTEGER_ATOMICS

inline float atomicAdd(float* a, float v) {
  return gk::emu::detail::atomic_update(a, [v](float old) { return old + v; });
}
inline double atomicAdd(double* a, double v) {
  return gk::emu::detail::atomic_update(a, [v](double old) { return old + v; });
}
inline float atomicExch(float* a, float v) {
  float old;
  __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
  return old;
}

// ---- math, with CUDA's names ----
// The fast-math intrinsics (__expf, __fdividef, rsqrtf...) are computed at full precision here;
// tests must use tolerances that admit the GPU's approximations.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T> inline T __ldg(const T* p) { return *p; }
// exp2f, fmaxf, fminf, INFINITY: the C library's, already global through <cmath>.

// CUDA's min/max accept mixed arithmetic types (usual conversions) and use fminf/fmaxf
// semantics for floating point (a NaN operand yields the other one).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) return std::fmin(R(a), R(b));
  else return R(b) < R(a) ? R(b) : R(a);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) return std::fmax(R(a), R(b));
  else return R(a) < R(b) ? R(b) : R(a);
}
