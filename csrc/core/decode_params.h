// Parameters of KV-cache decode attention and of the KV append, shared by the CPU kernels, the
// CUDA kernels and their emulation; plus the masking and scoring rules of one (query, key) pair,
// written once here so every path applies them identically.
//
// Decode: q (batch, seqlen_q, heads_q, head_dim) against the first cache_seqlens[b] keys of
// sequence b. Cache layouts (token axis = 1, head_dim contiguous):
//   contiguous  k/v (batch, capacity, heads_kv, head_dim), block_table == nullptr
//   paged       k/v (num_pages, page_size, heads_kv, head_dim) with block_table (batch, max_pages)
// Query i of sequence b sits at position i + L - seqlen_q (L = cache_seqlens[b]): causal masking
// and windows are aligned to the bottom-right corner, as in FlashAttention.
// Score of a visible pair: s = scale * q.k, or softcap * tanh(scale * q.k / softcap), then
// minus slope * |pos_q - j| with ALiBi.
#pragma once
#include <cmath>
#include <cstdint>
#include "core/common.h"
#include "core/merge_params.h"

namespace gk {

struct DecodeParams {
  const void* q = nullptr;
  int64_t q_stride[3] = {};  // (batch, seqlen_q, head), elements
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride[3] = {};  // (batch or page, token, head)
  int64_t v_stride[3] = {};
  const int32_t* block_table = nullptr;  // null: contiguous cache
  int64_t block_table_stride = 0;        // elements between rows of block_table
  int64_t page_size = 0;                 // paged: tokens per page (power of two)
  int64_t capacity = 0;                  // tokens a sequence may hold (max_pages * page_size, or max_seqlen)
  int64_t num_pages = 0;                 // paged: pages in the pool (valid block_table entries are [0, num_pages))
  const int32_t* cache_seqlens = nullptr;
  const float* alibi_slopes = nullptr;   // (batch, heads_q) with alibi_batch_stride (0: one row for all), or null
  int64_t alibi_batch_stride = 0;

  void* out = nullptr;       // (batch, seqlen_q, heads_q, head_dim) contiguous
  float* lse = nullptr;      // (batch, heads_q, seqlen_q) contiguous, may be null
  // Split-KV workspace (num_splits > 1): fp32 partial outputs (num_splits, batch, seqlen_q,
  // heads_q, head_dim) and their log-sum-exps (num_splits, batch, heads_q, seqlen_q), contiguous.
  float* partial_out = nullptr;
  float* partial_lse = nullptr;

  int64_t batch = 0, seqlen_q = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int num_splits = 1;
  float scale = 1.f;
  float softcap = 0.f;  // 0: none
  bool causal = true;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded

  GK_HOST_DEVICE int64_t group() const { return heads_q / heads_kv; }
  GK_HOST_DEVICE bool paged() const { return block_table != nullptr; }
};

// The visible key range [lo, hi) of query i of a sequence with L keys (may be empty).
struct KeyRange {
  int64_t lo, hi;
};
GK_HOST_DEVICE GK_INLINE KeyRange visible_keys(const DecodeParams& p, int64_t i, int64_t L) {
  const int64_t pos = i + L - p.seqlen_q;  // this query's position among the keys
  int64_t lo = 0, hi = L;
  if (p.window_left >= 0) lo = pos - p.window_left > 0 ? pos - p.window_left : 0;
  const int64_t right = p.causal ? 0 : p.window_right;  // causal = a right window of 0, as in FlashAttention
  if (right >= 0) hi = pos + right + 1 < L ? pos + right + 1 : L;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

// The keys any query of a sequence can see: the union of the rows' ranges. Both ends move
// forward with the row, so the first non-empty row gives the start and the last row the end.
GK_HOST_DEVICE GK_INLINE KeyRange visible_keys_all_queries(const DecodeParams& p, int64_t L) {
  const KeyRange last = visible_keys(p, p.seqlen_q - 1, L);
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    const KeyRange r = visible_keys(p, i, L);
    if (r.hi > r.lo) return {r.lo, last.hi};
  }
  return {0, 0};
}

// Final score from a raw dot product q.k (softcap, then ALiBi). `slope` is 0 without ALiBi.
GK_HOST_DEVICE GK_INLINE float decode_score(float dot, float scale, float softcap, float slope, int64_t distance) {
  float s = dot * scale;
  if (softcap > 0.f) s = softcap * tanhf(s / softcap);
  return s - slope * float(distance < 0 ? -distance : distance);
}

// Keys [lo, hi) handled by split `split` of `num_splits` over a visible range; chunks are whole
// multiples of `align` keys (a page, or a CUDA tile) so no tile straddles two splits.
GK_HOST_DEVICE GK_INLINE KeyRange split_range(KeyRange r, int split, int num_splits, int64_t align) {
  const int64_t n = r.hi - r.lo;
  int64_t chunk = (n + num_splits - 1) / num_splits;
  chunk = (chunk + align - 1) / align * align;
  // lo clamped to the end first: a split past the end is empty ({r.hi, r.hi}), never a range
  // reaching beyond the visible keys
  const int64_t lo = r.lo + chunk * split < r.hi ? r.lo + chunk * split : r.hi;
  const int64_t hi = lo + chunk < r.hi ? lo + chunk : r.hi;
  return {lo, hi};
}

// The split-KV partials as the merge op's input (core/merge_params.h): partial sp of row
// (b, s, h) at partial_out[sp][b][s][h][:] (fp32) with log-sum-exp partial_lse[sp][b][h][s]; the
// destination is the decode output and LSE. Both the CPU and the CUDA decode kernels combine
// their splits with the merge kernel through this.
inline MergeStatesParams split_partials_as_merge_input(const DecodeParams& p) {
  const int64_t Sq = p.seqlen_q, Hq = p.heads_q, D = p.head_dim, rows = p.batch * Sq * Hq;
  MergeStatesParams m;
  m.num_partials = p.num_splits;
  m.out_first = p.partial_out, m.out_rest = p.partial_out + rows * D, m.out_partial_stride = rows * D;
  m.lse_first = p.partial_lse, m.lse_rest = p.partial_lse + rows, m.lse_partial_stride = rows;
  m.batch = p.batch, m.seqlen = Sq, m.heads = Hq, m.head_dim = D;
  const int64_t out_stride[3] = {Sq * Hq * D, Hq * D, D}, lse_stride[3] = {Hq * Sq, Sq, 1};
  for (int i = 0; i < 3; ++i) {
    m.out_first_stride[i] = m.out_rest_stride[i] = out_stride[i];
    m.lse_first_stride[i] = m.lse_rest_stride[i] = lse_stride[i];
  }
  m.dst_out = p.out, m.dst_lse = p.lse;
  return m;
}

// KV append: k_new/v_new (batch, seqlen_new, heads_kv, head_dim) written at token
// cache_seqlens[b] + s of sequence b, with rotary embedding applied to the keys.
struct AppendKVParams {
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_new_stride[3] = {};  // (batch, seqlen, head)
  int64_t v_new_stride[3] = {};
  void* k = nullptr;
  void* v = nullptr;
  int64_t k_stride[3] = {};  // cache, as in DecodeParams
  int64_t v_stride[3] = {};
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t page_size = 0;
  int64_t capacity = 0;
  int64_t num_pages = 0;
  int32_t* cache_seqlens = nullptr;  // advanced by seqlen_new when advance_seqlens
  bool advance_seqlens = true;
  int64_t batch = 0, seqlen_new = 0, heads_kv = 0, head_dim = 0;
  // Rotary: cos/sin (rotary_positions, rotary_dim / 2) fp32 contiguous; rotary_dim 0 = none.
  const float* rotary_cos = nullptr;
  const float* rotary_sin = nullptr;
  int64_t rotary_dim = 0;
  int64_t rotary_positions = 0;
  bool rotary_interleaved = false;
};

// apply_rotary: x (batch, seqlen, heads, head_dim) rotated at positions[b, s] into `out`
// (contiguous, same shape); cos/sin as in AppendKVParams.
struct RotaryParams {
  const void* x = nullptr;
  int64_t x_stride[3] = {};  // (batch, seqlen, head)
  void* out = nullptr;
  const int32_t* positions = nullptr;
  int64_t positions_stride[2] = {};  // (batch, seqlen)
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t rotary_dim = 0;
  int64_t rotary_positions = 0;  // rows of cos/sin; CUDA writes NaN rows for positions outside [0, rows)
  bool interleaved = false;
  int64_t batch = 0, seqlen = 0, heads = 0, head_dim = 0;
};

// log2 of a power-of-two page size: token t sits in page slot t >> shift, at row t & (size - 1).
GK_HOST_DEVICE GK_INLINE int page_shift(int64_t page_size) {
#if defined(__CUDA_ARCH__)
  return __ffsll(page_size) - 1;
#else
  return __builtin_ctzll(static_cast<unsigned long long>(page_size));
#endif
}

// Token `t` of sequence `b` in a cache: the element offset of its (token, head 0) row.
GK_HOST_DEVICE GK_INLINE int64_t cache_token_offset(const int32_t* block_table, int64_t block_table_stride,
                                                    int64_t page_size, const int64_t (&stride)[3], int64_t b,
                                                    int64_t t) {
  if (!block_table) return b * stride[0] + t * stride[1];
  // page_size is a power of two (checked by the bindings): shift and mask, no 64-bit division
  const int shift = page_shift(page_size);
  const int64_t page = block_table[b * block_table_stride + (t >> shift)];
  return page * stride[0] + (t & (page_size - 1)) * stride[1];
}

// As cache_token_offset, for kernels that cannot trust the indices (CUDA: the host does not read
// device-resident cache_seqlens / block_table, that would synchronise). The caller guarantees
// t < capacity (so the block_table row is in range); a page outside [0, num_pages) returns false
// and leaves `offset` at 0, so nothing outside the pool is ever addressed.
GK_HOST_DEVICE GK_INLINE bool cache_token_offset_checked(const int32_t* block_table, int64_t block_table_stride,
                                                         int64_t page_size, int64_t num_pages, const int64_t (&stride)[3],
                                                         int64_t b, int64_t t, int64_t& offset) {
  offset = 0;
  if (!block_table) {
    offset = b * stride[0] + t * stride[1];
    return true;
  }
  const int shift = page_shift(page_size);
  const int64_t page = block_table[b * block_table_stride + (t >> shift)];
  if (page < 0 || page >= num_pages) return false;
  offset = page * stride[0] + (t & (page_size - 1)) * stride[1];
  return true;
}

// Element offsets (head 0) of token t of sequence b in the K and V caches of a decode or append
// call (DecodeParams, AppendKVParams): the one place that pairs the key and value lookups.
template <class P>
GK_HOST_DEVICE GK_INLINE void cache_kv_offsets(const P& p, int64_t b, int64_t t, int64_t& koff, int64_t& voff) {
  koff = cache_token_offset(p.block_table, p.block_table_stride, p.page_size, p.k_stride, b, t);
  voff = cache_token_offset(p.block_table, p.block_table_stride, p.page_size, p.v_stride, b, t);
}

// The checked form (cache_token_offset_checked): false, with both offsets 0, when the token's
// page index is outside [0, num_pages).
template <class P>
GK_HOST_DEVICE GK_INLINE bool cache_kv_offsets_checked(const P& p, int64_t b, int64_t t, int64_t& koff, int64_t& voff) {
  voff = 0;
  return cache_token_offset_checked(p.block_table, p.block_table_stride, p.page_size, p.num_pages, p.k_stride, b, t, koff) &&
         cache_token_offset_checked(p.block_table, p.block_table_stride, p.page_size, p.num_pages, p.v_stride, b, t, voff);
}

// Whether an append of seqlen_new tokens to sequence b is in range: 0 <= L, L + seqlen_new <=
// capacity (and <= the rotary table's positions), every page it writes a valid page index. The
// CUDA append checks this per sequence on the device: all of a sequence's writes or none.
GK_HOST_DEVICE GK_INLINE bool append_in_range(const AppendKVParams& p, int64_t b) {
  const int64_t L = p.cache_seqlens[b], end = L + p.seqlen_new;
  if (L < 0 || end > p.capacity || (p.rotary_dim > 0 && end > p.rotary_positions)) return false;
  if (!p.block_table || p.seqlen_new == 0) return true;
  for (int64_t i = L / p.page_size; i <= (end - 1) / p.page_size; ++i) {
    const int32_t page = p.block_table[b * p.block_table_stride + i];
    if (page < 0 || page >= p.num_pages) return false;
  }
  return true;
}

}  // namespace gk
