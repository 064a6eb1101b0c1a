// CUDA kernels + launchers: KV-cache append with fused rotary embedding, and apply_rotary.
//
// One block per new token and kv head (append) or per token and head (apply_rotary), one thread
// per element: reads the row, rotates the key elements with csrc/core/rotary.h at the token's
// position (cache_seqlens[b] + s, read on the device) and writes the cache row found through
// the page table. A second one-block kernel then advances cache_seqlens, after every row has
// read its old value (kernels on one stream run in order). Memory bound; no shared memory.
// Untrusted indices: the host does not read device-resident cache_seqlens / block_table (that
// would synchronise), so each block checks its sequence (append_in_range: length, capacity,
// rotary table, every page the append writes): a sequence out of range writes nothing and its
// cache_seqlens entry is not advanced; other sequences proceed. apply_rotary writes a NaN row
// for a position outside the cos/sin table.
#pragma once
#include <cstdint>
#include "core/decode_params.h"
#include "core/rotary.h"
#include "cuda/compat.cuh"

namespace gk::GK_CUDA_NS {

template <class T>
__global__ void __launch_bounds__(128) append_kv_kernel(const AppendKVParams p) {
  const int64_t b = blockIdx.z, s = blockIdx.y, h = blockIdx.x;
  if (!append_in_range(p, b)) return;  // all of the sequence's writes or none (uniform per block)
  const int64_t t = int64_t(p.cache_seqlens[b]) + s;
  const T* ksrc = static_cast<const T*>(p.k_new) + b * p.k_new_stride[0] + s * p.k_new_stride[1] + h * p.k_new_stride[2];
  const T* vsrc = static_cast<const T*>(p.v_new) + b * p.v_new_stride[0] + s * p.v_new_stride[1] + h * p.v_new_stride[2];
  int64_t koff, voff;
  cache_kv_offsets(p, b, t, koff, voff);
  T* kdst = static_cast<T*>(p.k) + koff + h * p.k_stride[2];
  T* vdst = static_cast<T*>(p.v) + voff + h * p.v_stride[2];
  const int64_t half = p.rotary_dim / 2;
  for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    const float k = d < p.rotary_dim ? rotary_element(ksrc, d, p.rotary_dim, p.rotary_interleaved, p.rotary_cos + t * half, p.rotary_sin + t * half)
                                     : to_float(ksrc[d]);
    kdst[d] = from_float<T>(k);
    vdst[d] = vsrc[d];
  }
}

// Runs after append_kv_kernel on the stream, so every block has read the old lengths; the same
// range check decides, so a sequence that was not written is not advanced.
template <class T>  // T only keeps one definition per instantiation unit
__global__ void __launch_bounds__(256) advance_seqlens_kernel(const AppendKVParams p) {
  for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x)
    if (append_in_range(p, b)) p.cache_seqlens[b] += int32_t(p.seqlen_new);
}

template <class T>
__global__ void __launch_bounds__(128) apply_rotary_kernel(const RotaryParams p) {
  const int64_t b = blockIdx.z, s = blockIdx.y, h = blockIdx.x;
  const int64_t pos = p.positions[b * p.positions_stride[0] + s * p.positions_stride[1]];
  const T* src = static_cast<const T*>(p.x) + b * p.x_stride[0] + s * p.x_stride[1] + h * p.x_stride[2];
  T* dst = static_cast<T*>(p.out) + ((b * p.seqlen + s) * p.heads + h) * p.head_dim;
  const int64_t half = p.rotary_dim / 2;
  if (pos < 0 || pos >= p.rotary_positions) {  // outside the table: an error row, no table read
    for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) dst[d] = from_float<T>(NAN);
    return;
  }
  for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x)
    dst[d] = d < p.rotary_dim ? from_float<T>(rotary_element(src, d, p.rotary_dim, p.interleaved, p.cos + pos * half, p.sin + pos * half))
                              : src[d];
}

// Launchers: return a cudaError_t as int; launch nothing for an empty problem.
template <class T>
int append_kv_cache(const AppendKVParams& p, void* stream) {
  if (p.batch == 0) return 0;
  if (p.seqlen_new > 0 && p.heads_kv > 0) {
    auto kernel = append_kv_kernel<T>;
    const dim3 grid(unsigned(p.heads_kv), unsigned(p.seqlen_new), unsigned(p.batch));
    if (int err = GK_LAUNCH_KERNEL(kernel, grid, dim3(128), 0, stream, p)) return err;
  }
  if (!p.advance_seqlens || p.seqlen_new == 0) return 0;
  auto advance = advance_seqlens_kernel<T>;
  return GK_LAUNCH_KERNEL(advance, dim3(1), dim3(256), 0, stream, p);
}

template <class T>
int apply_rotary(const RotaryParams& p, void* stream) {
  if (p.batch * p.seqlen * p.heads == 0) return 0;
  auto kernel = apply_rotary_kernel<T>;
  const dim3 grid(unsigned(p.heads), unsigned(p.seqlen), unsigned(p.batch));
  return GK_LAUNCH_KERNEL(kernel, grid, dim3(128), 0, stream, p);
}

}  // namespace gk::GK_CUDA_NS
