// The only file with inline PTX. Each wrapper is inline asm under nvcc and, under the host
// compiler, a warp collective of the emulator (csrc/emu) that follows the PTX ISA's fragment
// layouts exactly, so that a kernel with a layout mistake computes a wrong result in tests.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" and "ldmatrix"), with
// group = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit elements, the lower
// column/k index in the low half:
//   A (16x16, row-major): a[0] = A[group][2t, 2t+1]     a[1] = A[group+8][2t, 2t+1]
//                         a[2] = A[group][2t+8, 2t+9]   a[3] = A[group+8][2t+8, 2t+9]
//   B (16x8, "col"):      b[0] = B[2t, 2t+1][group]     b[1] = B[2t+8, 2t+9][group]
//   C/D (16x8, f32):      c[0], c[1] = C[group][2t, 2t+1]   c[2], c[3] = C[group+8][2t, 2t+1]
//   ldmatrix .m8n8.b16:   lanes 8j..8j+7 give the row addresses of matrix j (16 bytes per row);
//                         r[j] of lane l = M_j[l/4][2(l%4), 2(l%4)+1], or with .trans
//                         M_j[2(l%4)][l/4] (low) and M_j[2(l%4)+1][l/4] (high).
#pragma once
#include <cstdint>
#include <cstring>

#include "core/numeric.h"
#include "cuda/compat.cuh"

namespace gk::ptx {

#if defined(__CUDACC__)
// ============================================= GPU ==============================================

// Shared-memory window address of a generic pointer into shared memory, as PTX wants it.
__device__ __forceinline__ uint32_t smem_u32addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A * B + C, m16n8k16, row.col, fp32 accumulate. D may alias C. Pure register operation, so
// not volatile: the compiler may schedule it freely.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// ldmatrix reads shared memory: volatile so it is not moved across the stores and barriers that
// produce that memory.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_u32addr(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32addr(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32addr(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_u32addr(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32addr(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32addr(smem_row_ptr)));
}

// 16-byte global -> shared copy that bypasses L1 (.cg). Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32addr(smem)), "l"(gmem) : "memory");
}
// As cp_async_16, but when !valid reads nothing and zero-fills the 16 bytes (src-size 0), so
// out-of-range tiles need no branch around the copy. `gmem` must still be a valid-looking address.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(smem_u32addr(smem)), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's most recent committed groups are still in flight. The
// copied data is visible to this thread only: other threads need a __syncthreads() afterwards.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7 here");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats to a packed pair of 16-bit values, `lo` in the low half (the lower column).
__device__ __forceinline__ uint32_t pack_float2_to_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack_float2_to_bf162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

#else
// ========================================== emulation ===========================================
namespace detail {

template <class Half>
inline float half_to_float(uint32_t packed, int high) {
  return to_float(Half{static_cast<uint16_t>(high ? packed >> 16 : packed & 0xffffu)});
}

// Every lane publishes its A and B registers; each lane then computes its own four outputs.
// Numerics: each product of two 16-bit inputs is exact in fp32; the 16 products are added to C
// one at a time in k order with fp32 round-to-nearest. Tensor cores add in a different order
// and with their own rounding, so results can differ from hardware by a few ulp of the
// accumulated magnitude: compare with tolerances, never bitwise.
template <class Half>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const char* name) {
  gk::emu::require_whole_warp(name);
  struct Operands { uint32_t a[4]; uint32_t b[2]; };
  struct Accumulators { float v[4]; };
  const Operands mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const Accumulators acc_in{{c[0], c[1], c[2], c[3]}};  // copied first: d may alias c
  const Accumulators out = gk::emu::warp_collective(0xffffffffu, name, mine, [&](const Operands* lanes, int lane) {
    // Element (row, k) of A lives in lane (row % 8) * 4 + (k % 8) / 2, register
    // (row / 8) + 2 * (k / 8), half k % 2 (inverse of the table in the header comment).
    auto a_at = [&](int row, int k) {
      return half_to_float<Half>(lanes[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2);
    };
    // Element (k, n) of B lives in lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
    auto b_at = [&](int k, int n) { return half_to_float<Half>(lanes[n * 4 + (k % 8) / 2].b[k / 8], k % 2); };
    const int group = lane / 4, t = lane % 4;
    Accumulators r;
    for (int i = 0; i < 4; ++i) {
      const int row = group + 8 * (i / 2), col = 2 * t + i % 2;
      float sum = acc_in.v[i];
      for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
      r.v[i] = sum;
    }
    return r;
  });
  for (int i = 0; i < 4; ++i) d[i] = out.v[i];
}

inline void check_aligned16(const void* p, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    gk::emu::detail::fatal("%s: address %p is not 16-byte aligned (lane %u); the GPU would fault", op, p,
                           gk::emu::lane_id());
}

// Lanes 8j..8j+7 hold the row addresses of matrix j; lanes beyond 8 * kMatrices are ignored.
template <int kMatrices, bool kTranspose>
inline void ldmatrix(uint32_t* r, const void* smem_row_ptr, const char* name) {
  gk::emu::require_whole_warp(name);
  if (gk::emu::lane_id() < 8u * kMatrices) check_aligned16(smem_row_ptr, name);
  struct Registers { uint32_t r[4]; };
  const Registers out = gk::emu::warp_collective(
      0xffffffffu, name, smem_row_ptr, [&](const void* const* row_ptrs, int lane) {
        auto element = [&](int matrix, int row, int col) {
          uint16_t v;
          std::memcpy(&v, static_cast<const unsigned char*>(row_ptrs[8 * matrix + row]) + 2 * col, 2);
          return uint32_t(v);
        };
        Registers regs{};
        for (int j = 0; j < kMatrices; ++j) {
          const int g = lane / 4, t = lane % 4;
          regs.r[j] = kTranspose ? element(j, 2 * t, g) | element(j, 2 * t + 1, g) << 16
                                 : element(j, g, 2 * t) | element(j, g, 2 * t + 1) << 16;
        }
        return regs;
      });
  for (int j = 0; j < kMatrices; ++j) r[j] = out.r[j];
}

}  // namespace detail

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  detail::mma_m16n8k16<fp16_t>(d, a, b, c, "mma.m16n8k16.f16");
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  detail::mma_m16n8k16<bf16_t>(d, a, b, c, "mma.m16n8k16.bf16");
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* p) { detail::ldmatrix<1, false>(r, p, "ldmatrix.x1"); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { detail::ldmatrix<2, false>(r, p, "ldmatrix.x2"); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { detail::ldmatrix<4, false>(r, p, "ldmatrix.x4"); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { detail::ldmatrix<1, true>(r, p, "ldmatrix.x1.trans"); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { detail::ldmatrix<2, true>(r, p, "ldmatrix.x2.trans"); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { detail::ldmatrix<4, true>(r, p, "ldmatrix.x4.trans"); }

// cp.async: queued per thread and performed only when a wait_group retires its group (or the
// thread exits), so reading the destination too early sees stale shared memory, as on hardware.
inline void cp_async_16(void* smem, const void* gmem) {
  detail::check_aligned16(smem, "cp.async (shared)");
  detail::check_aligned16(gmem, "cp.async (global)");
  gk::emu::async_copy_queue().issue(smem, gmem, 16, /*zero_fill=*/false);
}
inline void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  detail::check_aligned16(smem, "cp.async (shared)");
  if (valid) detail::check_aligned16(gmem, "cp.async (global)");
  gk::emu::async_copy_queue().issue(smem, gmem, 16, /*zero_fill=*/!valid);
}
inline void cp_async_commit_group() { gk::emu::async_copy_queue().commit(); }
template <int N>
inline void cp_async_wait_group() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7 here");
  gk::emu::async_copy_queue().wait(static_cast<size_t>(N));
}

inline uint32_t pack_float2_to_half2(float lo, float hi) {
  return uint32_t(fp16_from_float(lo).bits) | uint32_t(fp16_from_float(hi).bits) << 16;
}
inline uint32_t pack_float2_to_bf162(float lo, float hi) {
  return uint32_t(bf16_from_float(lo).bits) | uint32_t(bf16_from_float(hi).bits) << 16;
}
#endif

}  // namespace gk::ptx
