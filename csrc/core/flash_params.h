// Parameters of flash attention forward (prefill), shared by the CPU kernel, the CUDA kernel and
// its emulation; plus the masking and scoring rules of one (query, key) pair, written once here so
// that every implementation applies them identically. No torch, no CUDA runtime.
//
// Layouts (strides in elements, head_dim contiguous):
//   dense   q (batch, seqlen_q, heads_q, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim),
//           out like q, lse (batch, heads_q, seqlen_q) fp32.
//   varlen  q (total_q, heads_q, head_dim), k/v (total_k, heads_kv, head_dim); sequence b owns
//           tokens [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q (same for k with cu_seqlens_k).
//           The batch strides are then 0 and the token axis is the global token index;
//           lse is (heads_q, total_q), again with batch stride 0.
// The token of row i of sequence b is at  base + b * stride[0] + (offset_b + i) * stride[1]
// + h * stride[2], offset_b = cu_seqlens[b] (varlen) or 0, for q, k, v, out; lse likewise with
// (batch, head, token) strides.
//
// Semantics (FlashAttention-2): query i of a sequence with sq queries and sk keys sits at key
// position i + sk - sq (bottom-right alignment). It sees key j iff
//   pos - window_left <= j <= pos + window_right   (a bound of -1 is unbounded; causal = right 0)
// Score of a visible pair: s = scale * q.k, or softcap * tanh(scale * q.k / softcap) when
// softcap > 0, then minus slope_h * |pos - j| with ALiBi. A row that sees no key gives output 0
// and lse -inf.
#pragma once
#include <cmath>
#include <cstdint>
#include "core/common.h"

namespace gk {

struct FlashParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // may be null: no lse wanted
  int64_t q_stride[3] = {};    // (batch, token, head)
  int64_t k_stride[3] = {};
  int64_t v_stride[3] = {};
  int64_t out_stride[3] = {};
  int64_t lse_stride[3] = {};  // (batch, head, token)

  // Varlen: batch + 1 int32 offsets each (both null for the dense layout).
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  // ALiBi slopes, fp32 (batch, heads_q) with alibi_batch_stride (0: one row for every sequence),
  // or null.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // Dense: the sequence lengths. Varlen: upper bounds (max_seqlen_q, max_seqlen_k).
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  float scale = 1.f;
  float softcap = 0.f;  // 0: none
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded (causal forces window_right = 0)

  GK_HOST_DEVICE bool varlen() const { return cu_seqlens_q != nullptr; }
  GK_HOST_DEVICE int64_t group() const { return heads_q / heads_kv; }
  GK_HOST_DEVICE int64_t q_offset(int64_t b) const { return varlen() ? cu_seqlens_q[b] : 0; }
  GK_HOST_DEVICE int64_t k_offset(int64_t b) const { return varlen() ? cu_seqlens_k[b] : 0; }
  GK_HOST_DEVICE int64_t seqlen_q_of(int64_t b) const { return varlen() ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  GK_HOST_DEVICE int64_t seqlen_k_of(int64_t b) const { return varlen() ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k; }
  GK_HOST_DEVICE int64_t right_bound() const { return causal ? 0 : window_right; }
  GK_HOST_DEVICE float alibi_slope(int64_t b, int64_t h) const {
    return alibi_slopes ? alibi_slopes[b * alibi_batch_stride + h] : 0.f;
  }
};

// The keys [lo, hi) that query i of a sequence (sq queries, sk keys) sees; hi <= lo when none.
// lo and hi are non-decreasing in i, so the keys a block of consecutive queries [i0, i1) sees
// are [lo(i0), hi(i1 - 1)), and every key of [lo(i1 - 1), hi(i0)) is seen by all of them.
struct FlashKeyRange {
  int64_t lo, hi;
  GK_HOST_DEVICE bool empty() const { return hi <= lo; }
};
GK_HOST_DEVICE GK_INLINE FlashKeyRange flash_key_range(const FlashParams& p, int64_t i, int64_t sq, int64_t sk) {
  const int64_t pos = i + sk - sq;
  int64_t lo = 0, hi = sk;
  if (p.window_left >= 0 && pos - p.window_left > lo) lo = pos - p.window_left;
  const int64_t right = p.right_bound();
  if (right >= 0 && pos + right + 1 < hi) hi = pos + right + 1;
  return {lo, hi};
}

// Final score of a visible pair from the raw dot product q.k; `slope` is 0 without ALiBi and
// `distance` is pos - j.
GK_HOST_DEVICE GK_INLINE float flash_score(float dot, float scale, float softcap, float slope, int64_t distance) {
  float s = dot * scale;
  if (softcap > 0.f) s = softcap * tanhf(s / softcap);
  return s - slope * float(distance < 0 ? -distance : distance);
}

}  // namespace gk
