// AVX-512 work item of the CPU decode attention (included by cpu/kernels/decode_attention.cpp
// inside its ISA namespace; only the AVX-512 level compiles it). Same work split and csrc/core
// softmax rule as the generic work item; what differs is how the cache reaches the core:
//  - Order. A work item streams tokens [lo, hi) of one sequence across all kv heads in tiles of
//    32 tokens, each tile in 4-token quads: the quad's keys (then values) are read head after
//    head, four ascending runs at once. (The first version walked one head over 16 tokens, then
//    the next head: sixteen 256-512-byte runs a page apart at a time. A plain sum over that order
//    reads ~40% slower than over memory order on this machine's EPYC.) Scores in pure address
//    order (token after token, heads in order: one key load, four query loads and four FMAs a
//    line) read no faster from DRAM at one thread (fp32 contiguous +3-5%, paged and bf16 -1..-9%)
//    and ran 16-19% slower in L2, although without the math one thread reads address order
//    15-25% faster than this order (scripts/read_patterns/decode_order.cpp).
//  - Prefetch. While a tile computes, the keys and values of the tokens `ahead` past the ones
//    being read (the rest of the tile, then the first of the next) are prefetched (PREFETCHT0)
//    a few lines per inner-loop step, spread evenly over the tile's work, in memory order; paged
//    caches included, since the page table is looked up a tile ahead. `ahead` is about 16 KiB of
//    token rows (32 KiB for paged 16-bit caches without the far stream below) and at least one
//    P.V pass (prefetch_ahead): with 8 kv heads x 128 dims, 4 tokens of fp32 and 8 of bf16 (16
//    paged). Near enough that the rows are still in L1 when read, where a whole tile ahead (the
//    first version) had pushed them out to L2 by then: interleaved, both orders, one thread with
//    the cache in L3, fp32 +10-13% and bf16 +7-9%; from DRAM at two threads fp32 +4-15%, paged
//    fp32 +0-6%, bf16 +0-3%. 8 KiB ahead was 13-20% slower from DRAM, 32 KiB lost the L1 gain.
//    Paged caches read from DRAM also prefetch the next tile into L2 (NearFarPrefetcher). Bursts
//    of a whole row did not help, nor did 4 prefetches in straight-line code per step (-7-14% in
//    L3); spread prefetches raised cold-cache throughput by 1.2x (fp32) to 1.6x (bf16, paged) on
//    this machine, and T0 measured 3-10% above T1 (L2 only). The tile after next gets one
//    prefetch per token row to take its TLB misses early (warm_translations).
//    At one thread from DRAM (a core at its own read limit, as in this host's fast state; 40
//    interleaved pairs x 3, scripts/decode_ab): prefetching each line read `ahead` tokens on, in
//    the loops' own order, instead of memory order: fp32 -15 points of the plain sum; every second
//    line only: 43% of the sum against 75% (the hardware prefetchers do not fill the gaps); every
//    second line into L2 (T1), the others into L1: contiguous -9..-12 points; every line into L2
//    (T1): contiguous -9..-10, paged 0..-1; PREFETCHNTA: within 2 points; none: 45%; 8 KiB
//    ahead: the same as 16; 32 KiB: -3..-9 points.
//  - Scores. Query rows sit on SIMD lanes (S^T: token x row, as in the flash kernel): a 4-token
//    x 4-row block of dot products accumulates in 16 registers and one transpose reduction
//    turns it into 16 scores. Rows are flattened over (kv head, seqlen_q, group); when a head
//    has a multiple of 4 rows (GQA groups of 4, 8, ...) one key load feeds 4 rows. fp32 and
//    fp16 keys use FMA (fp16 through VCVTPH2PS), bf16 keys VDPBF16PS against the bf16 query.
//  - Softmax. 16 rows per vector, one state per lane (core/softmax_state.h softmax_rescale);
//    masks only on tiles that cross some row's visible range.
//  - P.V. For each quad and kv head, a 64-dim slab of the 4 value rows stays in registers while
//    every row of the head accumulates into its fp32 output row (in L1). bf16 caches multiply
//    bf16 P by V with VDPBF16PS over token pairs (pv_pass_bf16), as the flash kernels do.
#pragma once
#if defined(GK_SIMD_AVX512)
// Accumulator i of a 16-way block holds item kKeyOfAcc[i], so that the transpose reduction's
// output lane j is item j (the reduction leaves lane order 0-3, 8-11, 4-7, 12-15). The map is
// its own inverse.
constexpr int kKeyOfAcc[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

// Lane i of the result = sum of the lanes of a[i'] where kKeyOfAcc maps i' to i.
inline __m512 transpose_reduce16(__m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i) d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[i], c[i + 2]), _mm512_unpackhi_ps(c[i], c[i + 2]));
  return _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
}

// Paged caches read from DRAM (far_tiles): the loops prefetch the rows they read next
// (PREFETCHT0, as for every cache) and the next tile's rows into L2 (PREFETCHT1). With the near
// stream alone a new page's first rows come from DRAM late, while the hardware prefetchers run
// ahead of contiguous caches. (Interleaved, both orders, two threads from DRAM, net of the
// A = B drift of the contiguous runs: paged fp32 +3-10%, paged bf16 +4-10%; for bf16 that is
// also 0-7% above prefetching 32 KiB ahead without it. With the cache in L3 the second stream's
// instructions cost 25-35% (one or two threads, fp32 and bf16), hence far_tiles. Only the first
// 16 or 64 lines of each page of the next tile: +0-4%.) The loops take the prefetcher type as a
// template argument, so that the other caches do not pay a second stream's per-step check (3-10%
// with the cache in L3).
struct NearFarPrefetcher {
  TilePrefetcher near;
  RowPrefetcher<2> far;
  GK_INLINE void step() {
    near.step();
    far.step();
  }
};

// Row layout of a work item: NR = heads_kv * R real rows (row rr = kvh * R + r), computed in
// blocks of 4 (NR4) and laid out on NRP = NR rounded up to 16 lanes. Padding rows have a zero
// query and are never written out.
struct RowLayout {
  int64_t R, NR, NR4, NRP;
  explicit RowLayout(const DecodeParams& p)
      : R(p.seqlen_q * p.group()), NR(p.heads_kv * R), NR4((NR + 3) / 4 * 4), NRP((NR + 15) / 16 * 16) {}
  int64_t head(int64_t rr) const { return std::min(rr / R, NR / R - 1); }
};

// S^T[i][rr] = q_rr . k(token i) for the nk tokens of the tile and every row; koff holds the
// tokens' element offsets (head 0), padded to a whole quad with valid offsets.
template <class T, bool kShared, class PF>
void tile_scores(const DecodeParams& p, const Scratch& sc, const RowLayout& rl, int nk, const int64_t* koff, float* st,
                 PF& pf) {
  const int64_t D = p.head_dim;
  constexpr bool kBF16 = std::is_same_v<T, bf16_t>;
  constexpr int kStep = kBF16 ? 32 : 16;  // head dims per accumulation step
  const T* k = static_cast<const T*>(p.k);
  for (int i0 = 0; i0 < nk; i0 += 4) {
    for (int64_t g = 0; g < rl.NR4; g += 4) {
      const T* kp[4][4];  // [token][row of the block]
      for (int j = 0; j < 4; ++j) {
        const T* base = k + sc.row_koff[g + j];
        for (int t = 0; t < 4; ++t) kp[t][j] = base + koff[i0 + t];
      }
      __m512 acc[16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += kStep) {
        pf.step();
        if constexpr (kBF16) {
          __m512bh q[4];
          for (int j = 0; j < 4; ++j) q[j] = (__m512bh)_mm512_loadu_si512(sc.qb.data() + (g + j) * D + d);
          for (int t = 0; t < 4; ++t) {
            if constexpr (kShared) {
              const __m512bh x = (__m512bh)_mm512_loadu_si512(kp[t][0] + d);
              for (int j = 0; j < 4; ++j) acc[kKeyOfAcc[t * 4 + j]] = _mm512_dpbf16_ps(acc[kKeyOfAcc[t * 4 + j]], q[j], x);
            } else {
              for (int j = 0; j < 4; ++j)
                acc[kKeyOfAcc[t * 4 + j]] = _mm512_dpbf16_ps(acc[kKeyOfAcc[t * 4 + j]], q[j], (__m512bh)_mm512_loadu_si512(kp[t][j] + d));
            }
          }
        } else {
          __m512 q[4];
          for (int j = 0; j < 4; ++j) q[j] = _mm512_loadu_ps(sc.q.data() + (g + j) * D + d);
          for (int t = 0; t < 4; ++t) {
            if constexpr (kShared) {
              const __m512 x = VecF::load(kp[t][0] + d).v;
              for (int j = 0; j < 4; ++j) acc[kKeyOfAcc[t * 4 + j]] = _mm512_fmadd_ps(q[j], x, acc[kKeyOfAcc[t * 4 + j]]);
            } else {
              for (int j = 0; j < 4; ++j)
                acc[kKeyOfAcc[t * 4 + j]] = _mm512_fmadd_ps(q[j], VecF::load(kp[t][j] + d).v, acc[kKeyOfAcc[t * 4 + j]]);
            }
          }
        }
      }
      alignas(64) float s[16];  // lane t * 4 + j: token i0 + t, row g + j
      _mm512_store_ps(s, transpose_reduce16(acc));
      for (int t = 0; t < 4 && i0 + t < nk; ++t) _mm_storeu_ps(st + (i0 + t) * rl.NRP + g, _mm_load_ps(s + 4 * t));
    }
  }
}

// Scores -> probabilities for tokens [t0, t0 + nk), and the online-softmax update of every row
// (m, l; alpha = the factor for the row's accumulator). The probabilities go in place over S^T,
// or with pp (bf16 caches) to pp[j][rr] = (bf16 p(token 2j), bf16 p(token 2j + 1)), the pair of
// an odd last token completed with 0: the form pv_pass_bf16 reads. (Writing the pairs from the
// exp loop instead of a pass of their own over S^T: bf16 +1-2% with the cache in L3, median of
// six interleaved runs.)
void tile_softmax(const DecodeParams& p, Scratch& sc, const RowLayout& rl, int64_t b, int64_t t0, int nk, bool mask,
                  float* st, uint32_t* pp) {
  const int64_t G = p.group(), Sq = p.seqlen_q, L = p.cache_seqlens[b];
  const bool plain = p.softcap == 0.f && !p.alibi_slopes;
  if (!plain) {  // softcap / ALiBi: the scalar rule of decode_params.h on the real rows
    for (int64_t rr = 0; rr < rl.NR; ++rr) {
      const int64_t kvh = rr / rl.R, r = rr % rl.R, s = r / G, h = kvh * G + r % G, pos = s + L - Sq;
      const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
      for (int i = 0; i < nk; ++i) st[i * rl.NRP + rr] = decode_score(st[i * rl.NRP + rr], p.scale, p.softcap, slope, pos - (t0 + i));
    }
  }
  const __m512 scale = _mm512_set1_ps(plain ? p.scale : 1.f), neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < rl.NRP; c += 16) {
    const __m512i lo = _mm512_loadu_si512(sc.lo32.data() + c), hi = _mm512_loadu_si512(sc.hi32.data() + c);
    VecF mt = VecF::set1(-INFINITY);
    for (int i = 0; i < nk; ++i) {
      float* sp = st + i * rl.NRP + c;
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(sp), scale);
      if (mask) {  // visible iff lo <= t < hi
        const __m512i t = _mm512_set1_epi32(int32_t(t0 + i));
        const __mmask16 vis = _mm512_cmp_epi32_mask(t, lo, _MM_CMPINT_NLT) & _mm512_cmp_epi32_mask(t, hi, _MM_CMPINT_LT);
        s = _mm512_mask_mov_ps(neg_inf, vis, s);
      }
      _mm512_storeu_ps(sp, s);
      mt = max(mt, VecF{s});
    }
    const SoftmaxRescale<VecF> r = softmax_rescale<VecSoftmaxOps>(VecF::load(sc.m.data() + c), mt);
    VecF sum = VecF::zero();
    if (pp) {
      for (int i = 0; i < nk; i += 2) {
        const VecF e0 = vexp_nonpos(VecF::load(st + i * rl.NRP + c) - r.base);
        const VecF e1 = i + 1 < nk ? vexp_nonpos(VecF::load(st + (i + 1) * rl.NRP + c) - r.base) : VecF::zero();
        sum = sum + e0;
        sum = sum + e1;
        VecBF16Pairs::interleave(e0, e1).store(pp + (i / 2) * rl.NRP + c);
      }
    } else {
      for (int i = 0; i < nk; ++i) {
        float* sp = st + i * rl.NRP + c;
        const VecF e = vexp_nonpos(VecF::load(sp) - r.base);
        e.store(sp);
        sum = sum + e;
      }
    }
    r.m_new.store(sc.m.data() + c);
    fmadd(VecF::load(sc.l.data() + c), r.self, sum).store(sc.l.data() + c);
    r.self.store(sc.alpha.data() + c);
  }
}

// acc[rr] += sum_t P^T[t][rr] * v(token t) for the NT (1-4) tokens of a quad, every row; the
// value slab of one kv head (NT tokens x 64 dims, 32 at the tail) stays in registers while the
// head's rows update their accumulators.
template <class T, int NT, class PF>
void pv_quad(const DecodeParams& p, Scratch& sc, const RowLayout& rl, const float* pt, const int64_t* voff, PF& pf) {
  const int64_t D = p.head_dim, vs2 = p.v_stride[2], R = rl.R, H = p.heads_kv;
  const T* v = static_cast<const T*>(p.v);
  float* const acc_rows = sc.acc.data();
  const float* ptt[NT];  // P^T row of each token
  for (int t = 0; t < NT; ++t) ptt[t] = pt + t * rl.NRP;
  for (int64_t h = 0; h < H; ++h) {
    const T* vp[NT];
    for (int t = 0; t < NT; ++t) vp[t] = v + h * vs2 + voff[t];
    auto slab = [&](int64_t d0, auto cw) {
      constexpr int C = decltype(cw)::value;
      __m512 x[NT][C];
      for (int t = 0; t < NT; ++t)
        for (int c = 0; c < C; ++c) x[t][c] = VecF::load(vp[t] + d0 + 16 * c).v;
      float* acc = acc_rows + h * R * D + d0;
      for (int64_t rr = h * R; rr < (h + 1) * R; ++rr, acc += D) {
        pf.step();
        __m512 a[C];
        for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
        for (int t = 0; t < NT; ++t) {
          const __m512 w = _mm512_set1_ps(ptt[t][rr]);
          for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(w, x[t][c], a[c]);
        }
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
      }
    };
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) slab(d0, std::integral_constant<int, 4>{});
    if (d0 < D) slab(d0, std::integral_constant<int, 2>{});  // D % 64 == 32
  }
}

// bf16 caches: P.V as bf16 dot products over token pairs (VDPBF16PS), P rounded to bf16 as the
// flash kernels (CPU and CUDA) round it for their P.V. NT (1-8) tokens per pass: 8 halves the
// accumulator loads and stores per token against a quad (+8-10% with the cache in L2; 16 value
// registers per 64-dim slab). pp holds the tokens' probabilities in pairs
// (lane rr of pair j = p(token 2j), p(token 2j + 1)); the pair's value rows are interleaved with
// VPUNPCKL/HWD, so a 32-dim group's accumulator holds dims {0-3, 8-11, 16-19, 24-27} in its
// first 16 floats and {4-7, 12-15, 20-23, 28-31} in the next 16 (unpermute_bf16_acc restores the
// order). Per pair of tokens and 32 dims: 2 shuffles and a dot product per row, where the fp32
// form converts 4 vectors and issues 2 FMAs per row.
template <int NT, class PF>
void pv_pass_bf16(const DecodeParams& p, Scratch& sc, const RowLayout& rl, const uint32_t* pp, const int64_t* voff,
                  PF& pf) {
  constexpr int NP = (NT + 1) / 2;
  const int64_t D = p.head_dim, vs2 = p.v_stride[2], R = rl.R, H = p.heads_kv;
  const bf16_t* v = static_cast<const bf16_t*>(p.v);
  float* const acc_rows = sc.acc.data();
  const uint32_t* ppj[NP];  // probability pairs j of every row
  for (int j = 0; j < NP; ++j) ppj[j] = pp + j * rl.NRP;
  for (int64_t h = 0; h < H; ++h) {
    const bf16_t* vp[NT];
    for (int t = 0; t < NT; ++t) vp[t] = v + h * vs2 + voff[t];
    auto slab = [&](int64_t d0, auto cw) {
      constexpr int C = decltype(cw)::value;  // 32-dim groups
      __m512i x[NP][2 * C];
      for (int j = 0; j < NP; ++j)
        for (int c = 0; c < C; ++c) {
          const __m512i v0 = _mm512_loadu_si512(vp[2 * j] + d0 + 32 * c);
          const __m512i v1 = 2 * j + 1 < NT ? _mm512_loadu_si512(vp[2 * j + 1] + d0 + 32 * c) : _mm512_setzero_si512();
          x[j][2 * c] = _mm512_unpacklo_epi16(v0, v1), x[j][2 * c + 1] = _mm512_unpackhi_epi16(v0, v1);
        }
      float* acc = acc_rows + h * R * D + d0;
      for (int64_t rr = h * R; rr < (h + 1) * R; ++rr, acc += D) {
        pf.step();
        __m512 a[2 * C];
        for (int c = 0; c < 2 * C; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
        for (int j = 0; j < NP; ++j) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(int(ppj[j][rr]));
          for (int c = 0; c < 2 * C; ++c) a[c] = _mm512_dpbf16_ps(a[c], w, (__m512bh)x[j][c]);
        }
        for (int c = 0; c < 2 * C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
      }
    };
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) slab(d0, std::integral_constant<int, 2>{});
    if (d0 < D) slab(d0, std::integral_constant<int, 1>{});  // D % 64 == 32
  }
}

// Restores head-dim order in the rows' accumulators after pv_pass_bf16 (see there).
inline void unpermute_bf16_acc(const DecodeParams& p, Scratch& sc, const RowLayout& rl) {
  // output dim k of a 32-dim group sits at position 4 * (k / 8) + k % 4 of the first 16 floats
  // (k % 8 < 4) or of the next 16 (index + 16 in VPERMT2PS terms)
  alignas(64) int32_t idx[32];
  for (int k = 0; k < 32; ++k) idx[k] = 4 * (k / 8) + k % 4 + (k % 8 < 4 ? 0 : 16);
  const __m512i i0 = _mm512_load_si512(idx), i1 = _mm512_load_si512(idx + 16);
  for (int64_t rr = 0; rr < rl.NR; ++rr)
    for (int64_t d = 0; d < p.head_dim; d += 32) {
      float* acc = sc.acc.data() + rr * p.head_dim + d;
      const __m512 lo = _mm512_loadu_ps(acc), hi = _mm512_loadu_ps(acc + 16);
      _mm512_storeu_ps(acc, _mm512_permutex2var_ps(lo, i0, hi));
      _mm512_storeu_ps(acc + 16, _mm512_permutex2var_ps(lo, i1, hi));
    }
}

// Prefetch distance in tokens of `token_bytes` each (all kv heads) for P.V passes of `pass`
// tokens: about `bytes`, a whole number of passes (a pass reads its tokens' values together, so
// a prefetch closer than a pass would come after the load), at most a tile.
inline int prefetch_ahead(int64_t bytes, int64_t token_bytes, int pass) {
  const int64_t passes = (bytes + token_bytes * pass - 1) / (token_bytes * pass);
  return int(std::min<int64_t>(passes * pass, kTileA));
}

// The work item (b, split) for head dims that are multiples of 32. Rows come initialised by
// init_rows (q, zero accumulators, visible ranges; bf16 q for bf16 caches); leaves each row's
// accumulator and SoftmaxStats in `sc` for the caller's finish step.
template <class T, bool kFar>
void decode_work_item_avx512(const DecodeParams& p, Scratch& sc, int64_t b, const KeyRange split_keys) {
  const RowLayout rl(p);
  const int64_t D = p.head_dim;
  // padding rows: zero queries; their lanes see the whole split, so they never force a mask
  std::fill(sc.q.begin() + rl.NR * D, sc.q.begin() + rl.NR4 * D, 0.f);
  std::fill(sc.qb.begin() + rl.NR * D, sc.qb.begin() + rl.NR4 * D, bf16_t{});
  int64_t lo_max = split_keys.lo, hi_min = split_keys.hi;
  for (int64_t rr = 0; rr < rl.NRP; ++rr) {
    const bool real = rr < rl.NR;
    sc.lo32[rr] = int32_t(real ? sc.lo[rr] : split_keys.lo), sc.hi32[rr] = int32_t(real ? sc.hi[rr] : split_keys.hi);
    sc.m[rr] = -INFINITY, sc.l[rr] = 0.f;
    sc.row_koff[rr] = rl.head(std::min(rr, rl.NR - 1)) * p.k_stride[2];
    lo_max = std::max<int64_t>(lo_max, sc.lo32[rr]), hi_min = std::min<int64_t>(hi_min, sc.hi32[rr]);
  }
  const bool shared = rl.R % 4 == 0;  // every block of 4 rows belongs to one kv head
  const int64_t H = p.heads_kv, esize = sizeof(T);
  constexpr bool kBF16 = std::is_same_v<T, bf16_t>;
  constexpr int64_t kStep = kBF16 ? 32 : 16;  // tile_scores' head dims per step
  // 16 KiB ahead; 32 KiB for paged 16-bit caches without the far stream (bf16 paged from DRAM
  // +1-6% over 16 KiB, interleaved both ways; fp32 paged at 32 KiB lost 4-7%)
  const int ahead = prefetch_ahead((p.paged() && esize == 2 && !kFar ? 32 : 16) << 10, H * D * esize, kBF16 ? 8 : 4);
  TileOffsets offs(p, sc, b, split_keys, kTileA);
  float* st = sc.scores.data();
  for (int64_t t0 = split_keys.lo; t0 < split_keys.hi; t0 += kTileA) {
    int64_t* koff = offs.k[0];
    int64_t* voff = offs.v[0];
    const int nk = tile_tokens(split_keys, t0, kTileA);
    for (int j = nk; j < (nk + 3) / 4 * 4; ++j) koff[j] = koff[0], voff[j] = voff[0];  // quad padding: token t0
    offs.warm_after_next(t0, esize);
    // the rows prefetched during this tile's K and V loops: tokens [t0 + ahead, t0 + ahead + kTileA)
    int64_t kpre[kTileA], vpre[kTileA];
    int npre = 0;
    for (int j = ahead; j < nk; ++j) kpre[npre] = koff[j], vpre[npre++] = voff[j];
    for (int j = 0, nn = tile_tokens(split_keys, t0 + kTileA, kTileA); j < ahead && j < nn; ++j)
      kpre[npre] = offs.k[1][j], vpre[npre++] = offs.v[1][j];
    const int64_t quads = (nk + 3) / 4, row_bytes = D * esize, slabs = (D + 63) / 64;
    const int64_t k_steps = quads * (rl.NR4 / 4) * (D / kStep);
    // P.V passes: bf16 takes the tile 8 tokens at a time, then a quad and a tail
    const int64_t pv_passes = kBF16 ? nk / 8 + (nk % 8) / 4 + (nk % 4 != 0) : quads, v_steps = pv_passes * rl.NR * slabs;
    const TilePrefetcher knear(p.k, esize, kpre, npre, H, p.k_stride[2], row_bytes, k_steps);
    const TilePrefetcher vnear(p.v, esize, vpre, npre, H, p.v_stride[2], row_bytes, v_steps);
    std::conditional_t<kFar, NearFarPrefetcher, TilePrefetcher> kpf{knear}, vpf{vnear};
    if constexpr (kFar) {
      const int nn = tile_tokens(split_keys, t0 + kTileA, kTileA);
      kpf.far = RowPrefetcher<2>(p.k, esize, offs.k[1], nn, H, p.k_stride[2], row_bytes, k_steps);
      vpf.far = RowPrefetcher<2>(p.v, esize, offs.v[1], nn, H, p.v_stride[2], row_bytes, v_steps);
    }
    if (shared) tile_scores<T, true>(p, sc, rl, nk, koff, st, kpf);
    else tile_scores<T, false>(p, sc, rl, nk, koff, st, kpf);
    uint32_t* pp = kBF16 ? sc.pairs.data() : nullptr;
    tile_softmax(p, sc, rl, b, t0, nk, lo_max > t0 || hi_min < t0 + nk, st, pp);
    for (int64_t rr = 0; rr < rl.NR; ++rr) {
      const float a = sc.alpha[rr];
      if (a == 1.f) continue;
      float* acc = sc.acc.data() + rr * D;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(a)));
    }
    auto pv = [&](auto nt, int i) {  // P.V for the NT tokens [i, i + NT)
      constexpr int NT = decltype(nt)::value;
      if constexpr (kBF16) pv_pass_bf16<NT>(p, sc, rl, pp + i / 2 * rl.NRP, voff + i, vpf);
      else pv_quad<T, NT>(p, sc, rl, st + i * rl.NRP, voff + i, vpf);
    };
    int i0 = 0;
    if constexpr (kBF16)
      for (; i0 + 8 <= nk; i0 += 8) pv(std::integral_constant<int, 8>{}, i0);
    for (; i0 + 4 <= nk; i0 += 4) pv(std::integral_constant<int, 4>{}, i0);
    switch (nk - i0) {
      case 3: pv(std::integral_constant<int, 3>{}, i0); break;
      case 2: pv(std::integral_constant<int, 2>{}, i0); break;
      case 1: pv(std::integral_constant<int, 1>{}, i0); break;
      default: break;
    }
    offs.step();
  }
  if constexpr (kBF16) unpermute_bf16_acc(p, sc, rl);
  for (int64_t rr = 0; rr < rl.NR; ++rr) sc.stats[rr] = SoftmaxStats{sc.m[rr], sc.l[rr]};
}

template <class T>
void decode_work_item_avx512(const DecodeParams& p, Scratch& sc, int64_t b, const KeyRange split_keys, bool far_tiles) {
  if (far_tiles && p.paged()) return decode_work_item_avx512<T, true>(p, sc, b, split_keys);  // see NearFarPrefetcher
  decode_work_item_avx512<T, false>(p, sc, b, split_keys);
}

#endif  // GK_SIMD_AVX512
