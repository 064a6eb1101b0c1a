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
// writes the output and LSE; with more it writes fp32 partials that decode_combine_kernel
// merges (SoftmaxStats again, as the merge op). Traffic: the visible K and V once per row block.
// Numerics: fp32 scores, softmax and accumulation; output rounded once.
// Untrusted indices: the host does not check device-resident cache_seqlens / block_table (that
// would synchronise), so the kernel does: a length outside [0, capacity] or a page index outside
// [0, num_pages) among the pages a block reads makes that sequence an error state: nothing
// outside the pool is addressed (the copy is zero-filled instead), and its output rows and LSE
// are NaN (the combine propagates a NaN partial). Other sequences are unaffected.
// Shared memory (DecodeTraits::kSmemBytes): 16-32 KiB, 64 KiB for fp32 with head dim 256.
// kernel-report: dynamic-smem decode_attention_kernel 65536
#pragma once
#include <algorithm>
#include <cstdint>
#include "core/decode_params.h"
#include "core/softmax_state.h"
#include "cuda/compat.cuh"
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

  // Issues the copies of tile `tile` into stage `stage`; keys past the split are zero-filled.
  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t t0 = keys.lo + tile * kBlockN;
    for (int c = tid; c < kBlockN * Tr::kChunksPerRow; c += Tr::kThreads) {
      const int j = c / Tr::kChunksPerRow, col = (c % Tr::kChunksPerRow) * Tr::kChunk;
      const int64_t t = t0 + j;
      bool valid = t < keys.hi;
      // page offset looked up once per tile and token by this thread (not per element); a bad
      // page index reads nothing (zero fill from offset 0) and flags the block
      int64_t koff = 0, voff = 0;
      if (valid) {
        valid = cache_token_offset_checked(p.block_table, p.block_table_stride, p.page_size, p.num_pages, p.k_stride, b, t, koff);
        valid = valid && cache_token_offset_checked(p.block_table, p.block_table_stride, p.page_size, p.num_pages, p.v_stride, b, t, voff);
        bad_index |= !valid;
      }
      T* kdst = ksmem + (stage * kBlockN + j) * kHeadDim + col;
      T* vdst = vsmem + (stage * kBlockN + j) * kHeadDim + col;
      ptx::cp_async_16_zfill(kdst, kbase + koff + col, valid);
      ptx::cp_async_16_zfill(vdst, vbase + voff + col, valid);
    }
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
  const bool error_state = block_bad_index != 0;
  const int64_t rows_total = p.batch * p.seqlen_q * p.heads_q;
  for (int idx = tid; idx < kRows * kHeadDim; idx += Tr::kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    const int64_t row = row0 + r;
    if (row >= R) break;
    SoftmaxStats st;
    float o = 0.f;
    for (int w = 0; w < Tr::kWarps; ++w) {
      const float m2 = mstats[(w * kRows + r) * 2], d2 = mstats[(w * kRows + r) * 2 + 1];
      if (m2 == -INFINITY) continue;
      const MergeFactors f = st.merge(m2, d2);
      o = o * f.self + macc[(w * kRows + r) * kHeadDim + d] * f.other;
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

// Combines the fp32 split partials into the output: one thread per output element.
template <class T>
__global__ void __launch_bounds__(256) decode_combine_kernel(const DecodeParams p) {
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q, D = p.head_dim;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < rows * D; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / D, d = idx % D;
    const int64_t h = row % p.heads_q, s = (row / p.heads_q) % p.seqlen_q, b = row / (p.heads_q * p.seqlen_q);
    const int64_t lse_idx = (b * p.heads_q + h) * p.seqlen_q + s;
    SoftmaxStats st;
    bool error_state = false;  // a split met a bad index (NaN LSE): the row is NaN, not that split dropped
    for (int sp = 0; sp < p.num_splits; ++sp) {
      const float lse = p.partial_lse[sp * rows + lse_idx];
      error_state |= lse != lse;
      st.merge_partial(lse);
    }
    const float inv_d = st.inv_denominator();
    float o = 0.f;
    for (int sp = 0; sp < p.num_splits; ++sp) {
      const float lse = p.partial_lse[sp * rows + lse_idx];
      if (lse == -INFINITY) continue;
      o += st.partial_weight(lse, inv_d) * p.partial_out[(sp * rows + row) * D + d];
    }
    static_cast<T*>(p.out)[idx] = from_float<T>(error_state ? NAN : o);
    if (d == 0 && p.lse) p.lse[lse_idx] = error_state ? NAN : st.lse();
  }
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
  const int64_t row_blocks = (rows + Tr::kMaxRows - 1) / Tr::kMaxRows;
  auto kernel = decode_attention_kernel<T, kHeadDim>;
  if (Tr::kSmemBytes > 48 * 1024) {
    if (int err = GK_SET_MAX_DYNAMIC_SMEM(kernel, Tr::kSmemBytes)) return err;
  }
  const dim3 grid(unsigned(p.num_splits), unsigned(p.heads_kv * row_blocks), unsigned(p.batch));
  if (int err = GK_LAUNCH_KERNEL(kernel, grid, dim3(Tr::kThreads), Tr::kSmemBytes, stream, p)) return err;
  if (p.num_splits == 1) return 0;
  const int64_t total = p.batch * rows * p.heads_kv * p.head_dim;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, int64_t(1) << 16);
  auto combine = decode_combine_kernel<T>;
  return GK_LAUNCH_KERNEL(combine, dim3(unsigned(blocks)), dim3(256), 0, stream, p);
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
