// CPU kernel: merge of partial attention states (log-sum-exp weighted combine).
//
// Work: with LSEs contiguous along the sequence (the usual layout) and a sequence of at least
// half a vector, blocks of one vector of positions x a run of heads (merge::merge_block_along_s:
// the log-sum-exp statistics on SIMD lanes, then the rows in memory order); otherwise one row
// (b, s, h) at a time (merge::merge_row). Items split statically across OpenMP threads.
// Traffic: N * D * sizeof(T) read + D * sizeof(T) written per row; the op is memory bound, so
// the arithmetic is kept simple.
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/kernels/merge_row.h"

namespace gk::cpu::GK_CPU_ISA_NS {

template <class T>
void merge_attention_states(const MergeStatesParams& p, int num_threads) {
  const int64_t rows = p.rows();
  const int64_t S = p.seqlen, H = p.heads, D = p.head_dim;
  T* dst = static_cast<T*>(p.dst_out);
  constexpr int W = VecF::kWidth;
  if (2 * S >= W && merge::lse_contiguous_along_s(p)) {
    const int64_t blocks = (S + W - 1) / W, hb = merge::block_heads(H, p.num_partials), hblocks = (H + hb - 1) / hb;
    const int64_t items = p.batch * blocks * hblocks;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * D * p.num_partials > 32768)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / (blocks * hblocks), s0 = (it / hblocks) % blocks * W, h0 = it % hblocks * hb;
      float* dst_lse = p.dst_lse ? p.dst_lse + (b * H + h0) * S + s0 : nullptr;
      merge::merge_block_along_s<T>(p, b, s0, int(std::min<int64_t>(W, S - s0)), h0, std::min(hb, H - h0),
                                    dst + ((b * S + s0) * H + h0) * D, dst_lse);
    }
    return;
  }
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
