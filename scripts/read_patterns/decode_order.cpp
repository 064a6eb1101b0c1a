// Developer tool (not part of the package): how fast two threads (THREADS=n: n) read a decode
// cache in the orders the CPU decode kernel could use, with none of its math. fp32 contiguous
// layout, 8 kv heads x 128 dims: a token row is 4 KiB (8 heads x 512 B). Each thread reads its
// share of the tokens.
//   plain          K half, then V half, in address order: the reference (as torch.sum reads)
//   tilesN         K rows of a tile of N tokens in address order, then its V rows, tile by tile
//   tilesN+pf      the same with a PREFETCHT0 16 KiB ahead per line read (as the kernel)
//   quadsN+pf      the kernel's order: tiles of N tokens, 4-token quads, head after head (four
//                  512-byte runs a token apart at once), PREFETCHT0 16 KiB ahead in address order
//   quads32+cpf    the kernel's order, prefetching in that order (each line read, 16 KiB on)
//   quads32        the kernel's order without prefetch
// Every line is one load and one add into one of four register accumulators.
//
//   g++ -O2 -mavx512f -fopenmp scripts/read_patterns/decode_order.cpp -o /tmp/decode_order
//   /tmp/decode_order [ROUNDS]
//   THREADS=1 /tmp/decode_order 12 # one thread: this host's per-core limit (see below)
//   FAST=65 /tmp/decode_order 4    # before each round, wait (up to 10 min) until a probe sum
//                                  # reads 65 GB/s: this host reads 45-50 GB/s most of the time
//                                  # and 75-83 for a few minutes now and then
//
// Measured (2026-11-22), this version, slow host state, 4 rounds, two runs: plain 34, tiles32
// 31-32, tiles32+pf 36-38, quads32+pf 32-38, tiles128 32, quads128+pf 32-36, quads32 35-38 GB/s.
// An earlier version chose the accumulator with a branch per line. In the fast state it read:
//   plain 79-83, tiles32 63-67, tiles128 66-68, tiles32+pf 70-77, quads32+pf 61-63,
//   quads128+pf 63-67, quads256+pf 61-66, and quads32 27-28 in both states.
// This version reads quads32 as fast as plain. So the 27-28 came from the per-line work, not
// from the order, and per-line work costs bandwidth here: a sum that kept its accumulators on the
// stack read 62 GB/s in the fast state where a register loop read 81.
//
// One thread (2026-11-23, THREADS=1, 12 rounds, three runs): plain 34-37, tiles32 34-35,
// tiles32+pf 34-36, quads32+pf 26-29, quads32+cpf 24-26, tiles128 34-35, quads128+pf 28,
// quads32 27-30 GB/s. Two threads in between: plain 40, tiles32+pf 46, quads32+pf 42,
// quads32+cpf 39, quads32 47. One thread reads at this host's per-core limit, as both threads do
// in its fast state (two-thread sums of 78-82 GB/s there, one-thread sums of 34-39 here), and
// there the quad order reads 15-25% below address order, math or no math; the CPU decode kernel
// reads 72-80% of a one-thread plain sum, as it reads 73-76% of torch.sum in the fast state. But
// an address-order variant of the kernel's scores loop (token after token, heads in order: one
// key load, four query loads and four FMAs a line) read no faster from DRAM at one thread
// (contiguous fp32 +3-5%, paged and bf16 -1..-9%) and 16-19% slower from L2: with the math in
// the loop, the order's advantage is gone.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

int g_threads = 2;
constexpr size_t kRow = 4096, kHead = 512, kTokens = 16384, kAhead = 16384;

struct Acc {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  float total() const { return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))); }
};

inline __m512 line(const char* p) { return _mm512_load_ps(reinterpret_cast<const float*>(p)); }

// Four lines from p, p + stride, ...: one per accumulator.
inline void add4(Acc& s, const char* p, size_t stride) {
  s.a[0] = _mm512_add_ps(s.a[0], line(p));
  s.a[1] = _mm512_add_ps(s.a[1], line(p + stride));
  s.a[2] = _mm512_add_ps(s.a[2], line(p + 2 * stride));
  s.a[3] = _mm512_add_ps(s.a[3], line(p + 3 * stride));
}

enum Pattern { kPlain, kTiles, kQuads, kQuadsInOrder };

float read(Pattern pattern, size_t tile, bool prefetch, const char* K, const char* V) {
  float total = 0.f;
#pragma omp parallel num_threads(g_threads) reduction(+ : total)
  {
    const size_t share = kTokens / size_t(g_threads), lo = share * size_t(omp_get_thread_num()), hi = lo + share;
    Acc s;
    if (pattern == kPlain) {
      for (const char* base : {K, V})
        for (size_t off = lo * kRow; off < hi * kRow; off += 256) add4(s, base + off, 64);
    } else {
      for (size_t t = lo; t < hi; t += tile)
        for (const char* base : {K, V}) {
          const char* p = base + t * kRow;
          const char* pf = p + kAhead;  // address-order prefetch cursor, 4 lines per 4 lines read
          const char* pf_end = base + hi * kRow;
          auto prefetch4 = [&] {
            if (prefetch && pf < pf_end) {
              for (int i = 0; i < 4; ++i) _mm_prefetch(pf + 64 * i, _MM_HINT_T0);
              pf += 256;
            }
          };
          if (pattern == kTiles) {
            for (size_t off = 0; off < tile * kRow; off += 256) prefetch4(), add4(s, p + off, 64);
          } else {  // quads: for each head and line of the head, that line of the quad's 4 tokens
            for (size_t q = 0; q < tile; q += 4)
              for (size_t h = 0; h < kRow / kHead; ++h)
                for (size_t l = 0; l < kHead; l += 64) {
                  const char* a = p + q * kRow + h * kHead + l;
                  if (pattern == kQuadsInOrder) {  // the same lines of the tokens 16 KiB on
                    if (a + kAhead + 3 * kRow < pf_end)
                      for (int i = 0; i < 4; ++i) _mm_prefetch(a + kAhead + i * kRow, _MM_HINT_T0);
                  } else {
                    prefetch4();
                  }
                  add4(s, a, kRow);
                }
          }
        }
    }
    total += s.total();
  }
  return total;
}

// GB/s of a plain read of one set (the FAST probe).
double probe(const char* K, const char* V) {
  const auto t0 = std::chrono::steady_clock::now();
  volatile float x = read(kPlain, 0, false, K, V);
  (void)x;
  return 2.0 * kTokens * kRow / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 6, sets = 5;
  const double fast = std::getenv("FAST") ? std::atof(std::getenv("FAST")) : 0.0;
  g_threads = std::getenv("THREADS") ? std::atoi(std::getenv("THREADS")) : 2;
  if (rounds < 1 || g_threads < 1 || kTokens % (32 * size_t(g_threads)) != 0) {
    std::fprintf(stderr, "usage: [FAST=GB/s] [THREADS=1|2|4|...] %s [ROUNDS >= 1]\n", argv[0]);
    return 2;
  }
  std::vector<char*> K(sets), V(sets);
  for (int s = 0; s < sets; ++s)
    for (char** b : {&K[s], &V[s]}) {
      *b = static_cast<char*>(std::aligned_alloc(4096, kTokens * kRow));
      std::memset(*b, 1, kTokens * kRow);
    }
  struct Variant {
    const char* name;
    Pattern pattern;
    size_t tile;
    bool prefetch;
  };
  const Variant variants[] = {{"plain", kPlain, 0, false},        {"tiles32", kTiles, 32, false},
                              {"tiles32+pf", kTiles, 32, true},   {"quads32+pf", kQuads, 32, true},
                              {"quads32+cpf", kQuadsInOrder, 32, true}, {"tiles128", kTiles, 128, false},
                              {"quads128+pf", kQuads, 128, true}, {"quads32", kQuads, 32, false}};
  constexpr int kVariants = sizeof(variants) / sizeof(variants[0]);
  std::vector<double> gbps[kVariants];
  int c = 0;
  volatile float sink = 0.f;
  for (int r = 0; r < rounds; ++r) {
    if (fast > 0) {  // wait for the host's fast state
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(10);
      double g = probe(K[0], V[0]);
      while (g < fast && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::seconds(2));
        g = probe(K[0], V[0]);
      }
      std::printf("round %d: probe %.1f GB/s\n", r, g);
    }
    for (int v = 0; v < kVariants; ++v) {
      const int s = c++ % sets;
      const auto t0 = std::chrono::steady_clock::now();
      sink = sink + read(variants[v].pattern, variants[v].tile, variants[v].prefetch, K[s], V[s]);
      gbps[v].push_back(2.0 * kTokens * kRow / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9);
    }
  }
  for (int v = 0; v < kVariants; ++v) {
    std::sort(gbps[v].begin(), gbps[v].end());
    std::printf("%s %.1f  ", variants[v].name, gbps[v][gbps[v].size() / 2]);
  }
  std::printf("GB/s (medians of %d rounds)\n", rounds);
  return sink == 12345.f;
}
