// CPU kernel: flash attention forward (prefill), dense and varlen, with causal / sliding-window
// masks, softcap, ALiBi, GQA and the log-sum-exp. Semantics: csrc/core/flash_params.h.
//
// Tiling: one work unit is (sequence, query head, tile of kBlockQ = 128 queries). It walks only
// the key tiles (kBlockK = 64) that some of its queries see (causal and window tiles that are
// fully masked are never visited) and keeps the online-softmax state of its 128 rows: running
// max and sum per query, the fp32 output tile O (128 x head_dim) and the packed Q tile. Extra
// memory is a fixed per-thread scratch (under 512 KB) plus the output: O(seqlen), no score
// matrix. Masks are applied only on key tiles that cross a mask boundary.
// Micro-kernels (flash_attention_tiles.h): S^T = K Q^T and O += P V, register blocked, queries on
// the SIMD lanes; bf16 uses VDPBF16PS on AVX512-BF16; fp16 (and bf16 below AVX-512) converts
// each K / V tile to fp32 once. exp and tanh in SIMD (cpu/simd.h).
// Numerics: fp32 accumulation; P is rounded to bf16 for the bf16 P V product (as on the GPU).
// Parallelism: OpenMP over work units, dynamic schedule, costliest units first (causal tiles
// near the bottom see the most keys).
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>
#include "core/flash_params.h"
#include "core/softmax_state.h"
#include "cpu/kernels.h"
#include "cpu/kernels/flash_attention_tiles.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {
using namespace flash;

// Per-thread scratch, kept between calls (an OpenMP worker reuses its buffers).
struct Scratch {
  float* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
  float* get(size_t floats) {
    if (floats > size) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
      if (!data) throw std::bad_alloc();
      size = floats;
    }
    return data;
  }
};
thread_local Scratch t_scratch;

// The pieces of the scratch for one head dim.
struct TileBuffers {
  float* qt;       // Q^T: D x kBlockQ fp32, or (D / 2) x kBlockQ bf16 pairs
  float* st;       // S^T, then P^T: kBlockK x kBlockQ
  float* o;        // O: kBlockQ x dp
  float* kc;       // K tile converted to fp32: kBlockK x D (fp16, or bf16 below AVX-512)
  float* vc;       // V tile likewise, or the bf16 V pairs: (kBlockK / 2) x dp
  uint32_t* pp;    // P pairs (bf16 path): (kBlockK / 2) x kBlockQ
  float* m;        // running max, sum, rescale factor, key position of each query
  float* l;
  float* alpha;
  float* pos;
  int64_t dp;      // D rounded up to the vector width
};

TileBuffers tile_buffers(int64_t D) {
  const int64_t dp = (D + W - 1) / W * W;
  const size_t sizes[] = {size_t(D * kBlockQ), size_t(kBlockK * kBlockQ), size_t(kBlockQ * dp), size_t(kBlockK * D),
                          size_t(kBlockK * std::max<int64_t>(D, dp)), size_t(kBlockK / 2 * kBlockQ), 4 * size_t(kBlockQ)};
  size_t total = 0;
  for (size_t s : sizes) total += (s + 15) / 16 * 16;  // 64-byte aligned pieces
  float* base = t_scratch.get(total);
  float* parts[7];
  for (int i = 0; i < 7; ++i) parts[i] = base, base += (sizes[i] + 15) / 16 * 16;
  TileBuffers t;
  t.qt = parts[0], t.st = parts[1], t.o = parts[2], t.kc = parts[3], t.vc = parts[4];
  t.pp = reinterpret_cast<uint32_t*>(parts[5]);
  t.m = parts[6], t.l = parts[6] + kBlockQ, t.alpha = parts[6] + 2 * kBlockQ, t.pos = parts[6] + 3 * kBlockQ;
  t.dp = dp;
  return t;
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

// Prefetches n rows of `bytes` bytes each into L2.
template <class T>
void prefetch_rows(const T* rows, int64_t stride, int n, int64_t bytes) {
  for (int j = 0; j < n; ++j) {
    const char* r = reinterpret_cast<const char*>(rows + j * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);
  }
}

// Scores of n keys (rows of S^T) for the query tile: scale, softcap, ALiBi, then the mask when
// the tile crosses a mask boundary; returns nothing, updates st in place.
struct ScoreRule {
  float scale, softcap, slope;
  bool mask;
  int64_t window_left, right;  // -1: unbounded
};

void finish_scores(const ScoreRule& rule, float* st, int n, int64_t j0, const float* pos) {
  const VecF scale = VecF::set1(rule.scale), neg_inf = VecF::set1(-INFINITY);
  const bool softcap = rule.softcap > 0.f, alibi = rule.slope != 0.f;
  const VecF cap = VecF::set1(rule.softcap), inv_cap = VecF::set1(softcap ? 1.f / rule.softcap : 0.f);
  const VecF slope = VecF::set1(rule.slope);
  for (int j = 0; j < n; ++j) {
    const float key = float(j0 + j);
    float* row = st + j * kBlockQ;
    for (int c = 0; c < kBlockQ; c += W) {
      VecF s = VecF::load(row + c) * scale;
      if (softcap) s = cap * vtanh(s * inv_cap);
      const VecF ps = VecF::load(pos + c);
      if (alibi) s = s - slope * vabs(ps - VecF::set1(key));
      if (rule.mask) {
        // visible iff key - right <= pos <= key + window_left
        if (rule.window_left >= 0) s = select_lt(VecF::set1(key + float(rule.window_left)), ps, neg_inf, s);
        if (rule.right >= 0) s = select_lt(ps, VecF::set1(key - float(rule.right)), neg_inf, s);
      }
      s.store(row + c);
    }
  }
}

// Online-softmax update of the query tile with the scores of n keys: the vector form of
// merge_softmax_stats (core/softmax_state.h), with the tile's sum taken directly against the new
// max. st becomes P^T = exp(S^T - m_new); alpha = exp(m_old - m_new) rescales O and l. A lane
// that has seen only masked keys keeps m = -inf, l = 0 (its exponent base is taken as 0, so
// exp(-inf - 0) = 0, never NaN).
void online_softmax(float* st, int n, float* m, float* l, float* alpha) {
  const VecF neg_inf = VecF::set1(-INFINITY), lowest = VecF::set1(-3.0e38f);
  for (int c = 0; c < kBlockQ; c += W) {
    VecF mt = neg_inf;
    for (int j = 0; j < n; ++j) mt = max(mt, VecF::load(st + j * kBlockQ + c));
    const VecF m_old = VecF::load(m + c), m_new = max(m_old, mt);
    const VecF base = select_lt(m_new, lowest, VecF::zero(), m_new);
    const VecF a = vexp(m_old - base);
    VecF sum = VecF::zero();
    for (int j = 0; j < n; ++j) {
      float* s = st + j * kBlockQ + c;
      const VecF p = vexp(VecF::load(s) - base);
      p.store(s);
      sum = sum + p;
    }
    m_new.store(m + c);
    fmadd(VecF::load(l + c), a, sum).store(l + c);
    a.store(alpha + c);
  }
}

template <class T>
constexpr bool kUseBF16Dot = false;
#if defined(GK_SIMD_AVX512)
template <>
constexpr bool kUseBF16Dot<bf16_t> = true;
#endif

// One work unit: queries [i0, i0 + nq) of head h of sequence b.
template <class T>
void query_tile(const FlashParams& p, int64_t b, int64_t h, int64_t i0) {
  const int64_t D = p.head_dim, sq = p.seqlen_q_of(b), sk = p.seqlen_k_of(b);
  const int nq = int(std::min<int64_t>(kBlockQ, sq - i0));
  const int64_t hk = h / p.group();
  const int64_t qo = p.q_offset(b), ko = p.k_offset(b);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + (qo + i0) * p.q_stride[1] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + ko * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + ko * p.v_stride[1] + hk * p.v_stride[2];
  const int64_t ks = p.k_stride[1], vs = p.v_stride[1], qs = p.q_stride[1];

  TileBuffers t = tile_buffers(D);
  const int64_t dp = t.dp;
  for (int i = 0; i < kBlockQ; ++i) t.m[i] = -INFINITY, t.l[i] = 0.f, t.pos[i] = float(i0 + i + sk - sq);
  std::fill(t.o, t.o + kBlockQ * dp, 0.f);

  // Pack Q once: transposed fp32, or transposed bf16 (d, d+1) pairs; padding queries are 0.
  if constexpr (kUseBF16Dot<T>) {
    uint32_t* qp = reinterpret_cast<uint32_t*>(t.qt);
    for (int i = 0; i < kBlockQ; ++i)
      for (int64_t d2 = 0; d2 < D / 2; ++d2) {
        uint32_t w = 0;
        if (i < nq) std::memcpy(&w, q + i * qs + 2 * d2, 4);
        qp[d2 * kBlockQ + i] = w;
      }
  } else {
    for (int i = 0; i < kBlockQ; ++i)
      for (int64_t d = 0; d < D; ++d) t.qt[d * kBlockQ + i] = i < nq ? to_float(q[i * qs + d]) : 0.f;
  }

  const FlashKeyRange first = flash_key_range(p, i0, sq, sk), last = flash_key_range(p, i0 + nq - 1, sq, sk);
  // Keys seen by some query of the tile, and those seen by all of them (no mask needed).
  const int64_t lo = first.lo, hi = last.hi, all_lo = last.lo, all_hi = first.hi;
  ScoreRule rule{p.scale, p.softcap, p.alibi_slope(b, h), false, p.window_left, p.right_bound()};

  for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
    const int n = int(std::min<int64_t>(kBlockK, hi - j0));
    rule.mask = !(all_lo <= j0 && j0 + n <= all_hi);
    const T* kt = k + j0 * ks;
    const T* vt = v + j0 * vs;
    // The next tile's K and V rows are a head-stride apart, which the hardware prefetchers
    // follow poorly: ask for them into L2 now, so that copying them next time hits.
    if (j0 + kBlockK < hi) {
      const int n_next = int(std::min<int64_t>(kBlockK, hi - j0 - kBlockK));
      prefetch_rows(kt + kBlockK * ks, ks, n_next, D * int64_t(sizeof(T)));
      prefetch_rows(vt + kBlockK * vs, vs, n_next, D * int64_t(sizeof(T)));
    }
    if constexpr (kUseBF16Dot<T>) {
#if defined(GK_SIMD_AVX512)
      // K rows a head-stride apart alias in L1 (4 KB apart for 16 heads of 128): copy them
      // next to each other first.
      bf16_t* kc = reinterpret_cast<bf16_t*>(t.kc);
      for (int j = 0; j < n; ++j) std::memcpy(kc + j * D, kt + j * ks, D * sizeof(bf16_t));
      qk_tile_bf16(reinterpret_cast<const uint32_t*>(t.qt), kc, D, n, D, t.st);
      finish_scores(rule, t.st, n, j0, t.pos);
      online_softmax(t.st, n, t.m, t.l, t.alpha);
      const int npairs = (n + 1) / 2;
      for (int jp = 0; jp < npairs; ++jp)
        for (int c = 0; c < kBlockQ; c += W) {
          const VecF p0 = VecF::load(t.st + 2 * jp * kBlockQ + c);
          const VecF p1 = 2 * jp + 1 < n ? VecF::load(t.st + (2 * jp + 1) * kBlockQ + c) : VecF::zero();
          VecBF16Pairs::interleave(p0, p1).store(t.pp + jp * kBlockQ + c);
        }
      uint32_t* vp = reinterpret_cast<uint32_t*>(t.vc);
      pack_v_pairs(vt, vs, n, D, dp, vp);
      pv_tile_bf16(t.pp, npairs, vp, t.alpha, t.o, dp);
#endif
    } else {
      // fp32 copies of the K and V tiles: converts fp16 (and bf16 below AVX-512) once per tile,
      // and puts rows that are a head-stride apart (aliasing in L1) next to each other.
      rows_to_float(kt, ks, n, D, t.kc);
      qk_tile(t.qt, t.kc, D, n, D, t.st);
      finish_scores(rule, t.st, n, j0, t.pos);
      online_softmax(t.st, n, t.m, t.l, t.alpha);
      rows_to_float(vt, vs, n, D, t.vc);
      pv_tile(t.st, n, t.vc, D, t.alpha, t.o, dp, D);
    }
  }

  // Normalise with the shared softmax state; empty rows give 0 and lse -inf.
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + (qo + i0) * p.out_stride[1] + h * p.out_stride[2];
  float* lse = p.lse ? p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + (qo + i0) * p.lse_stride[2] : nullptr;
  for (int i = 0; i < nq; ++i) {
    const SoftmaxStats stats{t.m[i], t.l[i]};
    const VecF inv = VecF::set1(stats.inv_denominator());
    const float* o = t.o + i * dp;
    T* dst = out + i * p.out_stride[1];
    int64_t d = 0;
    for (; d + W <= D; d += W) (VecF::load(o + d) * inv).store(dst + d);
    if (d < D) store_first(VecF::load(o + d) * inv, dst + d, int(D - d));
    if (lse) lse[i * p.lse_stride[2]] = stats.lse();
  }
}

struct WorkUnit {
  int64_t b, h, i0, cost;
};

}  // namespace

template <class T>
void flash_attention(const FlashParams& p, int num_threads) {
  // Work units, costliest first, so that the dynamic schedule ends balanced.
  std::vector<WorkUnit> units;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t sq = p.seqlen_q_of(b), sk = p.seqlen_k_of(b);
    for (int64_t i0 = 0; i0 < sq; i0 += kBlockQ) {
      const int64_t nq = std::min<int64_t>(kBlockQ, sq - i0);
      const FlashKeyRange first = flash_key_range(p, i0, sq, sk), last = flash_key_range(p, i0 + nq - 1, sq, sk);
      const int64_t cost = std::max<int64_t>(0, last.hi - first.lo) + 1;
      for (int64_t h = 0; h < p.heads_q; ++h) units.push_back({b, h, i0, cost});
    }
  }
  std::stable_sort(units.begin(), units.end(), [](const WorkUnit& a, const WorkUnit& c) { return a.cost > c.cost; });
  const int64_t n = int64_t(units.size());
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (n > 1)
  for (int64_t u = 0; u < n; ++u) query_tile<T>(p, units[u].b, units[u].h, units[u].i0);
}

template void flash_attention<float>(const FlashParams&, int);
template void flash_attention<fp16_t>(const FlashParams&, int);
template void flash_attention<bf16_t>(const FlashParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
