// CUDA kernels + launchers: KV-cache decode attention (flash-decoding), contiguous or paged.
//
// Grid (num_splits, heads_kv x row blocks, batch); 4 warps per block. A block owns up to
// kMaxRows query rows (seqlen_q x the query heads of one kv head: GQA packing) and one split of
// the keys. Tiles of kBlockN keys of K and V stream into shared memory through cp.async 16-byte
// copies in a kStages-deep pipeline; each thread looks its tokens' page offsets up once per
// tile. Warp w scores keys w, w + 4, ... of the tile: each lane holds head_dim / 32 consecutive
// elements, the dot product is a butterfly warp reduction, and every lane keeps the same
// SoftmaxStats (csrc/core) per row plus its head_dim / 32 slice of the row's accumulator. The
// four warps' states are merged through shared memory at the end. With one split the block
// writes the output and LSE; with more it writes fp32 partials that the merge op's kernel
// (merge_attention_states.cuh) combines. Traffic: the visible K and V once per row block.
// Numerics: fp32 scores, softmax and accumulation; output rounded once.
// Untrusted indices: the host does not check device-resident cache_seqlens / block_table (that
// would synchronise), so the kernel does: a length outside [0, capacity] or a page index outside
// [0, num_pages) among the pages a block reads makes that sequence an error state: nothing
// outside the pool is addressed (the copy is zero-filled instead), and its output rows and LSE
// are NaN (the merge propagates a NaN partial). Other sequences are unaffected.
// Shared memory (DecodeTraits::kSmemBytes): 16-32 KiB, 64 KiB for fp32 with head dim 256.
// kernel-report: dynamic-smem decode_attention_kernel 65536
//
// Tensor-core path (decode_attention_mma_kernel, fp16/bf16, rows = seqlen_q x group >= 16): a
// block owns up to kBlockM = 16 x kMTiles packed query rows (padded with zero rows, masked) of
// one kv head and one split; Q is staged once in shared memory (16-bit), K/V tiles of kBlockN
// keys stream through a 2-stage cp.async pipeline (page offsets per tile and token, bad page =
// zero fill + error state, as above). Warp w takes keys [16w, 16w + 16) of each tile: S = Q.K^T
// with mma.m16n8k16 (Q and K by ldmatrix), online softmax per row in base 2 with the scale folded
// into one FFMA (or decode_score in log2 units for softcap / ALiBi), P rounded to 16 bits as the
// A operand of O += P.V (V by ldmatrix.trans). The warps' states merge through shared memory and
// the output / fp32 partials are written as by the scalar kernel (same merge afterwards).
// kernel-report: dynamic-smem decode_attention_mma_kernel 78336
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include "core/decode_params.h"
#include "core/softmax_state.h"
#include "cuda/compat.cuh"
#include "cuda/merge_attention_states.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/ptx.cuh"

namespace gk::GK_CUDA_NS {

// Compile-time configuration of the decode kernel for one (element type, head dim).
template <class T, int kHeadDim>
struct DecodeTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Each lane owns kPerLane consecutive elements of a row: conflict-free shared-memory reads
  // (a warp reads one contiguous row) and a 5-step shuffle reduction per dot product.
  static_assert(kHeadDim % 32 == 0, "head_dim must be a multiple of 32");
  static constexpr int kPerLane = kHeadDim / 32;
  // Rows per block: q, accumulator and scores of every row stay in registers; fewer rows for
  // the widest head dim so that the kernel does not spill.
  static constexpr int kMaxRows = kHeadDim >= 256 ? 4 : 8;
  // Keys per tile: each warp scores kKeysPerWarp keys of a tile before one softmax update.
  static constexpr int kKeysPerWarp = 4;
  static constexpr int kBlockN = kWarps * kKeysPerWarp;
  static constexpr int kChunk = 16 / int(sizeof(T));  // elements per 16-byte cp.async
  static_assert(kHeadDim % kChunk == 0, "rows must be whole 16-byte chunks");
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kTileBytes = kBlockN * kHeadDim * int(sizeof(T));  // one of K or V
  // Enough stages to keep ~32 KiB of loads in flight per block, at least 2, at most 4.
  static constexpr int kStages = std::max(2, std::min(4, (32 * 1024) / (2 * kTileBytes)));
  static constexpr int kPipelineBytes = kStages * 2 * kTileBytes;
  // Final cross-warp merge: per warp and row, m, d and the unnormalised accumulator (fp32).
  static constexpr int kMergeBytes = kWarps * kMaxRows * (kHeadDim + 2) * 4;
  static constexpr int kSmemBytes = std::max(kPipelineBytes, kMergeBytes);
};

// One lane's kPerLane consecutive elements of a shared-memory row, read as one vector access
// (up to 16 bytes): a warp then reads its row in the fewest shared-memory wavefronts.
template <class T, int E>
struct alignas(E * sizeof(T) >= 16 ? 16 : E * sizeof(T)) LaneSlice {
  T v[E];
};

// K / V tile loader of both decode kernels: issues the 16-byte cp.async copies of keys
// [t0, t0 + rows) of sequence b (kv head at kbase / vbase) into shared-memory rows `ld` elements
// apart at sk / sv. Each thread looks its token's page offsets up once per row chunk it copies
// (not per element); keys at or past `end` are zero-filled, and a bad page index reads nothing
// (zero fill from offset 0) and sets bad_index.
template <class Tr, class T>
__device__ __forceinline__ void load_kv_tile(const DecodeParams& p, int64_t b, const T* kbase, const T* vbase, int64_t t0,
                                             int64_t end, int rows, T* sk, T* sv, int ld, int tid, bool& bad_index) {
  for (int c = tid; c < rows * Tr::kChunksPerRow; c += Tr::kThreads) {
    const int j = c / Tr::kChunksPerRow, col = (c % Tr::kChunksPerRow) * Tr::kChunk;
    const int64_t t = t0 + j;
    bool valid = t < end;
    int64_t koff = 0, voff = 0;
    if (valid) {
      valid = cache_kv_offsets_checked(p, b, t, koff, voff);
      bad_index |= !valid;
    }
    ptx::cp_async_16_zfill(sk + j * ld + col, kbase + koff + col, valid);
    ptx::cp_async_16_zfill(sv + j * ld + col, vbase + voff + col, valid);
  }
}

// Epilogue of both decode kernels, after every warp has left its per-row state in shared memory
// (mstats: m and d per warp and row; macc: the unnormalised accumulators): folds the warps' states
// with SoftmaxStats and writes the block's rows of output and LSE, or the fp32 split partials.
// A block that met an invalid page or length (error_state) writes NaN rows and NaN LSE.
template <class T, int kHeadDim, int kWarps, int kThreads, int kBlockRows>
__device__ __forceinline__ void write_block_rows(const DecodeParams& p, const float* mstats, const float* macc,
                                                 int row0, int64_t R, int64_t G, int b, int kvh, int split,
                                                 bool error_state, int tid) {
  const int64_t rows_total = p.batch * p.seqlen_q * p.heads_q;
  for (int idx = tid; idx < kBlockRows * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    const int64_t row = row0 + r;
    if (row >= R) break;
    SoftmaxStats st;
    float o = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float m2 = mstats[(w * kBlockRows + r) * 2], d2 = mstats[(w * kBlockRows + r) * 2 + 1];
      if (m2 == -INFINITY) continue;
      const MergeFactors f = st.merge(m2, d2);
      o = o * f.self + macc[(w * kBlockRows + r) * kHeadDim + d] * f.other;
    }
    o *= st.inv_denominator();
    const float row_lse = error_state ? NAN : st.lse();
    if (error_state) o = NAN;
    const int64_t s = row / G, h = kvh * G + row % G;
    const int64_t out_row = (int64_t(b) * p.seqlen_q + s) * p.heads_q + h;
    const int64_t lse_idx = (int64_t(b) * p.heads_q + h) * p.seqlen_q + s;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[out_row * kHeadDim + d] = from_float<T>(o);
      if (d == 0 && p.lse) p.lse[lse_idx] = row_lse;
    } else {
      p.partial_out[(split * rows_total + out_row) * kHeadDim + d] = o;
      if (d == 0) p.partial_lse[split * rows_total + lse_idx] = row_lse;
    }
  }
}

template <class T, int kHeadDim>
__global__ void __launch_bounds__(DecodeTraits<T, kHeadDim>::kThreads)
    decode_attention_kernel(const DecodeParams p) {
  using Tr = DecodeTraits<T, kHeadDim>;
  constexpr int E = Tr::kPerLane, kRows = Tr::kMaxRows, kBlockN = Tr::kBlockN;
  GK_DYNAMIC_SMEM(unsigned char, smem);
  const int split = blockIdx.x, b = blockIdx.z;
  const int64_t G = p.group(), R = p.seqlen_q * G;
  const int row_blocks = int((R + kRows - 1) / kRows);
  const int kvh = blockIdx.y / row_blocks, row0 = (blockIdx.y % row_blocks) * kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // An out-of-range length is an error state: read nothing (L = 0), write NaN.
  const int64_t L_raw = p.cache_seqlens[b];
  bool bad_index = L_raw < 0 || L_raw > p.capacity;
  const int64_t L = bad_index ? 0 : L_raw;
  __shared__ int block_bad_index;  // any thread of the block met a bad index (read after a barrier)
  if (tid == 0) block_bad_index = 0;

  // Query rows of this block: q slice in registers, visible key range, ALiBi slope.
  float q[kRows][E];
  int64_t lo[kRows], hi[kRows];
  float slope[kRows];
  SoftmaxStats stats[kRows];
  float acc[kRows][E];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r;
    const bool live = row < R;
    const int64_t s = live ? row / G : 0, h = kvh * G + (live ? row % G : 0);
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2];
#pragma unroll
    for (int e = 0; e < E; ++e) q[r][e] = live ? to_float(qrow[lane * E + e]) : 0.f, acc[r][e] = 0.f;
    const KeyRange kr = visible_keys(p, s, L);
    lo[r] = live ? kr.lo : 0, hi[r] = live ? kr.hi : 0;
    slope[r] = live && p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
  }
  const KeyRange keys = split_range(visible_keys_all_queries(p, L), split, p.num_splits, kBlockN);
  const int64_t num_tiles = (keys.hi - keys.lo + kBlockN - 1) / kBlockN;

  T* ksmem = reinterpret_cast<T*>(smem);
  T* vsmem = ksmem + Tr::kStages * kBlockN * kHeadDim;
  const T* kbase = static_cast<const T*>(p.k) + kvh * p.k_stride[2];
  const T* vbase = static_cast<const T*>(p.v) + kvh * p.v_stride[2];

  // Issues the copies of tile `tile` into stage `stage` (load_kv_tile).
  auto load_tile = [&](int64_t tile, int stage) {
    load_kv_tile<Tr>(p, b, kbase, vbase, keys.lo + tile * kBlockN, keys.hi, kBlockN, ksmem + stage * kBlockN * kHeadDim,
                     vsmem + stage * kBlockN * kHeadDim, kHeadDim, tid, bad_index);
  };

#pragma unroll
  for (int st = 0; st < Tr::kStages - 1; ++st) {
    if (st < num_tiles) load_tile(st, st);
    ptx::cp_async_commit_group();
  }

  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    ptx::cp_async_wait_group<Tr::kStages - 2>();
    __syncthreads();
    const int stage = int(tile % Tr::kStages);
    const int64_t t0 = keys.lo + tile * kBlockN;

    // scores of this warp's keys for every row
    float sc[kRows][Tr::kKeysPerWarp];
    float kv[Tr::kKeysPerWarp][E];
#pragma unroll
    for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) {
      const auto krow = *reinterpret_cast<const LaneSlice<T, E>*>(ksmem + (stage * kBlockN + jj * Tr::kWarps + warp) * kHeadDim + lane * E);
#pragma unroll
      for (int e = 0; e < E; ++e) kv[jj][e] = to_float(krow.v[e]);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot += q[r][e] * kv[jj][e];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const int64_t t = t0 + jj * Tr::kWarps + warp;
        const int64_t pos = (row0 + r) / G + L - p.seqlen_q;
        sc[r][jj] = (t >= lo[r] && t < hi[r] && t < keys.hi) ? decode_score(dot, p.scale, p.softcap, slope[r], pos - t) : -INFINITY;
      }
    }
    // online softmax update per row, then P.V with this warp's keys
#pragma unroll
    for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) {
      const auto vrow = *reinterpret_cast<const LaneSlice<T, E>*>(vsmem + (stage * kBlockN + jj * Tr::kWarps + warp) * kHeadDim + lane * E);
#pragma unroll
      for (int e = 0; e < E; ++e) kv[jj][e] = to_float(vrow.v[e]);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float m_tile = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) m_tile = fmaxf(m_tile, sc[r][jj]);
      if (m_tile == -INFINITY) continue;  // no visible key for this row in this warp's part of the tile
      float d_tile = 0.f;
#pragma unroll
      for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) d_tile += (sc[r][jj] = expf(sc[r][jj] - m_tile));
      const MergeFactors f = stats[r].merge(m_tile, d_tile);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        float x = acc[r][e] * f.self;
#pragma unroll
        for (int jj = 0; jj < Tr::kKeysPerWarp; ++jj) x += (sc[r][jj] * f.other) * kv[jj][e];
        acc[r][e] = x;
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (tile + Tr::kStages - 1 < num_tiles) load_tile(tile + Tr::kStages - 1, int((tile + Tr::kStages - 1) % Tr::kStages));
    ptx::cp_async_commit_group();
  }
  ptx::cp_async_wait_group<0>();
  __syncthreads();
  if (bad_index) block_bad_index = 1;  // after the barrier above: thread 0's reset is done

  // Merge the four warps' states of each row through shared memory.
  float* mstats = reinterpret_cast<float*>(smem);                   // [warp][row][2]
  float* macc = mstats + Tr::kWarps * kRows * 2;                   // [warp][row][kHeadDim]
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) mstats[(warp * kRows + r) * 2] = stats[r].m, mstats[(warp * kRows + r) * 2 + 1] = stats[r].d;
#pragma unroll
    for (int e = 0; e < E; ++e) macc[(warp * kRows + r) * kHeadDim + lane * E + e] = acc[r][e];
  }
  __syncthreads();
  write_block_rows<T, kHeadDim, Tr::kWarps, Tr::kThreads, kRows>(p, mstats, macc, row0, R, G, b, kvh, split,
                                                                  block_bad_index != 0, tid);
}

// ============================================================================ tensor-core path

// Compile-time configuration of the tensor-core decode kernel for one (16-bit type, head dim).
template <class T, int kHeadDim>
struct DecodeMmaTraits {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 or bf16");
  static_assert(kHeadDim % 16 == 0, "head_dim is the k dimension of Q.K^T (k-steps of 16)");
  // Warp w scores and accumulates keys [16w, 16w + 16) of a tile (one k-step of P.V); 2 warps
  // for head dim 256 so that the double-buffered K/V tiles stay below 99 KB of shared memory.
  static constexpr int kWarps = kHeadDim >= 256 ? 2 : 4;
  static constexpr int kThreads = 32 * kWarps;
  // M-tiles of 16 rows per block: every warp holds kMTiles x head_dim / 2 fp32 accumulators per
  // thread (128 at most: 32 rows up to head dim 128, 16 rows for 256).
  static constexpr int kMTiles = kHeadDim >= 256 ? 1 : 2;
  static constexpr int kBlockM = 16 * kMTiles;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kChunk = 8;  // elements per 16-byte cp.async
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  // Rows padded by one 16-byte chunk: an odd number of chunks per row, so ldmatrix (8 rows of
  // 16 bytes at the same column) is conflict-free (as in flash_attention_traits.cuh).
  static constexpr int kLd = kHeadDim + kChunk;
  static_assert((kLd / kChunk) % 2 == 1, "padded row stride must be an odd number of 16-byte chunks");
  static constexpr int kStages = 2;
  static constexpr int kQElems = kBlockM * kLd;
  static constexpr int kTileElems = kBlockN * kLd;
  static constexpr int kPipelineBytes = (kQElems + 2 * kStages * kTileElems) * 2;
  // Final cross-warp merge (reuses the pipeline's memory): per warp and row m, d and the
  // unnormalised accumulator, fp32.
  static constexpr int kMergeBytes = kWarps * kBlockM * (kHeadDim + 2) * 4;
  static constexpr int kSmemBytes = std::max(kPipelineBytes, kMergeBytes);
  static_assert(kSmemBytes <= 99 * 1024, "must fit the opt-in shared memory of every sm_80+ GPU");
  static constexpr int kOutTiles = kHeadDim / 8;
  static constexpr int kQKSteps = kHeadDim / 16;
};


template <class T, int kHeadDim>
__global__ void __launch_bounds__(DecodeMmaTraits<T, kHeadDim>::kThreads, 1)
    decode_attention_mma_kernel(const DecodeParams p) {
  using Tr = DecodeMmaTraits<T, kHeadDim>;
  using namespace mma_fragments;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kLd = Tr::kLd, kMT = Tr::kMTiles, kRowsT = 2 * kMT;
  GK_DYNAMIC_SMEM(unsigned char, smem);
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + Tr::kQElems;
  T* const sV = sK + Tr::kStages * Tr::kTileElems;
  const int split = blockIdx.x, b = blockIdx.z;
  const int64_t G = p.group(), R = p.seqlen_q * G;
  const int row_blocks = int((R + kM - 1) / kM);
  const int kvh = blockIdx.y / row_blocks, row0 = (blockIdx.y % row_blocks) * kM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int live_mt = int(((R - row0 < kM ? R - row0 : kM) + 15) / 16);  // m-tiles holding a live row
  // An out-of-range length is an error state: read nothing (L = 0), write NaN.
  const int64_t L_raw = p.cache_seqlens[b];
  bool bad_index = L_raw < 0 || L_raw > p.capacity;
  const int64_t L = bad_index ? 0 : L_raw;
  __shared__ int block_bad_index;
  if (tid == 0) block_bad_index = 0;

  // Q rows of the block into shared memory as T, zero rows past R (read by ldmatrix every tile).
  for (int idx = tid; idx < kM * kHeadDim; idx += Tr::kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    const int64_t row = row0 + r;
    T x = from_float<T>(0.f);
    if (row < R) {
      const int64_t s = row / G, h = kvh * G + row % G;
      x = static_cast<const T*>(p.q)[b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2] + d];
    }
    sQ[r * kLd + d] = x;
  }

  // This thread's rows (g and g + 8 of each m-tile): visible keys, position, ALiBi slope.
  int row_lo[kRowsT], row_hi[kRowsT], row_pos[kRowsT];
  float row_slope[kRowsT];
#pragma unroll
  for (int i = 0; i < kRowsT; ++i) {
    const int64_t row = row0 + (i / 2) * 16 + g + 8 * (i % 2);
    const bool live = row < R;
    const int64_t s = live ? row / G : 0, h = kvh * G + (live ? row % G : 0);
    const KeyRange kr = visible_keys(p, s, L);
    row_lo[i] = live ? int(kr.lo) : 0, row_hi[i] = live ? int(kr.hi) : 0;
    row_pos[i] = int(s + L - p.seqlen_q);
    row_slope[i] = live && p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
  }
  const KeyRange keys = split_range(visible_keys_all_queries(p, L), split, p.num_splits, kN);
  const int num_tiles = int((keys.hi - keys.lo + kN - 1) / kN);
  const int keys_hi = int(keys.hi);
  const bool general = p.softcap > 0.f || p.alibi_slopes != nullptr || !(p.scale > 0.f);
  const float mult = general ? 1.f : p.scale * kLog2e;

  const T* kbase = static_cast<const T*>(p.k) + kvh * p.k_stride[2];
  const T* vbase = static_cast<const T*>(p.v) + kvh * p.v_stride[2];
  // Issues the copies of tile `tile` into stage `stage` (load_kv_tile).
  auto load_tile = [&](int tile, int stage) {
    load_kv_tile<Tr>(p, b, kbase, vbase, keys.lo + int64_t(tile) * kN, keys.hi, kN, sK + stage * Tr::kTileElems,
                     sV + stage * Tr::kTileElems, kLd, tid, bad_index);
  };

  float acc[kMT][Tr::kOutTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int n = 0; n < Tr::kOutTiles; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  float row_max[kRowsT], row_sum[kRowsT];
#pragma unroll
  for (int i = 0; i < kRowsT; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.f;

  if (num_tiles > 0) load_tile(0, 0);
  ptx::cp_async_commit_group();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile % Tr::kStages;
    if (tile + 1 < num_tiles) load_tile(tile + 1, (tile + 1) % Tr::kStages);
    ptx::cp_async_commit_group();
    ptx::cp_async_wait_group<1>();
    __syncthreads();  // this tile (and Q) written by every thread
    const T* const k_tile = sK + stage * Tr::kTileElems + warp * 16 * kLd;
    const T* const v_tile = sV + stage * Tr::kTileElems + warp * 16 * kLd;
    const int n0 = int(keys.lo) + tile * kN + warp * 16;  // this warp's first key

    // ---- S = Q K^T: kMT x (16 rows x 16 keys) per warp
    float s[kMT][2][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int j = 0; j < 2; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
      // B of the two key n-tiles: matrices (keys 0-7, k 0-7), (keys 0-7, k 8-15), keys + 8.
      uint32_t kb[4];
      ptx::ldmatrix_x4(kb, k_tile + (lane % 8 + (lane / 16) * 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if (mt >= live_mt) break;  // warp-uniform: an m-tile of padding rows only
        uint32_t a[4];
        ptx::ldmatrix_x4(a, sQ + (mt * 16 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
        mma<T>(s[mt][0], a, kb[0], kb[1]);
        mma<T>(s[mt][1], a, kb[2], kb[3]);
      }
    }

    // ---- scores (softcap / ALiBi in log2 units), per-row mask, online softmax (base 2)
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = mt * 2 + e / 2, col = n0 + j * 8 + 2 * t + e % 2;
          float x = s[mt][j][e];
          if (general) x = decode_score(x, p.scale, p.softcap, row_slope[i], int64_t(row_pos[i]) - col) * kLog2e;
          s[mt][j][e] = (col < row_lo[i] || col >= row_hi[i] || col >= keys_hi) ? -INFINITY : x;
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = mt * 2 + r;
        float mx = fmaxf(row_max[i], fmaxf(fmaxf(s[mt][0][2 * r], s[mt][0][2 * r + 1]), fmaxf(s[mt][1][2 * r], s[mt][1][2 * r + 1])));
        mx = quad_max(mx);
        // only masked keys so far: max -inf, subtract 0 so that no exp2(-inf - -inf) makes a NaN
        const float shift = mx == -INFINITY ? 0.f : mx * mult;
        const float alpha = exp2f(row_max[i] * mult - shift);
        row_max[i] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[mt][j][2 * r] = exp2f(fmaf(s[mt][j][2 * r], mult, -shift));
          s[mt][j][2 * r + 1] = exp2f(fmaf(s[mt][j][2 * r + 1], mult, -shift));
          sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
        }
        row_sum[i] = row_sum[i] * alpha + sum;
#pragma unroll
        for (int n = 0; n < Tr::kOutTiles; ++n) acc[mt][n][2 * r] *= alpha, acc[mt][n][2 * r + 1] *= alpha;
      }
    }

    // ---- O += P V: the C fragments of the two key n-tiles are the A fragment of one k-step
    uint32_t pa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      pa[mt][0] = pack<T>(s[mt][0][0], s[mt][0][1]), pa[mt][1] = pack<T>(s[mt][0][2], s[mt][0][3]);
      pa[mt][2] = pack<T>(s[mt][1][0], s[mt][1][1]), pa[mt][3] = pack<T>(s[mt][1][2], s[mt][1][3]);
    }
#pragma unroll
    for (int n = 0; n < Tr::kOutTiles; n += 2) {
      // B of two d-tiles, transposed: matrices (keys 0-7, d n*8..), (keys 8-15, same d), d + 8.
      uint32_t vb[4];
      ptx::ldmatrix_x4_trans(vb, v_tile + (lane % 8 + ((lane / 8) % 2) * 8) * kLd + n * 8 + (lane / 16) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if (mt >= live_mt) break;
        mma<T>(acc[mt][n], pa[mt], vb[0], vb[1]);
        mma<T>(acc[mt][n + 1], pa[mt], vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next prefetch overwrites it
  }
  ptx::cp_async_wait_group<0>();
  __syncthreads();
  if (bad_index) block_bad_index = 1;  // after the barrier above: thread 0's reset is done

  // Merge the warps' states of each row through shared memory (natural-log units, as SoftmaxStats).
  float* mstats = reinterpret_cast<float*>(smem);            // [warp][row][2]
  float* macc = mstats + Tr::kWarps * kM * 2;                // [warp][row][kHeadDim]
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = mt * 2 + r, row = mt * 16 + g + 8 * r;
      const float d = quad_sum(row_sum[i]);
      const float m = row_max[i] == -INFINITY ? -INFINITY : row_max[i] * mult * kLn2;
      if (t == 0) mstats[(warp * kM + row) * 2] = m, mstats[(warp * kM + row) * 2 + 1] = d;
#pragma unroll
      for (int n = 0; n < Tr::kOutTiles; ++n) {
        float* dst = macc + (warp * kM + row) * kHeadDim + n * 8 + 2 * t;
        dst[0] = acc[mt][n][2 * r], dst[1] = acc[mt][n][2 * r + 1];
      }
    }
  __syncthreads();
  write_block_rows<T, kHeadDim, Tr::kWarps, Tr::kThreads, kM>(p, mstats, macc, row0, R, G, b, kvh, split,
                                                               block_bad_index != 0, tid);
}

// Launcher for one head dim. Returns a cudaError_t as int (1 = invalid value for pointers or
// strides that do not allow 16-byte copies); launches nothing for an empty problem.
template <class T, int kHeadDim>
int decode_attention_hd(const DecodeParams& p, void* stream) {
  using Tr = DecodeTraits<T, kHeadDim>;
  constexpr int kInvalidValue = 1;  // cudaErrorInvalidValue
  if (p.batch == 0 || p.seqlen_q == 0) return 0;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  bool ok = p.head_dim == kHeadDim && aligned(p.k) && aligned(p.v);
  for (int i = 0; i < 3; ++i) ok = ok && p.k_stride[i] % Tr::kChunk == 0 && p.v_stride[i] % Tr::kChunk == 0;
  if (!ok) return kInvalidValue;
  const int64_t rows = p.seqlen_q * p.group();
  // Tensor-core path for 16-bit types once the packed rows fill an MMA's 16-row M dimension.
  bool launched = false;
  if constexpr (sizeof(T) == 2) {
    if (rows >= 16) {
      using Mt = DecodeMmaTraits<T, kHeadDim>;
      const int64_t row_blocks = (rows + Mt::kBlockM - 1) / Mt::kBlockM;
      auto kernel = decode_attention_mma_kernel<T, kHeadDim>;
      if (Mt::kSmemBytes > 48 * 1024) {
        if (int err = GK_SET_MAX_DYNAMIC_SMEM(kernel, Mt::kSmemBytes)) return err;
      }
      const dim3 grid(unsigned(p.num_splits), unsigned(p.heads_kv * row_blocks), unsigned(p.batch));
      if (int err = GK_LAUNCH_KERNEL(kernel, grid, dim3(Mt::kThreads), Mt::kSmemBytes, stream, p)) return err;
      launched = true;
    }
  }
  if (!launched) {
    const int64_t row_blocks = (rows + Tr::kMaxRows - 1) / Tr::kMaxRows;
    auto kernel = decode_attention_kernel<T, kHeadDim>;
    if (Tr::kSmemBytes > 48 * 1024) {
      if (int err = GK_SET_MAX_DYNAMIC_SMEM(kernel, Tr::kSmemBytes)) return err;
    }
    const dim3 grid(unsigned(p.num_splits), unsigned(p.heads_kv * row_blocks), unsigned(p.batch));
    if (int err = GK_LAUNCH_KERNEL(kernel, grid, dim3(Tr::kThreads), Tr::kSmemBytes, stream, p)) return err;
  }
  if (p.num_splits == 1) return 0;
  // Split-KV: the merge op's kernel combines the fp32 partials into the output (a split's NaN
  // log-sum-exp, the error state, makes the row NaN there as in the merge op).
  return merge_states<float, T>(split_partials_as_merge_input(p), stream);
}

// The head dims with a compiled kernel; the rows of python/genkernels/tools/instantiations.py
// (DECODE_HEAD_DIMS) must list the same.
#define GK_DECODE_HEAD_DIMS(X) X(64) X(128) X(256)
#define GK_DECODE_EXTERN(D)                                                      \
  extern template int decode_attention_hd<float, D>(const DecodeParams&, void*); \
  extern template int decode_attention_hd<fp16_t, D>(const DecodeParams&, void*); \
  extern template int decode_attention_hd<bf16_t, D>(const DecodeParams&, void*);
GK_DECODE_HEAD_DIMS(GK_DECODE_EXTERN)
#undef GK_DECODE_EXTERN

// Dispatch on head dim; 1 (cudaErrorInvalidValue) for a head dim without a kernel.
template <class T>
int decode_attention(const DecodeParams& p, void* stream) {
#define GK_DECODE_CASE(D) \
  if (p.head_dim == D) return decode_attention_hd<T, D>(p, stream);
  GK_DECODE_HEAD_DIMS(GK_DECODE_CASE)
#undef GK_DECODE_CASE
  return 1;
}

}  // namespace gk::GK_CUDA_NS
