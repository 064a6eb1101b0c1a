// Rotary position embedding (RoPE) of one head_dim row, shared by the KV append and apply_rotary
// on the CPU, in CUDA and in emulation.
//
// cos/sin are (positions, rotary_dim / 2) fp32 tables; dimensions from rotary_dim on pass
// through unchanged. Pairs, as in FlashAttention's apply_rotary_emb:
//   non-interleaved (GPT-NeoX): (x[i], x[i + rotary_dim/2]) for i < rotary_dim/2
//   interleaved (GPT-J):        (x[2i], x[2i + 1])
// each rotated by angle i:  x0' = x0 cos - x1 sin,  x1' = x0 sin + x1 cos  (fp32, rounded once).
#pragma once
#include <cstdint>
#include "core/common.h"
#include "core/numeric.h"

namespace gk {

// Indices of the two elements of rotary pair i.
GK_HOST_DEVICE GK_INLINE void rotary_pair(int64_t i, int64_t rotary_dim, bool interleaved, int64_t& i0, int64_t& i1) {
  if (interleaved) {
    i0 = 2 * i, i1 = 2 * i + 1;
  } else {
    i0 = i, i1 = i + rotary_dim / 2;
  }
}

// Element d (< rotary_dim) of a rotated row, for kernels that give each thread one element.
template <class Tin>
GK_HOST_DEVICE GK_INLINE float rotary_element(const Tin* src, int64_t d, int64_t rotary_dim, bool interleaved,
                                              const float* cos_row, const float* sin_row) {
  const int64_t half = rotary_dim / 2;
  const int64_t i = interleaved ? d / 2 : (d < half ? d : d - half);
  const bool first = interleaved ? d % 2 == 0 : d < half;
  int64_t i0, i1;
  rotary_pair(i, rotary_dim, interleaved, i0, i1);
  const float x0 = to_float(src[i0]), x1 = to_float(src[i1]), c = cos_row[i], s = sin_row[i];
  return first ? x0 * c - x1 * s : x0 * s + x1 * c;
}

// Writes the rotated `src` row to `dst` (which may alias `src`); cos_row/sin_row are the table
// rows of this token's position. Scalar: the rows are short and the op is memory bound.
template <class Tin, class Tout>
GK_HOST_DEVICE GK_INLINE void rotary_row(const Tin* src, Tout* dst, int64_t head_dim, int64_t rotary_dim, bool interleaved,
                                         const float* cos_row, const float* sin_row) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    int64_t i0, i1;
    rotary_pair(i, rotary_dim, interleaved, i0, i1);
    const float x0 = to_float(src[i0]), x1 = to_float(src[i1]);
    const float c = cos_row[i], s = sin_row[i];
    dst[i0] = from_float<Tout>(x0 * c - x1 * s);
    dst[i1] = from_float<Tout>(x0 * s + x1 * c);
  }
  for (int64_t d = rotary_dim; d < head_dim; ++d) dst[d] = from_float<Tout>(to_float(src[d]));
}

}  // namespace gk
