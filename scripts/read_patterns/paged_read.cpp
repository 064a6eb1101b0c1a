// Developer tool (not part of the package): how fast this machine reads a decode cache laid out
// contiguously and through a shuffled page table, with the CPU decode kernel's access pattern but
// none of its attention math, so that a paged / contiguous gap can be told apart from the kernel.
//
// Two threads each stream half of the tokens in tiles of 32: the tile's K rows, then its V rows,
// while prefetching the next tile's rows (PREFETCHT0, one line per line read, in token order), as
// the kernel does. Paged: 16-token pages in a randomly permuted pool. A third pass sums the same
// bytes in address order with the hardware prefetchers alone, as torch.sum reads them (the
// benchmark's reference). Calls rotate over the three and over the input sets; prints the median
// GB/s of each and the paged / contiguous time ratio.
//
//   g++ -O2 -march=native -fopenmp scripts/read_patterns/paged_read.cpp -o /tmp/paged_read
//   /tmp/paged_read ROW_BYTES TOKENS SETS REPS [FMAS]
//   /tmp/paged_read 2048 16384 3 15     # bf16, 8 kv heads x 128: 2 KiB per token row
//   /tmp/paged_read 4096 8192 3 15      # fp32
//   HUGE=1 /tmp/paged_read ...          # the sets on transparent huge pages
// FMAS (default 0) adds that many FMAs per 64-byte line read, to mimic compute.
// Measured (two runs each, slow host state, sum 39-50 GB/s): bf16 rows, paged / contiguous time
// 1.19-1.24 on 4 KiB pages and 1.19-1.21 on huge pages; fp32 rows 1.00-1.10 and 1.06. So the
// gap of this pattern is not its TLB misses: huge pages sped up both layouts alike.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s ROW_BYTES TOKENS SETS REPS [FMAS]\n", argv[0]);
    return 2;
  }
  const size_t row = std::strtoul(argv[1], nullptr, 10), tokens = std::strtoul(argv[2], nullptr, 10);
  const int sets = std::atoi(argv[3]), reps = std::atoi(argv[4]), fmas = argc > 5 ? std::atoi(argv[5]) : 0;
  constexpr size_t kPage = 16, kTile = 32;
  if (row == 0 || row % 64 || tokens % (2 * kTile) || sets < 1 || reps < 1 || fmas < 0) {
    std::fprintf(stderr, "ROW_BYTES a multiple of 64, TOKENS a multiple of 64, SETS and REPS >= 1\n");
    return 2;
  }
  // HUGE=1: the sets on transparent huge pages (2 MiB aligned, MADV_HUGEPAGE before the first touch)
  const bool huge = std::getenv("HUGE") && std::atoi(std::getenv("HUGE")) == 1;
  const size_t align = huge ? size_t(2) << 20 : 4096, alloc_bytes = (tokens * row + align - 1) / align * align;
  std::vector<char*> K(sets), V(sets);
  for (int s = 0; s < sets; ++s)
    for (char** buf : {&K[s], &V[s]}) {
      *buf = static_cast<char*>(std::aligned_alloc(align, alloc_bytes));
      if (huge && madvise(*buf, alloc_bytes, MADV_HUGEPAGE) != 0) std::perror("madvise");
      std::memset(*buf, 0, alloc_bytes);
    }
  std::vector<size_t> contiguous(tokens / kPage), shuffled(tokens / kPage);
  for (size_t i = 0; i < contiguous.size(); ++i) contiguous[i] = shuffled[i] = i;
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(1));
  std::vector<double> secs[3];  // contiguous, paged, plain sum
  float sink = 0.f;
  for (int r = 0; r < reps; ++r)
    for (int layout = 0; layout < 3; ++layout) {
      const std::vector<size_t>& table = layout == 1 ? shuffled : contiguous;
      const int s = (3 * r + layout) % sets;
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(2) reduction(+ : sink)
      {
        const size_t lo = tokens / 2 * size_t(omp_get_thread_num()), hi = lo + tokens / 2;
        const __m512 w = _mm512_set1_ps(1.0001f);
        __m512 acc[8];
        for (auto& a : acc) a = _mm512_setzero_ps();
        auto at = [&](char* base, size_t t) { return base + (table[t / kPage] * kPage + t % kPage) * row; };
        if (layout == 2) {  // plain sum: this thread's half of K, then of V
          for (char* base : {K[s], V[s]})
            for (size_t off = lo * row; off < hi * row; off += 64) {
              __m512& a = acc[(off / 64) & 7];
              a = _mm512_add_ps(a, _mm512_load_ps(reinterpret_cast<const float*>(base + off)));
            }
        } else {  // the kernel's pattern, contiguous or paged
          for (size_t t = lo; t < hi; t += kTile)
            for (char* base : {K[s], V[s]}) {
              const bool next = t + kTile < hi;
              size_t pt = 0, pl = 0;  // next tile's prefetch cursor: token, byte in row
              for (size_t i = 0; i < kTile; ++i) {
                const char* p = at(base, t + i);
                for (size_t l = 0; l < row; l += 64) {
                  if (next && pt < kTile) {
                    _mm_prefetch(at(base, t + kTile + pt) + pl, _MM_HINT_T0);
                    if ((pl += 64) == row) pl = 0, ++pt;
                  }
                  const __m512 x = _mm512_load_ps(reinterpret_cast<const float*>(p + l));
                  __m512& a = acc[(l / 64) & 7];
                  a = _mm512_add_ps(a, x);
                  for (int f = 0; f < fmas; ++f) a = _mm512_fmadd_ps(x, w, a);
                }
              }
            }
        }
        for (auto& a : acc) sink += _mm512_reduce_add_ps(a);
      }
      secs[layout].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  for (auto& v : secs) std::sort(v.begin(), v.end());
  const double c = secs[0][reps / 2], p = secs[1][reps / 2], sum = secs[2][reps / 2], bytes = 2.0 * double(tokens * row);
  std::printf("%srow %zu B, %zu tokens, %d FMAs/line: contiguous %.1f GB/s, paged (16-token pages, shuffled) %.1f GB/s, plain sum %.1f GB/s; paged/contiguous time %.3f\n",
              huge ? "huge pages: " : "", row, tokens, fmas, bytes / c / 1e9, bytes / p / 1e9, bytes / sum / 1e9, p / c);
  return sink == 12345.f;  // keeps the loads
}
