// Parameters of the merge of partial attention states (log-sum-exp weighted combine).
//
// Partial p (0 <= p < num_partials) of row (b, s, h) is the head_dim-vector
//   out_p[b, s, h, :] with log-sum-exp lse_p[b, h, s].
// Partial 0 lives at `out_first`/`lse_first`; partials 1.. live at `out_rest`/`lse_rest`, one
// after another at `*_partial_stride` elements. The pair form (a, b) and the stacked form
// (N, ...) both map onto this without a copy. Strides are in elements; the head_dim axis is
// contiguous. The destination is contiguous: out (batch, seqlen, heads, head_dim), lse
// (batch, heads, seqlen); dst_lse may be null.
#pragma once
#include <cstdint>
#include "core/common.h"

namespace gk {

struct MergeStatesParams {
  const void* out_first = nullptr;
  const void* out_rest = nullptr;
  const float* lse_first = nullptr;
  const float* lse_rest = nullptr;
  int64_t num_partials = 0;
  int64_t out_partial_stride = 0;
  int64_t lse_partial_stride = 0;
  int64_t batch = 0, seqlen = 0, heads = 0, head_dim = 0;
  int64_t out_first_stride[3] = {};  // (batch, seqlen, heads)
  int64_t out_rest_stride[3] = {};
  int64_t lse_first_stride[3] = {};  // (batch, heads, seqlen)
  int64_t lse_rest_stride[3] = {};
  void* dst_out = nullptr;
  float* dst_lse = nullptr;

  GK_HOST_DEVICE int64_t rows() const { return batch * seqlen * heads; }
};

}  // namespace gk
