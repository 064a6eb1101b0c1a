// CPU kernel: flash attention forward (prefill), dense and varlen, with causal / sliding-window
// masks, softcap, ALiBi, GQA and the log-sum-exp. Semantics: csrc/core/flash_params.h.
//
// Tiling: a query tile is BQ = kBlockQ = 128 queries of one head, or kBlockQShort = 64 for short
// sequences (more units, less masked work on the causal diagonal). A work unit holds several
// "slots" (query tiles of the GQA heads of one kv head, then adjacent query tiles: unit_shape)
// and walks the key tiles (kBlockK = 64, on a fixed grid) that some slot sees; causal and window
// tiles that no slot sees are never visited. Each K / V tile is copied once per unit and serves
// every slot. A slot keeps the online-softmax state of its BQ rows: running max and sum per
// query, the fp32 output tile O (BQ x head_dim) and the packed Q tile. Extra memory is a fixed
// per-thread scratch (under 1 MB, allocated by the calling thread before the parallel region)
// plus the output: O(seqlen), no score matrix. Masks are applied only on key tiles that cross a
// mask boundary, and there key blocks that no query sees are skipped (KeyLimit).
// Micro-kernels (flash_attention_tiles.h): S^T = K Q^T and O += P V, register blocked, queries on
// the SIMD lanes; bf16 uses VDPBF16PS on AVX512-BF16; fp16 (and bf16 below AVX-512) converts
// each K / V tile to fp32 once. exp and tanh in SIMD (cpu/simd.h).
// Numerics: fp32 accumulation; P is rounded to bf16 for the bf16 P V product (as on the GPU).
// Parallelism: OpenMP over work units, dynamic schedule; units grouped by (sequence, kv head) so
// that the threads share one head's K / V in L3, costliest first inside each group (causal tiles
// near the bottom see the most keys).
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include <omp.h>
#include "core/flash_params.h"
#include "core/softmax_state.h"
#include "cpu/kernels.h"
#include "cpu/kernels/flash_attention_tiles.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {
using namespace flash;

// Scratch of every thread of one call, in one block owned by the calling thread and kept between
// calls (so concurrent calls from different threads never share it). It is grown before the
// parallel region, where a failed allocation raises std::bad_alloc (MemoryError in Python);
// inside the region nothing allocates.
struct Workspace {
  float* data = nullptr;
  size_t size = 0;
  ~Workspace() { std::free(data); }
  float* get(size_t floats) {
    if (floats > size) {
      std::free(data);
      data = nullptr;
      size = 0;
      data = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
      if (!data) throw std::bad_alloc();
      size = floats;
    }
    return data;
  }
};
thread_local Workspace t_workspace;

// One thread's scratch for one head dim (sized for the largest query tile): the pieces a work
// unit shares across its slots (the K / V tile copies, S^T, the P pairs), then one set of pieces
// per slot (one query tile of one query head).
struct SlotBuffers {
  float* qt;     // Q^T: D x BQ fp32 (times the softmax scale), or (D / 2) x BQ bf16 pairs
  float* o;      // O: BQ x dp
  float* m;      // running max, sum and rescale factor of each query
  float* l;
  float* alpha;
  float* mx;     // the key tile's per-query maximum, from the S^T micro-kernel (unmasked tiles)
  float* pos;    // key position of each query
};

struct TileBuffers {
  float* st;     // S^T, then P^T: kBlockK x BQ
  float* kc;     // K tile: fp32 kBlockK x D (bf16 rows on the AVX512-BF16 path)
  float* vc;     // V tile likewise, or the bf16 V pairs: (kBlockK / 2) x dp
  uint32_t* pp;  // P pairs (bf16 path): (kBlockK / 2) x BQ
  float* slots;  // the per-slot pieces, slot_floats apart
  size_t qt_floats, o_floats, slot_floats;
  int64_t dp;    // D rounded up to the vector width

  SlotBuffers slot(int j) const {
    float* b = slots + size_t(j) * slot_floats;
    float* stats = b + qt_floats + o_floats;
    return {b, b + qt_floats, stats, stats + kBlockQ, stats + 2 * kBlockQ, stats + 3 * kBlockQ, stats + 4 * kBlockQ};
  }
};

constexpr size_t aligned16(int64_t floats) { return (size_t(floats) + 15) / 16 * 16; }  // 64-byte pieces

struct ScratchLayout {
  size_t st, kc, vc, pp, qt, o, stats;
  explicit ScratchLayout(int64_t D) {
    const int64_t dp = (D + W - 1) / W * W;
    constexpr int64_t ld = kLd<kBlockQ>;
    st = aligned16(kBlockK * ld), kc = aligned16(kBlockK * D), vc = aligned16(kBlockK * std::max<int64_t>(D, dp));
    pp = aligned16(kBlockK / 2 * ld);
    qt = aligned16(D * ld), o = aligned16(kBlockQ * dp), stats = aligned16(5 * kBlockQ);
  }
  size_t shared() const { return st + kc + vc + pp; }
  size_t per_slot() const { return qt + o + stats; }
};

size_t scratch_floats(int64_t D, int slots) {
  const ScratchLayout s(D);
  return s.shared() + size_t(slots) * s.per_slot();
}

TileBuffers tile_buffers(float* base, int64_t D) {
  const ScratchLayout s(D);
  TileBuffers t;
  t.st = base, base += s.st;
  t.kc = base, base += s.kc;
  t.vc = base, base += s.vc;
  t.pp = reinterpret_cast<uint32_t*>(base), base += s.pp;
  t.slots = base;
  t.qt_floats = s.qt, t.o_floats = s.o, t.slot_floats = s.per_slot();
  t.dp = (D + W - 1) / W * W;
  return t;
}

// Slots per work unit: the unit copies each K / V tile once for all of them, so more slots mean
// fewer copies, but each slot keeps its Q^T and O (136 KB at head dim 128) in the thread's L2.
// Slots are the GQA heads of one kv head first (the largest divisor of the group that fits the
// budget), then adjacent query tiles of those heads, which see nearly the same keys.
constexpr size_t kSlotScratchBudget = 640 << 10;  // bytes, of the 1-2 MB L2 of the cores we target
constexpr int kMaxTilesPerUnit = 4, kMaxSlots = 64;
struct UnitShape {
  int heads, tiles;
};
UnitShape unit_shape(const FlashParams& p) {
  const size_t per_slot = ScratchLayout(p.head_dim).per_slot() * sizeof(float);
  const int64_t g = p.group();
  const int64_t fit = std::clamp<int64_t>(int64_t(kSlotScratchBudget / per_slot), 1, kMaxSlots);
  int heads = 1;
  for (int64_t h = 1; h <= g; ++h)
    if (g % h == 0 && h <= fit) heads = int(h);
  return {heads, int(std::max<int64_t>(1, std::min<int64_t>(kMaxTilesPerUnit, fit / heads)))};
}

// n rows of D elements (row stride `stride`) -> contiguous fp32.
template <class T>
void rows_to_float(const T* src, int64_t stride, int n, int64_t D, float* dst) {
  for (int j = 0; j < n; ++j) {
    const T* s = src + j * stride;
    float* d = dst + j * D;
    int64_t x = 0;
    for (; x + W <= D; x += W) VecF::load(s + x).store(d + x);
    if (x < D) store_first(load_first(s + x, int(D - x)), d + x, int(D - x));
  }
}

// Q^T (D x BQ fp32, row stride kLd<BQ>) from nq query rows of D elements at stride qs, times the
// softmax scale (so that S^T = K Q^T are the scores); padding queries are 0. AVX-512: 16 x 16
// blocks transposed in registers (a scalar transpose was ~2.5% of a causal 4096-token call:
// 16 K strided scalar stores per query tile).
template <int BQ, class T>
void pack_q_transposed(const T* q, int64_t qs, int nq, int64_t D, float scale, float* qt) {
  int64_t d0 = 0;
#if defined(GK_SIMD_AVX512)
  const __m512 sv = _mm512_set1_ps(scale);
  for (; d0 + 16 <= D; d0 += 16)
    for (int i0 = 0; i0 < BQ; i0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = i0 + i < nq ? _mm512_mul_ps(VecF::load(q + (i0 + i) * qs + d0).v, sv) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int d = 0; d < 16; ++d) _mm512_storeu_ps(qt + (d0 + d) * kLd<BQ> + i0, r[d]);
    }
#endif
  for (; d0 < D; ++d0)
    for (int i = 0; i < BQ; ++i) qt[d0 * kLd<BQ> + i] = i < nq ? to_float(q[i * qs + d0]) * scale : 0.f;
}

// Prefetches n rows of `bytes` bytes each into L2.
template <class T>
void prefetch_rows(const T* rows, int64_t stride, int n, int64_t bytes) {
  for (int j = 0; j < n; ++j) {
    const char* r = reinterpret_cast<const char*>(rows + j * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);
  }
}

// How raw dot products become scores: scale, softcap, ALiBi, then the mask when the key tile
// crosses a mask boundary.
struct ScoreRule {
  float scale, softcap, slope;
  bool mask;
  int64_t window_left, right;  // -1: unbounded
};

// Scores of n keys for the W queries at lanes [c, c + W) of S^T, in place; returns their
// per-lane maximum (one pass over the column for both).
template <int BQ, int LD>
GK_INLINE VecF finish_scores(const ScoreRule& rule, float* st, int n, int64_t j0, const float* pos, int c) {
  const VecF scale = VecF::set1(rule.scale);
  VecF mt = VecF::set1(-INFINITY);
  if (rule.softcap <= 0.f && rule.slope == 0.f && !rule.mask) {  // the common case
    for (int j = 0; j < n; ++j) {
      const VecF s = VecF::load(st + j * LD + c) * scale;
      s.store(st + j * LD + c);
      mt = max(mt, s);
    }
    return mt;
  }
  const VecF neg_inf = VecF::set1(-INFINITY);
  const bool softcap = rule.softcap > 0.f, alibi = rule.slope != 0.f;
  const VecF cap = VecF::set1(rule.softcap), inv_cap = VecF::set1(softcap ? 1.f / rule.softcap : 0.f);
  const VecF slope = VecF::set1(rule.slope), ps = VecF::load(pos + c);
  for (int j = 0; j < n; ++j) {
    const float key = float(j0 + j);
    VecF s = VecF::load(st + j * LD + c) * scale;
    if (softcap) s = cap * vtanh(s * inv_cap);
    if (alibi) s = s - slope * vabs(ps - VecF::set1(key));
    if (rule.mask) {
      // visible iff key - right <= pos <= key + window_left
      if (rule.window_left >= 0) s = select_lt(VecF::set1(key + float(rule.window_left)), ps, neg_inf, s);
      if (rule.right >= 0) s = select_lt(ps, VecF::set1(key - float(rule.right)), neg_inf, s);
    }
    s.store(st + j * LD + c);
    mt = max(mt, s);
  }
  return mt;
}

// Online-softmax update of the query tile with the raw dot products of n keys: their scores
// (finish_scores), then per lane the rule of core/softmax_state.h (softmax_rescale), the tile's
// sum taken directly against the new base. P = exp(S^T - base) is written as P^T in place over
// st (fp32 path) or, with kPairs, packed in the same pass as the (key, key+1) bf16 pairs of the
// bf16 P V product (no second pass over P). alpha = exp(m_old - base) rescales O and l. A lane
// that has seen only masked keys keeps m = -inf, l = 0.
// tile_max (optional): the tile's per-query maximum, already computed with S^T when the scores
// are the raw dot products (unmasked tile, no softcap or ALiBi, scale folded into Q^T).
template <int BQ, bool kPairs>
void online_softmax(const ScoreRule& rule, int64_t j0, const float* pos, float* st, int n, float* m, float* l,
                    float* alpha, uint32_t* pp, const float* tile_max = nullptr) {
  constexpr int kLdS = kPairs ? kLdPairs<BQ> : kLd<BQ>;
  for (int c = 0; c < BQ; c += W) {
    const VecF mt = tile_max ? VecF::load(tile_max + c) : finish_scores<BQ, kLdS>(rule, st, n, j0, pos, c);
    const SoftmaxRescale<VecF> r = softmax_rescale<VecSoftmaxOps>(VecF::load(m + c), mt);
    VecF sum = VecF::zero();
    if constexpr (kPairs) {
#if defined(GK_SIMD_AVX512)
      for (int j = 0; j < n; j += 2) {
        const VecF p0 = vexp_nonpos(VecF::load(st + j * kLdS + c) - r.base);
        const VecF p1 = j + 1 < n ? vexp_nonpos(VecF::load(st + (j + 1) * kLdS + c) - r.base) : VecF::zero();
        sum = sum + (p0 + p1);
        VecBF16Pairs::interleave(p0, p1).store(pp + (j / 2) * kLdS + c);
      }
#endif
    } else {
      for (int j = 0; j < n; ++j) {
        float* s = st + j * kLdS + c;
        const VecF p = vexp_nonpos(VecF::load(s) - r.base);
        p.store(s);
        sum = sum + p;
      }
    }
    r.m_new.store(m + c);
    fmadd(VecF::load(l + c), r.self, sum).store(l + c);
    r.self.store(alpha + c);
  }
}

template <class T>
constexpr bool kUseBF16Dot = false;
#if defined(GK_SIMD_AVX512)
template <>
constexpr bool kUseBF16Dot<bf16_t> = true;
#endif

// One work unit of sequence b: query heads [h0, h0 + nh) (one kv head) x query tiles
// [i0, i0 + nt * BQ) (each tile BQ queries or the rest of the sequence). Its slots are the
// (tile, head) pairs; each K / V tile is copied once and serves every slot that sees it.
template <class T, int BQ>
void query_tile(const FlashParams& p, int64_t b, int64_t h0, int nh, int64_t i0, int nt, float* scratch) {
  const int64_t D = p.head_dim, sq = p.seqlen_q_of(b), sk = p.seqlen_k_of(b);
  nt = int(std::min<int64_t>(nt, (sq - i0 + BQ - 1) / BQ));
  const int slots = nh * nt;
  const int64_t hk = h0 / p.group();
  const int64_t qo = p.q_offset(b), ko = p.k_offset(b);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + ko * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + ko * p.v_stride[1] + hk * p.v_stride[2];
  const int64_t ks = p.k_stride[1], vs = p.v_stride[1], qs = p.q_stride[1];

  TileBuffers t = tile_buffers(scratch, D);
  const int64_t dp = t.dp;
  // Per slot: its head and first query, and the keys some / all of its queries see (the unit
  // walks the union; a tile beyond a slot's keys skips the slot, one crossing them is masked).
  struct SlotInfo {
    int64_t h, q0;
    int nq;
    int64_t lo, hi, all_lo, all_hi;
  };
  SlotInfo info[kMaxSlots];
  int64_t lo = sk, hi = 0;
  for (int j = 0; j < slots; ++j) {
    SlotInfo& si = info[j];
    si.h = h0 + j % nh, si.q0 = i0 + int64_t(j / nh) * BQ, si.nq = int(std::min<int64_t>(BQ, sq - si.q0));
    const FlashKeyRange first = flash_key_range(p, si.q0, sq, sk), last = flash_key_range(p, si.q0 + si.nq - 1, sq, sk);
    si.lo = first.lo, si.hi = last.hi, si.all_lo = last.lo, si.all_hi = first.hi;
    if (si.lo < si.hi) lo = std::min(lo, si.lo), hi = std::max(hi, si.hi);
    const SlotBuffers sb = t.slot(j);
    for (int i = 0; i < BQ; ++i) sb.m[i] = -INFINITY, sb.l[i] = 0.f, sb.pos[i] = float(si.q0 + i + sk - sq);
    std::fill(sb.o, sb.o + BQ * dp, 0.f);
    // Pack Q once: transposed fp32, or transposed bf16 (d, d+1) pairs; padding queries are 0.
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + (qo + si.q0) * qs + si.h * p.q_stride[2];
    if constexpr (kUseBF16Dot<T>) {
      uint32_t* qp = reinterpret_cast<uint32_t*>(sb.qt);
      for (int i = 0; i < BQ; ++i)
        for (int64_t d2 = 0; d2 < D / 2; ++d2) {
          uint32_t w = 0;
          if (i < si.nq) std::memcpy(&w, q + i * qs + 2 * d2, 4);
          qp[d2 * kLdPairs<BQ> + i] = w;
        }
    } else {
      pack_q_transposed<BQ>(q, qs, si.nq, D, p.scale, sb.qt);
    }
  }

  // the fp32 Q^T carries the softmax scale; the bf16 pairs do not (rounding q * scale to bf16
  // would add an error the GPU kernels do not make)
  ScoreRule rule{kUseBF16Dot<T> ? p.scale : 1.f, p.softcap, 0.f, false, p.window_left, p.right_bound()};
  // The slots that see key tile [j0, j0 + n), with their rule and key limit set.
  auto for_each_slot = [&](int64_t j0, int n, auto&& body) {
    for (int j = 0; j < slots; ++j) {
      const SlotInfo& si = info[j];
      if (si.hi <= j0 || si.lo >= j0 + n) continue;
      rule.mask = !(si.all_lo <= j0 && j0 + n <= si.all_hi);
      rule.slope = p.alibi_slope(b, si.h);
      // on a tile that the causal / right-window edge crosses, skip what no query sees
      KeyLimit lim;
      const SlotBuffers sb = t.slot(j);
      if (rule.mask && rule.right >= 0) lim = {sb.pos, float(rule.right - j0)};
      body(sb, lim);
    }
  };
  auto slots_seeing = [&](int64_t j0, int n) {
    int c = 0;
    for (int j = 0; j < slots; ++j) c += !(info[j].hi <= j0 || info[j].lo >= j0 + n);
    return c;
  };

  // Key tiles on a fixed grid (multiples of kBlockK), so that every query's result is the same
  // whatever unit, thread count or slot grouping computes it.
  for (int64_t j0 = lo / kBlockK * kBlockK; j0 < hi; j0 += kBlockK) {
    const int n = int(std::min<int64_t>(kBlockK, hi - j0));
    const T* kt = k + j0 * ks;
    const T* vt = v + j0 * vs;
    // The next tile's K and V rows are a head-stride apart, which the hardware prefetchers
    // follow poorly: ask for them into L2 now, so that copying them next time hits (fp32 path:
    // a few rows at a time between the micro-kernel blocks, K during S^T = K Q^T and V during
    // O += P V of every slot).
    const int n_next = j0 + kBlockK < hi ? int(std::min<int64_t>(kBlockK, hi - j0 - kBlockK)) : 0;
    if constexpr (kUseBF16Dot<T>) {
#if defined(GK_SIMD_AVX512)
      if (n_next > 0) {
        prefetch_rows(kt + kBlockK * ks, ks, n_next, D * int64_t(sizeof(T)));
        prefetch_rows(vt + kBlockK * vs, vs, n_next, D * int64_t(sizeof(T)));
      }
      // K rows a head-stride apart alias in L1 (4 KB apart for 16 heads of 128): copy them
      // next to each other first, once for all the unit's slots; V as (key, key+1) pairs.
      bf16_t* kc = reinterpret_cast<bf16_t*>(t.kc);
      for (int j = 0; j < n; ++j) std::memcpy(kc + j * D, kt + j * ks, D * sizeof(bf16_t));
      uint32_t* vp = reinterpret_cast<uint32_t*>(t.vc);
      pack_v_pairs(vt, vs, n, D, dp, vp);
      for_each_slot(j0, n, [&](const SlotBuffers& sb, const KeyLimit& lim) {
        qk_tile_bf16<BQ>(reinterpret_cast<const uint32_t*>(sb.qt), kc, D, n, D, t.st, lim);
        online_softmax<BQ, true>(rule, j0, sb.pos, t.st, n, sb.m, sb.l, sb.alpha, t.pp);
        pv_tile_bf16<BQ>(t.pp, n, vp, sb.alpha, sb.o, dp, lim);
      });
#endif
    } else {
      // fp32 copies of the K and V tiles, once for all the unit's slots: converts fp16 (and bf16
      // below AVX-512) once per tile, and puts rows that are a head-stride apart (aliasing in
      // L1) next to each other.
      const int64_t row_bytes = D * int64_t(sizeof(T));
      rows_to_float(kt, ks, n, D, t.kc);
      rows_to_float(vt, vs, n, D, t.vc);
      RowPrefetcher pfk, pfv;
      const int seeing = slots_seeing(j0, n);
      if (n_next > 0) {
        pfk.start(kt + kBlockK * ks, ks * int64_t(sizeof(T)), n_next, row_bytes, seeing * qk_steps<BQ>(n, D));
        pfv.start(vt + kBlockK * vs, vs * int64_t(sizeof(T)), n_next, row_bytes, seeing * pv_steps<BQ>(D));
      }
      for_each_slot(j0, n, [&](const SlotBuffers& sb, const KeyLimit& lim) {
        // unmasked tiles without softcap or ALiBi: the scores are S^T as computed, and their
        // maximum comes out of the micro-kernel
        float* tile_max = !rule.mask && rule.softcap <= 0.f && rule.slope == 0.f ? sb.mx : nullptr;
        qk_tile<BQ>(sb.qt, t.kc, D, n, D, t.st, n_next > 0 ? &pfk : nullptr, tile_max, lim);
        online_softmax<BQ, false>(rule, j0, sb.pos, t.st, n, sb.m, sb.l, sb.alpha, nullptr, tile_max);
        pv_tile<BQ>(t.st, n, t.vc, D, sb.alpha, sb.o, dp, D, n_next > 0 ? &pfv : nullptr, lim);
      });
      if (n_next > 0) pfk.finish(), pfv.finish();
    }
  }

  // Normalise with the shared softmax state; empty rows give 0 and lse -inf.
  for (int j = 0; j < slots; ++j) {
    const SlotInfo& si = info[j];
    const SlotBuffers sb = t.slot(j);
    T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + (qo + si.q0) * p.out_stride[1] + si.h * p.out_stride[2];
    float* lse = p.lse ? p.lse + b * p.lse_stride[0] + si.h * p.lse_stride[1] + (qo + si.q0) * p.lse_stride[2] : nullptr;
    for (int i = 0; i < si.nq; ++i) {
      const SoftmaxStats stats{sb.m[i], sb.l[i]};
      const VecF inv = VecF::set1(stats.inv_denominator());
      const float* o = sb.o + i * dp;
      T* dst = out + i * p.out_stride[1];
      int64_t d = 0;
      for (; d + W <= D; d += W) (VecF::load(o + d) * inv).store(dst + d);
      if (d < D) store_first(VecF::load(o + d) * inv, dst + d, int(D - d));
      if (lse) lse[i * p.lse_stride[2]] = stats.lse();
    }
  }
}

struct WorkUnit {
  int64_t b, h0, i0, cost;
};

template <class T, int BQ>
void run_tiles(const FlashParams& p, int num_threads) {
  // Work units grouped by (sequence, kv head), so that the threads work through one head's K and
  // V at a time: 4 MB at seqlen 4096 and head dim 128 in fp32, read by every query tile, stays in
  // L3 (all heads' K and V, 64 MB, would stream from DRAM). Inside a group the costliest units
  // come first (causal tiles near the bottom see the most keys), so that each group, and the
  // dynamic schedule, ends with cheap units.
  // A unit takes nh query heads of its kv head x nt adjacent query tiles (unit_shape), fewer
  // tiles, then fewer heads, if that would leave fewer than 4 units per thread.
  const int64_t group = p.group();
  int64_t tiles = 0;
  for (int64_t b = 0; b < p.batch; ++b) tiles += (p.seqlen_q_of(b) + BQ - 1) / BQ;
  auto [nh, nt] = unit_shape(p);
  auto units_of = [&](int h, int t) { return (tiles + t - 1) / t * p.heads_kv * (group / h); };
  while (nt > 1 && units_of(nh, nt) < 4 * int64_t(num_threads)) --nt;
  while (nh > 1 && units_of(nh, nt) < 4 * int64_t(num_threads)) {
    do --nh; while (group % nh);
  }
  std::vector<WorkUnit> units;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t sq = p.seqlen_q_of(b), sk = p.seqlen_k_of(b);
    for (int64_t hk = 0; hk < p.heads_kv; ++hk) {
      const size_t first_unit = units.size();
      for (int64_t i0 = 0; i0 < sq; i0 += int64_t(nt) * BQ) {
        int64_t cost = 0;
        for (int64_t q0 = i0; q0 < std::min<int64_t>(sq, i0 + int64_t(nt) * BQ); q0 += BQ) {
          const int64_t nq = std::min<int64_t>(BQ, sq - q0);
          const FlashKeyRange first = flash_key_range(p, q0, sq, sk), last = flash_key_range(p, q0 + nq - 1, sq, sk);
          cost += std::max<int64_t>(0, last.hi - first.lo) + 1;
        }
        for (int64_t h = hk * group; h < (hk + 1) * group; h += nh) units.push_back({b, h, i0, cost});
      }
      std::stable_sort(units.begin() + first_unit, units.end(),
                       [](const WorkUnit& a, const WorkUnit& c) { return a.cost > c.cost; });
    }
  }
  const int64_t n = int64_t(units.size());
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
  const size_t per_thread = scratch_floats(p.head_dim, nh * nt);
  float* scratch = t_workspace.get(per_thread * size_t(threads));  // may throw: before the region
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t u = 0; u < n; ++u)
    query_tile<T, BQ>(p, units[u].b, units[u].h0, nh, units[u].i0, nt, scratch + per_thread * size_t(omp_get_thread_num()));
}

// The short query tile where it measured faster on the 2-core AVX-512 box (single thread, CPU
// time): masked (causal / window) problems up to 1024 queries, where the 128-query tiles waste
// the most on the diagonal (causal 512: +34%, 1024: +17% in fp32; at 2048 it is a wash), and any
// problem up to 512 queries (more, smaller units; within noise otherwise).
constexpr int64_t kShortSeqlenMasked = 1024, kShortSeqlen = 512;

bool use_short_tiles(const FlashParams& p) {
  const bool masked = p.causal || p.window_left >= 0 || p.window_right >= 0;
  // p.seqlen_q is the longest sequence (an upper bound in varlen).
  return p.seqlen_q <= (masked ? kShortSeqlenMasked : kShortSeqlen);
}

}  // namespace

template <class T>
void flash_attention(const FlashParams& p, int num_threads) {
  if (use_short_tiles(p))
    run_tiles<T, kBlockQShort>(p, num_threads);
  else
    run_tiles<T, kBlockQ>(p, num_threads);
}

template void flash_attention<float>(const FlashParams&, int);
template void flash_attention<fp16_t>(const FlashParams&, int);
template void flash_attention<bf16_t>(const FlashParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
