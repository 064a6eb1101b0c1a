// CPU kernel: merge of partial attention states (log-sum-exp weighted combine).
//
// Work: one row (b, s, h) at a time (merge::merge_row, cpu/kernels/merge_row.h), rows split
// statically across OpenMP threads. Traffic: N * D * sizeof(T) read + D * sizeof(T) written
// per row; the op is memory bound, so the arithmetic is kept simple.
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include "cpu/kernels.h"
#include "cpu/kernels/merge_row.h"

namespace gk::cpu::GK_CPU_ISA_NS {

template <class T>
void merge_attention_states(const MergeStatesParams& p, int num_threads) {
  const int64_t rows = p.rows();
  const int64_t S = p.seqlen, H = p.heads, D = p.head_dim;
  T* dst = static_cast<T*>(p.dst_out);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * D * p.num_partials > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (S * H), s = (r / H) % S, h = r % H;
    float* dst_lse = p.dst_lse ? p.dst_lse + (b * H + h) * S + s : nullptr;
    merge::merge_row<T>(p, b, s, h, dst + r * D, dst_lse);
  }
}

template void merge_attention_states<float>(const MergeStatesParams&, int);
template void merge_attention_states<fp16_t>(const MergeStatesParams&, int);
template void merge_attention_states<bf16_t>(const MergeStatesParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
