// Interleaved A/B timing of two builds of the CPU decode kernel (developer tool, not part of the
// package). build.sh compiles csrc/cpu/kernels/decode_attention.cpp from two source trees into
// the namespaces gk::cpu::va and gk::cpu::vb; this driver alternates calls to the two on the same
// shapes, so that both see the same machine state (this host's memory bandwidth moves by 2x
// within minutes), and prints the median GB/s of each.
//
// A and B take turns on one rotation of the input sets (call c reads set c % sets), so every call
// reads the set least recently read. (A: set i, B: set i + sets / 2 had A read, with 3 sets, the
// set B read just before it, partly from L3: A looked up to 10% faster.) SETS must be odd: with an
// even count A would only ever read the even sets and B the odd ones. A goes first in even pairs
// of calls, B in odd ones, so that neither always runs second. (Identical builds once measured B
// 5-9% faster whatever the set count and order: each build has its own per-thread scratch, and
// before the scratch was cache-line aligned one build's accumulators could straddle cache lines
// and the other's not. Check a new comparison against an A = B run, and in both orders.) Even
// with aligned scratch, a column whose code the change does not touch has measured one build
// 3-5% ahead in one order and behind in the other (code placement, presumably): when a change
// targets some cases (say paged caches), compare its columns net of an untouched one.
//
// Every call reads another set than the one before, so the kernel takes paged caches to come
// from DRAM (reads_from_dram) and runs their far prefetch stream even when the sets fit in L3.
//
// Usage: decode_ab LENGTH THREADS SETS REPS   (32 q heads / 8 kv heads, head dim 128; SETS odd)
// Environment: PAGE=n page size of the paged runs (default 16); BATCH=n sequences of LENGTH
// tokens each (default 1); SPLITS=n split-KV count (default 0: the kernel's heuristic);
// HUGE_B=1: B reads its own copy of every set, on transparent huge pages (MADV_HUGEPAGE), A the
// usual 4 KiB pages (with the same build as A and B, this measures what huge pages give).
// SUM=1: after every pair of calls, a plain sum of one set's K and V (THREADS threads, each its
// share in address order, hardware prefetch only, as torch.sum reads them: the benchmark's
// reference) joins the rotation, and each build's rate is also printed as a % of the sum's.
// FAST=x: before each pair of calls, wait until a plain sum of a buffer of its own reads x GB/s
// (probing every second; after 10 minutes of waiting in all, stop waiting and say so). This
// host reads 45-50 GB/s most of the time and 75-83 for a few minutes now and then; a kernel
// change can win in one state and lose in the other.
// PAIRS=1: transformers' cache layout as the integration reads it (see run()); paged columns skipped.
// (2026-11-23, two threads, 4k: the kernel read 78-85% of the plain sum there, and 30-42% with its
// software prefetch turned off: one contiguous 512-byte-row stream per item still needs it.)
// One thread from DRAM (THREADS 1, SUM=1) stands in for the fast state without the wait: a core
// then reads at its own limit, as both do in the fast state, and the kernel's % of the plain sum
// matches (72-80% at one thread, 2026-11-23; 73-76% of torch.sum in fast-state benchmark rows).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include "core/numeric.h"
#include "cpu/kernels.h"

namespace gk::cpu::va { template <class T> void decode_attention(const gk::DecodeParams& p, int num_threads); }
namespace gk::cpu::vb { template <class T> void decode_attention(const gk::DecodeParams& p, int num_threads); }

namespace {

using gk::bf16_t;
using gk::DecodeParams;

constexpr int kHeadsQ = 32, kHeadsKV = 8, kHeadDim = 128;

template <class T>
struct Buffer {
  std::unique_ptr<T, decltype(&std::free)> ptr;
  // huge: 2 MiB aligned and advised as huge pages before the first touch
  explicit Buffer(size_t n, bool huge = false)
      : ptr(static_cast<T*>(std::aligned_alloc(huge ? kHuge : 64, bytes(n, huge ? kHuge : 64))), &std::free) {
    if (!ptr) std::abort();
    if (huge && madvise(ptr.get(), bytes(n, kHuge), MADV_HUGEPAGE) != 0) std::perror("madvise");
  }
  static constexpr size_t kHuge = size_t(2) << 20;
  static size_t bytes(size_t n, size_t align) { return (n * sizeof(T) + align - 1) / align * align; }
  T& operator[](size_t i) { return ptr.get()[i]; }
  T* data() { return ptr.get(); }
};

// Sum of bytes [lo, hi) as floats, 64 bytes per load (AVX-512 whatever the kernels' ISA level:
// the reference reads as fast as this machine can, so that the avx2 build compiles it too).
// Four named register accumulators, 256 bytes a step. (The first version indexed an array of
// 8 accumulators by line, which GCC kept on the stack, a load-add-store per line: while the
// host read fast it capped near 62 GB/s, where a 4-register loop and torch.sum read 77-82.)
__attribute__((target("avx512f"))) float sum_share(const char* base, size_t lo, size_t hi) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t off = lo;
  for (; off + 256 <= hi; off += 256) {
    const float* p = reinterpret_cast<const float*>(base + off);
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + 48));
  }
  for (; off < hi; off += 64) a0 = _mm512_add_ps(a0, _mm512_load_ps(reinterpret_cast<const float*>(base + off)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// Sum of n bytes (a multiple of 64 * threads) in address order, `threads` threads each summing its
// contiguous share as floats.
float plain_sum(const void* data, size_t n, int threads) {
  float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const size_t share = n / 64 / size_t(threads) * 64, lo = share * size_t(omp_get_thread_num());
    total += sum_share(static_cast<const char*>(data), lo, lo + share);
  }
  return total;
}

// FAST (see the top): waits until a plain sum of a 256 MiB buffer of its own reads `fast` GB/s
// (its own, so that the probe leaves none of the sets in the LLC).
void wait_for_fast_state(int threads, double fast) {
  static const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(10);
  static bool gave_up = false;
  constexpr size_t kBytes = size_t(256) << 20;
  static Buffer<float> buf = [] {
    Buffer<float> b(kBytes / sizeof(float));
    std::fill(b.data(), b.data() + kBytes / sizeof(float), 1.f);
    return b;
  }();
  while (!gave_up) {
    const auto t = std::chrono::steady_clock::now();
    volatile float x = plain_sum(buf.data(), kBytes, threads);
    (void)x;
    if (double(kBytes) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / 1e9 >= fast) return;
    if (std::chrono::steady_clock::now() > give_up) {
      gave_up = true;
      std::fprintf(stderr, "FAST: the host did not read %.0f GB/s within 10 minutes; measuring without waiting\n", fast);
      return;
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
}

// Median GB/s (K and V read once) of A and B over `reps` alternating calls each, and of the
// plain sum (gbps[2], 0 without SUM).
template <class T>
void run(int L, int threads, int nsets, bool paged, int reps, double* gbps) {
  const int P = std::getenv("PAGE") ? std::atoi(std::getenv("PAGE")) : 16;
  const int B = std::getenv("BATCH") ? std::atoi(std::getenv("BATCH")) : 1;
  const size_t n = size_t(B) * L * kHeadsKV * kHeadDim;
  // 64-byte aligned, as PyTorch's CPU allocator aligns tensors (std::vector's large blocks sit
  // 16 bytes past a page boundary, which splits every cache-line load)
  // HUGE_B: sets [nsets, 2 nsets) are B's copies on huge pages
  const bool huge_b = std::getenv("HUGE_B") && std::atoi(std::getenv("HUGE_B"));
  const int copies = huge_b ? 2 * nsets : nsets;
  std::vector<Buffer<T>> K, V;
  for (int s = 0; s < copies; ++s) K.emplace_back(n, s >= nsets), V.emplace_back(n, s >= nsets);
  for (int s = 0; s < copies; ++s)
    for (size_t i = 0; i < n; ++i) {
      K[s][i] = gk::from_float<T>(float((i * 2654435761u) % 1000) * 1e-3f - 0.5f);
      V[s][i] = gk::from_float<T>(float((i * 40503u) % 1000) * 1e-3f - 0.5f);
    }
  // paged: the same buffers read through a page table shuffled over the whole pool (as the bench)
  std::vector<int32_t> table(size_t(B) * L / P);
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
  std::shuffle(table.begin(), table.end(), std::mt19937(1));
  std::vector<T> q(size_t(B) * kHeadsQ * kHeadDim, gk::from_float<T>(0.05f)), out(q.size());
  // PAIRS=1: the same memory read as transformers' (batch, heads_kv, length, head_dim) cache
  // tensors are read by genkernels.integrations.transformers: each (sequence, kv head) pair a
  // sequence of its own with one kv head and its group of query heads (contiguous only)
  const bool pairs = std::getenv("PAIRS") && std::atoi(std::getenv("PAIRS"));
  if (pairs && paged) { gbps[0] = gbps[1] = gbps[2] = 0.0; return; }
  std::vector<int32_t> lens(pairs ? B * kHeadsKV : B, L);
  const bool with_sum = std::getenv("SUM") && std::atoi(std::getenv("SUM"));
  const double fast = std::getenv("FAST") ? std::atof(std::getenv("FAST")) : 0.0;
  std::vector<double> ts[3];
  float sink = 0.f;
  int call = 0;  // the rotation over the sets
  for (int r = 0; r < 2 * reps; ++r) {
    // A, B in even pairs of calls, B, A in odd ones (see the top)
    const int which = (r % 2) ^ (r / 2 % 2), set = call++ % nsets;
    if (fast > 0 && r % 2 == 0) wait_for_fast_state(threads, fast);
    DecodeParams p;
    p.q = q.data();
    p.q_stride[0] = p.q_stride[1] = (pairs ? kHeadsQ / kHeadsKV : kHeadsQ) * kHeadDim, p.q_stride[2] = kHeadDim;
    const int copy = huge_b && which ? nsets + set : set;
    p.k = K[copy].data(), p.v = V[copy].data();
    if (paged) {
      p.block_table = table.data(), p.block_table_stride = L / P, p.page_size = P, p.num_pages = B * L / P;
      p.k_stride[0] = int64_t(P) * kHeadsKV * kHeadDim;
    } else {
      p.k_stride[0] = int64_t(L) * kHeadsKV * kHeadDim;
    }
    p.k_stride[1] = kHeadsKV * kHeadDim, p.k_stride[2] = kHeadDim;
    if (pairs) p.k_stride[0] = int64_t(L) * kHeadDim, p.k_stride[1] = kHeadDim;
    for (int i = 0; i < 3; ++i) p.v_stride[i] = p.k_stride[i];
    p.capacity = L, p.cache_seqlens = lens.data(), p.out = out.data();
    p.batch = B, p.seqlen_q = 1, p.heads_q = kHeadsQ, p.heads_kv = kHeadsKV, p.head_dim = kHeadDim;
    if (pairs) p.batch = B * kHeadsKV, p.heads_q = kHeadsQ / kHeadsKV, p.heads_kv = 1;
    p.num_splits = std::getenv("SPLITS") ? std::atoi(std::getenv("SPLITS")) : 0, p.scale = 0.088f;
    const auto t = std::chrono::steady_clock::now();
    if (which) gk::cpu::vb::decode_attention<T>(p, threads);
    else gk::cpu::va::decode_attention<T>(p, threads);
    ts[which].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    if (with_sum && r % 2) {
      const int s = call++ % nsets;
      const auto t1 = std::chrono::steady_clock::now();
      sink += plain_sum(K[s].data(), n * sizeof(T), threads) + plain_sum(V[s].data(), n * sizeof(T), threads);
      ts[2].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
    }
  }
  for (int i = 0; i < 3; ++i) {
    std::sort(ts[i].begin(), ts[i].end());
    gbps[i] = ts[i].empty() ? 0.0 : 2.0 * double(n) * sizeof(T) / ts[i][ts[i].size() / 2] / 1e9;
  }
  if (sink == 12345.f) std::puts("");  // keeps the sums
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s LENGTH THREADS SETS REPS\n", argv[0]);
    return 2;
  }
  const int L = std::atoi(argv[1]), threads = std::atoi(argv[2]), sets = std::atoi(argv[3]), reps = std::atoi(argv[4]);
  const int page = std::getenv("PAGE") ? std::atoi(std::getenv("PAGE")) : 16;
  const int batch = std::getenv("BATCH") ? std::atoi(std::getenv("BATCH")) : 1;
  if (L < 1 || threads < 1 || sets < 3 || sets % 2 == 0 || reps < 1 || batch < 1 || page < 1 || (page & (page - 1)) ||
      L % page) {
    std::fprintf(stderr, "LENGTH, THREADS, REPS, BATCH must be >= 1, SETS odd and >= 3, PAGE a power of two dividing LENGTH\n");
    return 2;
  }
  double r[4][3];
  run<float>(L, threads, sets, false, reps, r[0]);
  run<float>(L, threads, sets, true, reps, r[1]);
  run<bf16_t>(L, threads, sets, false, reps, r[2]);
  run<bf16_t>(L, threads, sets, true, reps, r[3]);
  std::printf("batch=%d L=%d threads=%d sets=%d  GB/s A/B: fp32 %.1f/%.1f  fp32 paged %.1f/%.1f  bf16 %.1f/%.1f  bf16 paged %.1f/%.1f\n",
              batch, L, threads, sets, r[0][0], r[0][1], r[1][0], r[1][1], r[2][0], r[2][1], r[3][0], r[3][1]);
  if (r[0][2] > 0)
    std::printf("  plain sum GB/s: fp32 %.1f  fp32 (paged run) %.1f  bf16 %.1f  bf16 (paged run) %.1f;  %% of sum A/B: fp32 %.0f/%.0f  fp32 paged %.0f/%.0f  bf16 %.0f/%.0f  bf16 paged %.0f/%.0f\n",
                r[0][2], r[1][2], r[2][2], r[3][2], 100 * r[0][0] / r[0][2], 100 * r[0][1] / r[0][2], 100 * r[1][0] / r[1][2],
                100 * r[1][1] / r[1][2], 100 * r[2][0] / r[2][2], 100 * r[2][1] / r[2][2], 100 * r[3][0] / r[3][2],
                100 * r[3][1] / r[3][2]);
}
