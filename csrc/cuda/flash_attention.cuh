// CUDA kernel + launchers: flash attention forward (prefill), FlashAttention-2 style.
//
// Tiling: grid (query blocks, heads_q, batch); a block of 4 warps owns kBlockM = 64 query rows of
// one head, each warp a 16-row slab. The block's Q tile is copied to shared memory once; K and
// V tiles of kBlockN keys (of kv head h / group: GQA) stream through a 2-stage cp.async pipeline,
// tile j + 1 in flight while tile j is computed. Per tile and warp: S = Q.K^T with
// mma.m16n8k16 (Q and K fragments by ldmatrix), the online-softmax update in registers, P
// rounded to 16 bits in registers and used directly as the A operand of O += P.V (V fragments
// by ldmatrix.trans). Only the key tiles the block can see are visited (causal / window early
// exit); the mask is evaluated only on tiles not fully visible to all 64 rows. The output goes
// through the warp's own Q slab in shared memory so that global stores are 16-byte wide.
// Traffic: Q and O once; K and V once per query block.
// Numerics: fp32 accumulation; base-2 softmax with scale * log2(e) folded into one FFMA per
// score (plain path), or scores from core/flash_params.h's flash_score in log2 units (softcap,
// ALiBi); the row sum uses the fp32 probabilities, P.V their 16-bit rounding (as FA2).
// Configuration: csrc/cuda/flash_attention_traits.cuh. Semantics: csrc/core/flash_params.h.
#pragma once
#include <cstdint>
#include <type_traits>
#include "core/flash_params.h"
#include "core/softmax_state.h"
#include "cuda/compat.cuh"
#include "cuda/flash_attention_traits.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/ptx.cuh"

namespace gk::GK_CUDA_NS {

namespace flash_detail {

using namespace mma_fragments;

struct alignas(16) Chunk16 {
  uint32_t v[4];
};

// Copies rows [row0, row0 + kRows) of a sequence with `valid_rows` rows into padded shared
// memory with 16-byte cp.async; rows past the end are zero-filled, so that no stale or NaN value
// of shared memory can reach an MMA. When a row is a divisor of the block's chunks, a thread
// copies one column of chunks and walks down the rows with a running pointer: the unrolled
// loop then keeps one 64-bit address live instead of one per copy.
template <class Tr, int kRows, class T>
GK_DEVICE GK_INLINE void copy_tile_async(T* dst, const T* base, int64_t token_stride, int row0, int valid_rows,
                                         int tid) {
  constexpr int kPerThread = kRows * Tr::kChunksPerRow / Tr::kThreads;
  if constexpr (Tr::kThreads % Tr::kChunksPerRow == 0) {
    constexpr int kRowStep = Tr::kThreads / Tr::kChunksPerRow;
    const int r0 = tid / Tr::kChunksPerRow, col = (tid % Tr::kChunksPerRow) * Tr::kChunk;
    const T* src = base + int64_t(row0 + r0) * token_stride + col;
    const int64_t step = kRowStep * token_stride;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool valid = row0 + r0 + i * kRowStep < valid_rows;
      ptx::cp_async_16_zfill(dst + (r0 + i * kRowStep) * Tr::kRowStride + col, valid ? src : base, valid);
      src += step;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = tid + i * Tr::kThreads;
      const int r = c / Tr::kChunksPerRow, col = (c % Tr::kChunksPerRow) * Tr::kChunk;
      const bool valid = row0 + r < valid_rows;
      const T* src = base + (valid ? int64_t(row0 + r) * token_stride : 0) + col;
      ptx::cp_async_16_zfill(dst + r * Tr::kRowStride + col, src, valid);
    }
  }
}

}  // namespace flash_detail

// ================================================================================== kernels

template <class T, int kHeadDim>
__global__ void __launch_bounds__(FlashTraits<T, kHeadDim>::kThreads, FlashTraits<T, kHeadDim>::kMinBlocksPerSm) flash_attention_kernel(const FlashParams p) {
  using Tr = FlashTraits<T, kHeadDim>;
  using namespace flash_detail;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kRowStride;
  GK_DYNAMIC_SMEM(T, smem);
  T* const sQ = smem;
  T* const sK = sQ + Tr::kQElems;                   // kStages tiles
  T* const sV = sK + Tr::kStages * Tr::kTileElems;  // kStages tiles

  const int b = blockIdx.z, h = blockIdx.y;
  // Causal / windowed blocks near the end of the sequence have the most keys: start them first.
  const int m_block = p.causal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  // Lengths and positions fit in int (the bindings require sequences shorter than 2^24).
  const int sq = int(p.seqlen_q_of(b)), sk = int(p.seqlen_k_of(b));
  const int m0 = m_block * kBlockM;
  if (m0 >= sq) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t kvh = h / p.group();

  const T* const q_base = static_cast<const T*>(p.q) + b * p.q_stride[0] + p.q_offset(b) * p.q_stride[1] + h * p.q_stride[2];
  const T* const k_base = static_cast<const T*>(p.k) + b * p.k_stride[0] + p.k_offset(b) * p.k_stride[1] + kvh * p.k_stride[2];
  const T* const v_base = static_cast<const T*>(p.v) + b * p.v_stride[0] + p.k_offset(b) * p.v_stride[1] + kvh * p.v_stride[2];

  // Keys of the block: [n_lo, n_hi) are seen by some row, [full_lo, full_hi) by every row (the
  // key ranges of flash_key_range are monotone in the row), so only tiles outside the latter
  // need the per-element mask.
  const int m_last = (m0 + kBlockM < sq ? m0 + kBlockM : sq) - 1;
  const FlashKeyRange first = flash_key_range(p, m0, sq, sk), last = flash_key_range(p, m_last, sq, sk);
  const int n_lo = int(first.lo), n_hi = int(last.hi > first.lo ? last.hi : first.lo);
  const int full_lo = int(last.lo), full_hi = int(first.hi);
  const int tile_begin = n_lo / kBlockN, tile_end = (n_hi + kBlockN - 1) / kBlockN;

  // This thread's two rows (g and g + 8 of the warp's slab): visible keys, position.
  int row_lo[2], row_hi[2], row_pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + g + 8 * r;
    const FlashKeyRange kr = flash_key_range(p, i, sq, sk);
    row_lo[r] = int(kr.lo), row_hi[r] = int(kr.hi), row_pos[r] = int(i + sk - sq);
  }
  // Plain scores are kept raw and scaled inside exp2 (one FFMA); softcap and ALiBi (and a
  // non-positive scale, for which the raw maximum is not the scaled one) turn the scores into
  // log2 units first, with flash_score, and use a multiplier of 1.
  const bool general = p.softcap > 0.f || p.alibi_slopes != nullptr || !(p.scale > 0.f);
  const float mult = general ? 1.f : p.scale * kLog2e;
  const float slope = p.alibi_slope(b, h);

  float acc[Tr::kOutTiles][4];
#pragma unroll
  for (int n = 0; n < Tr::kOutTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // in score units (raw, or log2 units if general)
  float row_sum[2] = {0.f, 0.f};              // this lane's part; the quad sum comes at the end

  if (tile_begin < tile_end) {
    // Prologue: Q and the first K/V tile in one group.
    copy_tile_async<Tr, kBlockM>(sQ, q_base, p.q_stride[1], m0, sq, tid);
    copy_tile_async<Tr, kBlockN>(sK, k_base, p.k_stride[1], tile_begin * kBlockN, sk, tid);
    copy_tile_async<Tr, kBlockN>(sV, v_base, p.v_stride[1], tile_begin * kBlockN, sk, tid);
    ptx::cp_async_commit_group();
  }
  const T* const q_warp = sQ + warp * 16 * kLd;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = (tile - tile_begin) % Tr::kStages;
    // Prefetch the next tile into the other stage (freed by the barrier that ended the previous
    // iteration); always commit, possibly an empty group, so that wait_group<1> below means
    // "everything but the prefetch has landed".
    if (tile + 1 < tile_end) {
      const int next = (stage + 1) % Tr::kStages;
      copy_tile_async<Tr, kBlockN>(sK + next * Tr::kTileElems, k_base, p.k_stride[1], (tile + 1) * kBlockN, sk, tid);
      copy_tile_async<Tr, kBlockN>(sV + next * Tr::kTileElems, v_base, p.v_stride[1], (tile + 1) * kBlockN, sk, tid);
    }
    ptx::cp_async_commit_group();
    ptx::cp_async_wait_group<1>();
    __syncthreads();  // this tile (and Q) written by every thread's copies
    const T* const k_tile = sK + stage * Tr::kTileElems;
    const T* const v_tile = sV + stage * Tr::kTileElems;
    const int n0 = tile * kBlockN;

    // ---- S = Q K^T (16 x kBlockN per warp)
    float s[Tr::kScoreTiles][4];
#pragma unroll
    for (int j = 0; j < Tr::kScoreTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll(Tr::kQKUnroll)
    for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
      // A: matrices (rows 0-7, 8-15) x (k 0-7, 8-15); lane l addresses row l % 16, half l / 16.
      uint32_t a[4];
      ptx::ldmatrix_x4(a, q_warp + (lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int j = 0; j < Tr::kScoreTiles; j += 2) {
        // B of two n-tiles: matrices (keys j*8.., k 0-7), (same keys, k 8-15), then keys + 8.
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, k_tile + (j * 8 + lane % 8 + (lane / 16) * 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
        mma<T>(s[j], a, kb[0], kb[1]);
        mma<T>(s[j + 1], a, kb[2], kb[3]);
      }
    }

    // ---- scores: softcap / ALiBi, then the mask on boundary tiles only
    if (general) {
#pragma unroll
      for (int j = 0; j < Tr::kScoreTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + j * 8 + 2 * t + e % 2;
          s[j][e] = flash_score(s[j][e], p.scale, p.softcap, slope, row_pos[e / 2] - col) * kLog2e;
        }
    }
    if (n0 < full_lo || n0 + kBlockN > full_hi) {
#pragma unroll
      for (int j = 0; j < Tr::kScoreTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + j * 8 + 2 * t + e % 2;
          if (col < row_lo[e / 2] || col >= row_hi[e / 2]) s[j][e] = -INFINITY;
        }
    }

    // ---- online softmax (base 2): new max, rescale of the running state, probabilities
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < Tr::kScoreTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = quad_max(mx);
      // A row that has seen only masked keys keeps max -inf: subtract 0 instead, so that
      // exp2(-inf - -inf) never makes a NaN; its probabilities are exp2(-inf) = 0.
      const float shift = mx == -INFINITY ? 0.f : mx * mult;
      const float alpha = exp2f(row_max[r] * mult - shift);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < Tr::kScoreTiles; ++j) {
        s[j][2 * r] = exp2f(fmaf(s[j][2 * r], mult, -shift));
        s[j][2 * r + 1] = exp2f(fmaf(s[j][2 * r + 1], mult, -shift));
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int n = 0; n < Tr::kOutTiles; ++n) acc[n][2 * r] *= alpha, acc[n][2 * r + 1] *= alpha;
    }

    // ---- O += P V: the C fragments of score tiles 2kk, 2kk+1 are the A fragment of k-step kk
#pragma unroll
    for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
      const uint32_t a[4] = {pack<T>(s[2 * kk][0], s[2 * kk][1]), pack<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < Tr::kOutTiles; n += 2) {
        // B of two d-tiles, transposed: matrices (keys 0-7, d n*8..), (keys 8-15, same d), then d + 8.
        uint32_t vb[4];
        ptx::ldmatrix_x4_trans(vb, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + n * 8 + (lane / 16) * 8);
        mma<T>(acc[n], a, vb[0], vb[1]);
        mma<T>(acc[n + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next prefetch overwrites it
  }

  // ---- epilogue: normalise, stage the warp's 16 rows in its own Q slab, 16-byte stores
  // (the slab is read only by this warp, and every copy into it has landed: the loop's last
  // group is empty and its barriers have passed; with no tile, Q was never copied).
  T* const o_warp = sQ + warp * 16 * kLd;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float d = quad_sum(row_sum[r]);
    const float inv = softmax_inv_denominator(d);
    const int row = warp * 16 + g + 8 * r;
#pragma unroll
    for (int n = 0; n < Tr::kOutTiles; ++n) {
      const uint32_t packed = pack<T>(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(o_warp + (g + 8 * r) * kLd + n * 8 + 2 * t) = packed;
    }
    if (p.lse != nullptr && t == 0 && m0 + row < sq) {
      const float m_nat = row_max[r] == -INFINITY ? -INFINITY : row_max[r] * mult * kLn2;
      p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + (p.q_offset(b) + m0 + row) * p.lse_stride[2]] = softmax_lse(m_nat, d);
    }
  }
  __syncwarp();
  T* const o_base = static_cast<T*>(p.out) + b * p.out_stride[0] + p.q_offset(b) * p.out_stride[1] + h * p.out_stride[2];
#pragma unroll
  for (int c = lane; c < 16 * Tr::kChunksPerRow; c += 32) {
    const int r = c / Tr::kChunksPerRow, col = (c % Tr::kChunksPerRow) * Tr::kChunk;
    const int i = m0 + warp * 16 + r;
    if (i < sq)
      *reinterpret_cast<Chunk16*>(o_base + i * p.out_stride[1] + col) = *reinterpret_cast<const Chunk16*>(o_warp + r * kLd + col);
  }
}

// ================================================================================ launchers

// Launcher for one head dim. Returns a cudaError_t as int: 1 (cudaErrorInvalidValue) for a head
// dim other than kHeadDim, or pointers / token and head strides that do not allow 16-byte
// copies; launches nothing for an empty problem.
template <class T, int kHeadDim>
int flash_attention_hd(const FlashParams& p, void* stream) {
  using Tr = FlashTraits<T, kHeadDim>;
  constexpr int kInvalidValue = 1;
  if (p.batch == 0 || p.seqlen_q == 0) return 0;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  bool ok = p.head_dim == kHeadDim && aligned(p.q) && aligned(p.k) && aligned(p.v) && aligned(p.out);
  for (int i = 0; i < 3; ++i)
    ok = ok && p.q_stride[i] % Tr::kChunk == 0 && p.k_stride[i] % Tr::kChunk == 0 &&
         p.v_stride[i] % Tr::kChunk == 0 && p.out_stride[i] % Tr::kChunk == 0;
  ok = ok && p.batch <= 65535 && p.heads_q <= 65535;  // grid z and y limits
  if (!ok) return kInvalidValue;
  auto kernel = flash_attention_kernel<T, kHeadDim>;
  if (Tr::kSmemBytes > 48 * 1024) {
    if (int err = GK_SET_MAX_DYNAMIC_SMEM(kernel, Tr::kSmemBytes)) return err;
  }
  const dim3 grid(unsigned((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(p.heads_q), unsigned(p.batch));
  return GK_LAUNCH_KERNEL(kernel, grid, dim3(Tr::kThreads), Tr::kSmemBytes, stream, p);
}

// The head dims with a compiled kernel (fp16 and bf16); python/genkernels/tools/instantiations.py
// (FLASH_HEAD_DIMS) must list the same.
#define GK_FLASH_HEAD_DIMS(X) X(32) X(64) X(96) X(128) X(256)
#define GK_FLASH_EXTERN(D)                                                        \
  extern template int flash_attention_hd<fp16_t, D>(const FlashParams&, void*); \
  extern template int flash_attention_hd<bf16_t, D>(const FlashParams&, void*);
GK_FLASH_HEAD_DIMS(GK_FLASH_EXTERN)
#undef GK_FLASH_EXTERN

// Dispatch on head dim; 1 (cudaErrorInvalidValue) for a head dim without a kernel or a dtype
// without the tensor-core path (fp32).
template <class T>
int flash_attention(const FlashParams& p, void* stream) {
  if constexpr (sizeof(T) != 2) {
    static_cast<void>(p), static_cast<void>(stream);
    return 1;
  } else {
#define GK_FLASH_CASE(D) \
  if (p.head_dim == D) return flash_attention_hd<T, D>(p, stream);
    GK_FLASH_HEAD_DIMS(GK_FLASH_CASE)
#undef GK_FLASH_CASE
    return 1;
  }
}

}  // namespace gk::GK_CUDA_NS
