// AVX-512 work item of the CPU decode attention (included by cpu/kernels/decode_attention.cpp
// inside its ISA namespace; only the AVX-512 level compiles it). Same work split, algorithm, tiling and
// csrc/core softmax state as the generic work item, with the instruction count per cache byte
// cut so that two cores keep up with memory:
//  - K and V are read straight from the cache in their dtype (no fp32 tile copy): fp16 through
//    VCVTPH2PS, bf16 scores through VDPBF16PS (q is bf16 already, products exact in fp32);
//  - one row's 16 scores of a tile come from 16 accumulators and a 45-instruction transpose
//    reduction (instead of 16 horizontal sums), landing as one vector: lane j = key j;
//  - softmax is vector code on that register; P.V updates up to 4 rows x 64 dims per V load.
#pragma once
#if defined(GK_SIMD_AVX512)

// Accumulator i of dot16 holds key kKeyOfAcc[i], so that the transpose reduction's output lane j
// is key j (the reduction leaves lane order 0-3, 8-11, 4-7, 12-15).
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

// Raw dot products of one query row with the 16 keys `k` (rows of D elements), lane j = key j.
// `qf` is the fp32 row (fp32/fp16 caches), `qb` the bf16 row (bf16 caches).
template <class T>
inline __m512 dot16(const float* qf, const bf16_t* qb, const T* const* k, int64_t D) {
  __m512 acc[16];
  const T* kp[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps(), kp[i] = k[kKeyOfAcc[i]];
  if constexpr (std::is_same_v<T, bf16_t>) {
    (void)qf;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qb + d);
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], q, (__m512bh)_mm512_loadu_si512(kp[i] + d));
    }
  } else {
    (void)qb;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 q = _mm512_loadu_ps(qf + d);
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(q, VecF::load(kp[i] + d).v, acc[i]);
    }
  }
  return transpose_reduce16(acc);
}

// acc[r][d] += sum_j p[r][j] * v[j][d] for kRows rows, 64 dims per pass (16 accumulators).
template <int kRows, class T>
inline void pv_rows(float* const* acc, const float* const* p, const T* const* v, int nkeys, int64_t D) {
  for (int64_t d = 0; d < D; d += 64) {
    __m512 a[kRows][4];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(acc[r] + d + 16 * c);
    for (int j = 0; j < nkeys; ++j) {
      __m512 x[4];
      for (int c = 0; c < 4; ++c) x[c] = VecF::load(v[j] + d + 16 * c).v;
      for (int r = 0; r < kRows; ++r) {
        const __m512 w = _mm512_set1_ps(p[r][j]);
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(w, x[c], a[r][c]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc[r] + d + 16 * c, a[r][c]);
  }
}

// The work item (b, split) for head dims that are multiples of 64: rows initialised by
// init_rows (bf16 q for bf16 caches); leaves the accumulators and SoftmaxStats of every row of
// every kv head in `sc` for the caller's finish step.
template <class T>
void decode_work_item_avx512(const DecodeParams& p, Scratch& sc, int64_t b, const KeyRange split_keys) {
  const int64_t D = p.head_dim, G = p.group(), Sq = p.seqlen_q, R = Sq * G, L = p.cache_seqlens[b];
  const bool plain_scores = p.softcap == 0.f && !p.alibi_slopes;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // Token offsets of the current and the next tile (double buffer): page lookups hoisted out of
  // every inner loop and shared by all kv heads. While head h of this tile computes, head h's
  // rows of the next tile are prefetched into L2: the prefetches are spread evenly over the
  // tile's work (a burst would overflow the miss buffers), and pages jump anywhere, so the
  // hardware prefetchers alone cannot run ahead across a page boundary.
  int64_t* offs[2][2] = {{sc.koff.data(), sc.voff.data()}, {sc.koff.data() + kTile, sc.voff.data() + kTile}};
  constexpr int kLineBytes = 64;
  const int64_t ks2 = p.k_stride[2], vs2 = p.v_stride[2];
  const int64_t row_bytes = D * int64_t(sizeof(T));
  auto prefetch_head = [&](const int64_t* ko, const int64_t* vo, int nk, int64_t kvh) {
    const char* kb = static_cast<const char*>(p.k) + kvh * ks2 * int64_t(sizeof(T));
    const char* vb = static_cast<const char*>(p.v) + kvh * vs2 * int64_t(sizeof(T));
    for (int j = 0; j < nk; ++j) {
      const char* kr = kb + ko[j] * int64_t(sizeof(T));
      const char* vr = vb + vo[j] * int64_t(sizeof(T));
      for (int64_t off = 0; off < row_bytes; off += kLineBytes) _mm_prefetch(kr + off, _MM_HINT_T1), _mm_prefetch(vr + off, _MM_HINT_T1);
    }
  };
  if (split_keys.lo < split_keys.hi)
    lookup_tile(p, b, split_keys.lo, int(std::min<int64_t>(kTile, split_keys.hi - split_keys.lo)), offs[0][0], offs[0][1]);

  for (int64_t t0 = split_keys.lo, it = 0; t0 < split_keys.hi; t0 += kTile, ++it) {
    const int nk = int(std::min<int64_t>(kTile, split_keys.hi - t0));
    const int64_t* ko = offs[it & 1][0];
    const int64_t* vo = offs[it & 1][1];
    const int nk_next = int(std::max<int64_t>(0, std::min<int64_t>(kTile, split_keys.hi - t0 - kTile)));
    if (nk_next) lookup_tile(p, b, t0 + kTile, nk_next, offs[(it + 1) & 1][0], offs[(it + 1) & 1][1]);
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      if (nk_next) prefetch_head(offs[(it + 1) & 1][0], offs[(it + 1) & 1][1], nk_next, kvh);
      const T* kptr[kTile];
      const T* vptr[kTile];
      const T* kbase = static_cast<const T*>(p.k) + kvh * ks2;
      const T* vbase = static_cast<const T*>(p.v) + kvh * vs2;
      for (int j = 0; j < kTile; ++j) kptr[j] = kbase + ko[j], vptr[j] = vbase + vo[j];

      // scores and softmax of every row; rows without a visible key in the tile get p = 0
      for (int64_t r = 0; r < R; ++r) {
        const int64_t rr = kvh * R + r, lo = sc.lo[rr], hi = sc.hi[rr];
        float* prow = sc.scores.data() + rr * kTile;
        if (hi <= t0 || lo >= t0 + nk) {
          _mm512_storeu_ps(prow, _mm512_setzero_ps());
          continue;
        }
        __m512 s = dot16<T>(sc.q.data() + rr * D, sc.qb.data() + rr * D, kptr, D);
        if (plain_scores) {
          s = _mm512_mul_ps(s, _mm512_set1_ps(p.scale));
          if (lo > t0 || hi < t0 + kTile) {  // partly visible tile: mask lanes outside [lo, hi)
            const __m512i t = _mm512_add_epi32(lane, _mm512_set1_epi32(int(t0 - lo)));
            const __mmask16 vis = _mm512_cmp_epi32_mask(t, _mm512_setzero_si512(), _MM_CMPINT_NLT) &
                                  _mm512_cmp_epi32_mask(t, _mm512_set1_epi32(int(hi - lo)), _MM_CMPINT_LT);
            s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), vis, s);
          }
          _mm512_storeu_ps(prow, s);
        } else {
          _mm512_storeu_ps(prow, s);
          const int64_t sq = r / G, h = kvh * G + r % G, pos = sq + L - Sq;
          const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
          for (int j = 0; j < kTile; ++j) {
            const int64_t t = t0 + j;
            prow[j] = (t >= lo && t < hi) ? decode_score(prow[j], p.scale, p.softcap, slope, pos - t) : -INFINITY;
          }
          s = _mm512_loadu_ps(prow);
        }
        const float m_tile = _mm512_reduce_max_ps(s);
        if (m_tile == -INFINITY) {
          _mm512_storeu_ps(prow, _mm512_setzero_ps());
          continue;
        }
        _mm512_storeu_ps(prow, _mm512_sub_ps(s, _mm512_set1_ps(m_tile)));
        exp_tile(prow);
        const __m512 e = _mm512_loadu_ps(prow);
        const MergeFactors f = sc.stats[rr].merge(m_tile, _mm512_reduce_add_ps(e));
        float* acc = sc.acc.data() + rr * D;
        if (f.self != 1.f)
          for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(f.self)));
        _mm512_storeu_ps(prow, _mm512_mul_ps(e, _mm512_set1_ps(f.other)));
      }
      // P.V, four rows per pass over the tile's V rows
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        float* acc[4];
        const float* pr[4];
        const int rows = int(std::min<int64_t>(4, R - r0));
        for (int i = 0; i < rows; ++i) {
          const int64_t rr = kvh * R + r0 + i;
          acc[i] = sc.acc.data() + rr * D, pr[i] = sc.scores.data() + rr * kTile;
        }
        switch (rows) {
          case 4: pv_rows<4>(acc, pr, vptr, nk, D); break;
          case 3: pv_rows<3>(acc, pr, vptr, nk, D); break;
          case 2: pv_rows<2>(acc, pr, vptr, nk, D); break;
          default: pv_rows<1>(acc, pr, vptr, nk, D); break;
        }
      }
    }
  }
}

#endif  // GK_SIMD_AVX512
