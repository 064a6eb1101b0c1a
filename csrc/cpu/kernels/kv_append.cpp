// CPU kernels: KV-cache append with fused rotary embedding, and apply_rotary.
//
// append_kv_cache writes k_new/v_new (batch, seqlen_new, heads_kv, head_dim) at tokens
// cache_seqlens[b] .. + seqlen_new of each sequence (contiguous or paged cache), rotating the
// keys with csrc/core/rotary.h at those positions, then advances cache_seqlens. The caller
// (bindings) has checked capacity and page indices for every sequence before this runs, so a
// bad call writes nothing. One pass over the new tokens: memory bound, scalar math.
// apply_rotary rotates x (batch, seqlen, heads, head_dim) at per-token positions into `out`.
#include <algorithm>
#include "core/decode_params.h"
#include "core/rotary.h"
#include "cpu/kernels.h"

namespace gk::cpu::GK_CPU_ISA_NS {

template <class T>
void append_kv_cache(const AppendKVParams& p, int num_threads) {
  const int64_t items = p.batch * p.seqlen_new * p.heads_kv;
  const int64_t S = p.seqlen_new, H = p.heads_kv, D = p.head_dim;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (items * D > 65536)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / (S * H), s = (i / H) % S, h = i % H;
    const int64_t t = int64_t(p.cache_seqlens[b]) + s;
    const T* ksrc = static_cast<const T*>(p.k_new) + b * p.k_new_stride[0] + s * p.k_new_stride[1] + h * p.k_new_stride[2];
    const T* vsrc = static_cast<const T*>(p.v_new) + b * p.v_new_stride[0] + s * p.v_new_stride[1] + h * p.v_new_stride[2];
    int64_t koff, voff;
    cache_kv_offsets(p, b, t, koff, voff);
    T* kdst = static_cast<T*>(p.k) + koff + h * p.k_stride[2];
    T* vdst = static_cast<T*>(p.v) + voff + h * p.v_stride[2];
    if (p.rotary_dim > 0) {
      const int64_t half = p.rotary_dim / 2;
      rotary_row(ksrc, kdst, D, p.rotary_dim, p.rotary_interleaved, p.rotary_cos + t * half, p.rotary_sin + t * half);
    } else {
      std::copy(ksrc, ksrc + D, kdst);
    }
    std::copy(vsrc, vsrc + D, vdst);
  }
  if (p.advance_seqlens)
    for (int64_t b = 0; b < p.batch; ++b) p.cache_seqlens[b] += int32_t(S);
}

template <class T>
void apply_rotary(const RotaryParams& p, int num_threads) {
  const int64_t items = p.batch * p.seqlen * p.heads;
  const int64_t S = p.seqlen, H = p.heads, half = p.rotary_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (items * p.head_dim > 65536)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / (S * H), s = (i / H) % S, h = i % H;
    const int64_t pos = int64_t(p.positions[b * p.positions_stride[0] + s * p.positions_stride[1]]);
    const T* src = static_cast<const T*>(p.x) + b * p.x_stride[0] + s * p.x_stride[1] + h * p.x_stride[2];
    T* dst = static_cast<T*>(p.out) + i * p.head_dim;
    rotary_row(src, dst, p.head_dim, p.rotary_dim, p.interleaved, p.cos + pos * half, p.sin + pos * half);
  }
}

template void append_kv_cache<float>(const AppendKVParams&, int);
template void append_kv_cache<fp16_t>(const AppendKVParams&, int);
template void append_kv_cache<bf16_t>(const AppendKVParams&, int);
template void apply_rotary<float>(const RotaryParams&, int);
template void apply_rotary<fp16_t>(const RotaryParams&, int);
template void apply_rotary<bf16_t>(const RotaryParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
