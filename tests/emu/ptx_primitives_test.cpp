// Tests of the CUDA-on-CPU emulator and of the emulated PTX wrappers in cuda/ptx.cuh.
//
// Every expectation is written here directly from the PTX ISA / CUDA programming guide tables
// (groupID = lane >> 2, threadID_in_group = lane % 4, ...), independently of the emulator's own
// index arithmetic. Prints one line per check; exits non-zero if any check fails.
//
// Build (from the repo root), one of:
//   g++ -std=c++17 -O1 -I csrc tests/emu/ptx_primitives_test.cpp -o t                       (ucontext)
//   g++ -std=c++17 -O1 -I csrc -DGK_EMU_BOOST_CONTEXT tests/emu/ptx_primitives_test.cpp -o t
// -DGK_SELFTEST_BREAK_LAYOUT swaps two A registers in the mma test: it must then FAIL.
// -DGK_SELFTEST_DEADLOCK runs only a kernel whose barrier half the block never reaches: the
// emulator must abort with a DEADLOCK report.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

namespace {

int g_failures = 0;

void report(bool ok, const char* name, const char* detail = "") {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, *detail ? ": " : "", detail);
  if (!ok) ++g_failures;
}

// ---------------------------------------------------------------------------------------------
// mma.m16n8k16: fragments are built from global memory with the PTX ISA formulas:
//   A: a_i, i = 0..7: row = groupID (+8 for i in {2,3,6,7}), col = 2*threadID_in_group + (i&1)
//      (+8 for i >= 4); register j holds a_{2j} (low half) and a_{2j+1} (high half).
//   B: b_i, i = 0..3: row(k) = 2*threadID_in_group + (i&1) (+8 for i >= 2), col(n) = groupID.
//   C/D: c_i, i = 0..3: row = groupID (+8 for i >= 2), col = 2*threadID_in_group + (i&1).
// Each warp w of the block multiplies its own matrices (offset w), so warps must not mix.
template <class Half>
__global__ void mma_kernel(const Half* A, const Half* B, const float* C, float* D, bool alias_c_and_d) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Half* a_mat = A + warp * 16 * 16;  // row-major 16 x 16 (m, k)
  const Half* b_mat = B + warp * 16 * 8;   // row-major 16 x 8  (k, n)
  const int group = lane >> 2, tig = lane % 4;
  uint16_t a_elems[8], b_elems[4];
  for (int i = 0; i < 8; ++i) {
    const int row = group + ((i % 4) >= 2 ? 8 : 0);
    const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    a_elems[i] = a_mat[row * 16 + col].bits;
  }
  for (int i = 0; i < 4; ++i) {
    const int k = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    b_elems[i] = b_mat[k * 8 + group].bits;
  }
  uint32_t a[4], b[2];
  for (int j = 0; j < 4; ++j) a[j] = uint32_t(a_elems[2 * j]) | uint32_t(a_elems[2 * j + 1]) << 16;
  for (int j = 0; j < 2; ++j) b[j] = uint32_t(b_elems[2 * j]) | uint32_t(b_elems[2 * j + 1]) << 16;
#if defined(GK_SELFTEST_BREAK_LAYOUT)
  const uint32_t tmp = a[1]; a[1] = a[2]; a[2] = tmp;  // a deliberate fragment mistake
#endif
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
    c[i] = C[warp * 128 + row * 8 + col];
  }
  if (alias_c_and_d) {
    if constexpr (std::is_same_v<Half, gk::fp16_t>) gk::ptx::mma_m16n8k16_f16(c, a, b, c);
    else gk::ptx::mma_m16n8k16_bf16(c, a, b, c);
    for (int i = 0; i < 4; ++i) d[i] = c[i];
  } else {
    if constexpr (std::is_same_v<Half, gk::fp16_t>) gk::ptx::mma_m16n8k16_f16(d, a, b, c);
    else gk::ptx::mma_m16n8k16_bf16(d, a, b, c);
  }
  for (int i = 0; i < 4; ++i) {
    const int row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
    D[warp * 128 + row * 8 + col] = d[i];
  }
}

template <class Half>
void test_mma(const char* name, bool alias) {
  constexpr int kWarps = 2;
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> dist(-2.f, 2.f);
  std::vector<Half> A(kWarps * 256), B(kWarps * 128);
  std::vector<float> C(kWarps * 128), D(kWarps * 128, NAN);
  for (auto& x : A) x = gk::from_float<Half>(dist(rng));
  for (auto& x : B) x = gk::from_float<Half>(dist(rng));
  for (auto& x : C) x = dist(rng);
  const int err = gk::emu::launch(mma_kernel<Half>, dim3(1), dim3(32 * kWarps), 0, A.data(), B.data(), C.data(),
                                  D.data(), alias);
  double max_err = 0;
  for (int w = 0; w < kWarps; ++w)
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        double ref = C[w * 128 + m * 8 + n];
        for (int k = 0; k < 16; ++k)
          ref += double(gk::to_float(A[w * 256 + m * 16 + k])) * gk::to_float(B[w * 128 + k * 8 + n]);
        const double e = std::fabs(ref - D[w * 128 + m * 8 + n]);
        max_err = std::isnan(e) ? INFINITY : std::fmax(max_err, e);
      }
  char detail[96];
  std::snprintf(detail, sizeof detail, "max |D - ref| = %.3g", max_err);
  report(err == 0 && max_err < 1e-4, name, detail);
}

// ---------------------------------------------------------------------------------------------
// ldmatrix .m8n8.b16: element (r, c) of matrix j holds value j*64 + r*8 + c. Matrix rows are
// scattered in shared memory (row stride 24 elements = 48 bytes) to check that each row comes
// from its own lane's address. Expectation from the PTX ISA: lane l receives, for matrix j,
// row l/4, elements 2*(l%4) and 2*(l%4)+1 (low, high); with .trans, the elements (2*(l%4), l/4)
// and (2*(l%4)+1, l/4).
constexpr int kLdRowStride = 24;
uint16_t ld_value(int j, int r, int c) { return uint16_t(j * 64 + r * 8 + c); }

template <int N, bool kTrans>
__global__ void ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[4 * 8 * kLdRowStride];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 8 * kLdRowStride; i += 32) tile[i] = 0xDEAD;
  __syncthreads();
  for (int i = lane; i < 4 * 64; i += 32) {
    const int j = i / 64, r = (i / 8) % 8, c = i % 8;
    tile[(j * 8 + r) * kLdRowStride + c] = ld_value(j, r, c);
  }
  __syncthreads();
  const uint16_t* row_ptr = tile + ((lane / 8) * 8 + lane % 8) * kLdRowStride;  // matrix lane/8, row lane%8
  uint32_t r[N];
  if constexpr (N == 1) kTrans ? gk::ptx::ldmatrix_x1_trans(r, row_ptr) : gk::ptx::ldmatrix_x1(r, row_ptr);
  if constexpr (N == 2) kTrans ? gk::ptx::ldmatrix_x2_trans(r, row_ptr) : gk::ptx::ldmatrix_x2(r, row_ptr);
  if constexpr (N == 4) kTrans ? gk::ptx::ldmatrix_x4_trans(r, row_ptr) : gk::ptx::ldmatrix_x4(r, row_ptr);
  for (int j = 0; j < N; ++j) out[lane * 4 + j] = r[j];
}

template <int N, bool kTrans>
void test_ldmatrix(const char* name) {
  std::vector<uint32_t> out(32 * 4, 0xFFFFFFFFu);
  const int err = gk::emu::launch(ldmatrix_kernel<N, kTrans>, dim3(1), dim3(32), 0, out.data());
  int bad = 0;
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < N; ++j) {
      const int g = l / 4, t = l % 4;
      const uint32_t lo = kTrans ? ld_value(j, 2 * t, g) : ld_value(j, g, 2 * t);
      const uint32_t hi = kTrans ? ld_value(j, 2 * t + 1, g) : ld_value(j, g, 2 * t + 1);
      bad += out[l * 4 + j] != (lo | hi << 16);
    }
  char detail[64];
  std::snprintf(detail, sizeof detail, "%d wrong registers", bad);
  report(err == 0 && bad == 0, name, detail);
}

// ---------------------------------------------------------------------------------------------
// cp.async: three committed groups; wait_group<N> must complete all but the newest N, and data
// must not be visible before its group is waited for. Per-thread flags record each observation.
enum CpFlag { kStaleBeforeWait, kGroup0After2, kGroup1StaleAfter2, kGroup1After1, kGroup2StaleAfter1,
              kZeroFillAfter0, kFlagCount };

__global__ void cp_async_kernel(const uint4* src, int* flags, uint4* exit_dst) {
  __shared__ uint4 slots[3][32];
  const int t = threadIdx.x;
  const uint4 sentinel{0xAAAAAAAAu, 0xAAAAAAAAu, 0xAAAAAAAAu, 0xAAAAAAAAu};
  for (int s = 0; s < 3; ++s) slots[s][t] = sentinel;
  auto equals = [](const uint4& a, const uint4& b) { return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w; };
  gk::ptx::cp_async_16(&slots[0][t], &src[t]);
  gk::ptx::cp_async_commit_group();
  gk::ptx::cp_async_16(&slots[1][t], &src[32 + t]);
  gk::ptx::cp_async_commit_group();
  gk::ptx::cp_async_16_zfill(&slots[2][t], &src[64 + t], /*valid=*/false);
  gk::ptx::cp_async_commit_group();
  int* f = flags + t * kFlagCount;
  f[kStaleBeforeWait] = equals(slots[0][t], sentinel);
  gk::ptx::cp_async_wait_group<2>();
  f[kGroup0After2] = equals(slots[0][t], src[t]);
  f[kGroup1StaleAfter2] = equals(slots[1][t], sentinel);
  gk::ptx::cp_async_wait_group<1>();
  f[kGroup1After1] = equals(slots[1][t], src[32 + t]);
  f[kGroup2StaleAfter1] = equals(slots[2][t], sentinel);
  gk::ptx::cp_async_wait_group<0>();
  f[kZeroFillAfter0] = equals(slots[2][t], uint4{0, 0, 0, 0});
  // Never waited for: must still land when the thread exits. (Emulator-only check: a global
  // destination is not legal cp.async on a GPU.)
  gk::ptx::cp_async_16(&exit_dst[t], &src[t]);
}

void test_cp_async() {
  std::vector<uint4> src(96), exit_dst(32, uint4{0, 0, 0, 0});
  for (unsigned i = 0; i < 96; ++i) src[i] = uint4{i, i * 3 + 1, i * 5 + 2, i * 7 + 3};
  std::vector<int> flags(32 * kFlagCount, 0);
  const int err = gk::emu::launch(cp_async_kernel, dim3(1), dim3(32), 0, src.data(), flags.data(), exit_dst.data());
  const char* names[kFlagCount] = {"cp.async: destination stale before wait_group",
                                   "cp.async: wait_group<2> completes the oldest group",
                                   "cp.async: wait_group<2> leaves the second group in flight",
                                   "cp.async: wait_group<1> completes the second group",
                                   "cp.async: wait_group<1> leaves the newest group in flight",
                                   "cp.async: zfill (src-size 0) writes zeros after wait_group<0>"};
  for (int k = 0; k < kFlagCount; ++k) {
    int ok = 0;
    for (int t = 0; t < 32; ++t) ok += flags[t * kFlagCount + k];
    report(err == 0 && ok == 32, names[k]);
  }
  int landed = 0;
  for (int t = 0; t < 32; ++t) landed += exit_dst[t].x == src[t].x && exit_dst[t].w == src[t].w;
  report(landed == 32, "cp.async: copies pending at thread exit are performed");
}

// ---------------------------------------------------------------------------------------------
// Shuffles, ballot, any/all over two warps. Expectations from the CUDA programming guide:
// width splits the warp into segments; __shfl_sync reads lane srcLane % width of the segment;
// __shfl_up/down return the caller's value when the source leaves the segment; __shfl_xor may
// read the caller's or an earlier segment, and returns its own value for a later segment.
enum ShuffleOut { kShflBcast, kShflW8, kXor3, kXor8W8, kUp2W16, kDown3W16, kBallot, kAny, kAllFalse, kAllTrue, kShuffleCount };

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int v = warp * 1000 + lane * 10;
  int* o = out + threadIdx.x * kShuffleCount;
  o[kShflBcast] = __shfl_sync(0xffffffffu, v, 5);
  o[kShflW8] = __shfl_sync(0xffffffffu, v, 11, 8);
  o[kXor3] = __shfl_xor_sync(0xffffffffu, v, 3);
  o[kXor8W8] = __shfl_xor_sync(0xffffffffu, v, 8, 8);
  o[kUp2W16] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  o[kDown3W16] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  o[kBallot] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0 || (warp == 1 && lane == 1)));
  o[kAny] = __any_sync(0xffffffffu, lane == 31);
  o[kAllFalse] = __all_sync(0xffffffffu, lane < 31);
  o[kAllTrue] = __all_sync(0xffffffffu, lane >= 0);
}

void test_shuffles() {
  std::vector<int> out(64 * kShuffleCount, -1);
  const int err = gk::emu::launch(shuffle_kernel, dim3(1), dim3(64), 0, out.data());
  int bad[kShuffleCount] = {};
  for (int tid = 0; tid < 64; ++tid) {
    const int lane = tid % 32, warp = tid / 32;
    auto val = [&](int l) { return warp * 1000 + l * 10; };
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) if (l % 3 == 0 || (warp == 1 && l == 1)) ballot |= 1u << l;
    const int xor8 = lane ^ 8;
    const int expect[kShuffleCount] = {
        val(5),
        val((lane / 8) * 8 + 11 % 8),
        val(lane ^ 3),
        xor8 / 8 <= lane / 8 ? val(xor8) : val(lane),  // earlier segment readable, later not
        lane % 16 >= 2 ? val(lane - 2) : val(lane),
        lane % 16 + 3 < 16 ? val(lane + 3) : val(lane),
        static_cast<int>(ballot), 1, 0, 1};
    for (int k = 0; k < kShuffleCount; ++k) bad[k] += out[tid * kShuffleCount + k] != expect[k];
  }
  const char* names[kShuffleCount] = {"__shfl_sync broadcast", "__shfl_sync width 8", "__shfl_xor_sync 3",
                                      "__shfl_xor_sync 8 width 8", "__shfl_up_sync 2 width 16",
                                      "__shfl_down_sync 3 width 16", "__ballot_sync", "__any_sync",
                                      "__all_sync (false)", "__all_sync (true)"};
  for (int k = 0; k < kShuffleCount; ++k) report(err == 0 && bad[k] == 0, names[k]);
}

// ---------------------------------------------------------------------------------------------
struct AtomicCounters {
  float f_sum; int i_sum; unsigned u_sum; unsigned long long ull_sum;
  int i_max; unsigned u_min; int cas_count; int exch_slot;
};

__global__ void atomics_kernel(AtomicCounters* c, int* exch_returned) {
  const int id = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&c->f_sum, 0.5f);
  atomicAdd(&c->i_sum, 2);
  atomicAdd(&c->u_sum, 3u);
  atomicAdd(&c->ull_sum, 1ull << 33);
  atomicMax(&c->i_max, (id * 37) % 1021 - 500);
  atomicMin(&c->u_min, 5000u + unsigned((id * 53) % 997));
  int seen = 0, prev;  // a guess; a plain read of the counter would race with the atomics
  while ((prev = atomicCAS(&c->cas_count, seen, seen + 1)) != seen) seen = prev;
  exch_returned[id] = atomicExch(&c->exch_slot, id);
}

void test_atomics() {
  constexpr int kBlocks = 4, kThreads = 256, n = kBlocks * kThreads;
  AtomicCounters c{0.f, 0, 0u, 0ull, -1000000, 0xFFFFFFFFu, 0, -1};
  std::vector<int> returned(n, -7);
  const int err = gk::emu::launch(atomics_kernel, dim3(kBlocks), dim3(kThreads), 0, &c, returned.data());
  int i_max = -1000000; unsigned u_min = 0xFFFFFFFFu;
  for (int id = 0; id < n; ++id) {
    i_max = std::max(i_max, (id * 37) % 1021 - 500);
    u_min = std::min(u_min, 5000u + unsigned((id * 53) % 997));
  }
  report(err == 0 && c.f_sum == 0.5f * n, "atomicAdd(float)");
  report(c.i_sum == 2 * n && c.u_sum == 3u * n && c.ull_sum == (1ull << 33) * n, "atomicAdd(int, unsigned, ull)");
  report(c.i_max == i_max && c.u_min == u_min, "atomicMax(int) / atomicMin(unsigned)");
  report(c.cas_count == n, "atomicCAS increment loop");
  // Every value ever stored (-1 then each id) is returned exactly once or is the final value.
  std::vector<int> seen(n + 1, 0);
  for (int v : returned) if (v >= -1 && v < n) ++seen[v + 1];
  if (c.exch_slot >= -1 && c.exch_slot < n) ++seen[c.exch_slot + 1];
  bool ok = true;
  for (int s : seen) ok = ok && s == 1;
  report(ok, "atomicExch returns each previous value once");
}

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory: 16-byte aligned, poisoned (0xFF) at the start of EVERY block, shared by
// the block's threads. 3 blocks, so a block that saw its predecessor's data would fail.
__global__ void dynamic_smem_kernel(int* ok_flags, int bytes) {
  GK_DYNAMIC_SMEM(unsigned char, smem);
  const int t = threadIdx.x, n = blockDim.x;
  bool ok = reinterpret_cast<uintptr_t>(smem) % 16 == 0;
  for (int i = t; i < bytes; i += n) ok = ok && smem[i] == 0xFF;
  __syncthreads();
  for (int i = t; i < bytes; i += n) smem[i] = static_cast<unsigned char>(i * 7 + blockIdx.x);
  __syncthreads();
  for (int i = (t + 1) % n; i < bytes; i += n) ok = ok && smem[i] == static_cast<unsigned char>(i * 7 + blockIdx.x);
  ok = ok && static_cast<void*>(smem) == gk::emu::dynamic_smem() && gk::emu::dynamic_smem_bytes() == size_t(bytes);
  ok_flags[blockIdx.x * n + t] = ok;
}

void test_dynamic_smem() {
  const int bytes = 1000;
  std::vector<int> flags(3 * 64, 0);
  const int err = gk::emu::launch(dynamic_smem_kernel, dim3(3), dim3(64), bytes, flags.data(), bytes);
  int ok = 0;
  for (int f : flags) ok += f;
  report(err == 0 && ok == 3 * 64, "dynamic smem: aligned, poisoned per block, shared by the block");
}

// ---------------------------------------------------------------------------------------------
// __syncthreads over 256 threads in a 2-D block and a 3-D grid: a tree reduction in shared memory
// (8 barrier rounds) per block, plus every thread records its coordinates.
__global__ void block_reduce_kernel(const float* in, float* block_sums, int* coords) {
  __shared__ float partial[256];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int block_id = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int gid = block_id * 256 + t;
  coords[gid * 3 + 0] = blockIdx.x * 100 + threadIdx.x;
  coords[gid * 3 + 1] = blockIdx.y * 100 + threadIdx.y;
  coords[gid * 3 + 2] = blockIdx.z * 100 + threadIdx.z;
  partial[t] = in[gid];
  __syncthreads();
  for (int stride = 128; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) block_sums[block_id] = partial[0];
}

void test_block_reduce() {
  const dim3 grid(3, 2, 2), block(16, 16);
  const int nblocks = 12, n = nblocks * 256;
  std::vector<float> in(n), sums(nblocks, NAN);
  std::vector<int> coords(n * 3, -1);
  for (int i = 0; i < n; ++i) in[i] = float((i * 7) % 13) - 6.0f;  // integers: exact sums
  const int err = gk::emu::launch(block_reduce_kernel, grid, block, 0, in.data(), sums.data(), coords.data());
  int bad_sums = 0, bad_coords = 0;
  for (int b = 0; b < nblocks; ++b) {
    float ref = 0;
    for (int t = 0; t < 256; ++t) ref += in[b * 256 + t];
    bad_sums += sums[b] != ref;
    const int bx = b % 3, by = (b / 3) % 2, bz = b / 6;
    for (int t = 0; t < 256; ++t) {
      const int* c = &coords[(b * 256 + t) * 3];
      bad_coords += c[0] != bx * 100 + t % 16 || c[1] != by * 100 + t / 16 || c[2] != bz * 100;
    }
  }
  report(err == 0 && bad_sums == 0, "__syncthreads: 256-thread tree reduction, 3x2x2 grid");
  report(bad_coords == 0, "threadIdx/blockIdx over a 16x16 block and 3x2x2 grid");
}

__global__ void never_runs_kernel(int* flag) { *flag = 1; }

void test_launch_errors() {
  int flag = 0;
  const int too_many = gk::emu::launch(never_runs_kernel, dim3(1), dim3(1025), 0, &flag);
  const int zero = gk::emu::launch(never_runs_kernel, dim3(1), dim3(0), 0, &flag);
  const int zero_grid = gk::emu::launch(never_runs_kernel, dim3(0), dim3(32), 0, &flag);
  report(too_many != 0 && zero != 0 && zero_grid != 0 && flag == 0,
         "invalid launch configurations are rejected and run nothing");
}

// ---------------------------------------------------------------------------------------------
// Informational: cost of a barrier round trip (one fiber switch per thread per barrier).
__global__ void barrier_loop_kernel(int rounds) {
  for (int r = 0; r < rounds; ++r) __syncthreads();
}

void measure_switch_cost() {
  const int rounds = 200, threads = 256;
  const auto t0 = std::chrono::steady_clock::now();
  gk::emu::launch(barrier_loop_kernel, dim3(1), dim3(threads), 0, rounds);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  std::printf("INFO __syncthreads cost: %.0f ns per thread per barrier (%d threads x %d barriers)\n",
              ns / (double(rounds) * threads), threads, rounds);
}

#if defined(GK_SELFTEST_DEADLOCK)
__global__ void deadlock_kernel() {
  // Lane 0 waits for its warp at __syncwarp while the rest of the warp waits for it at
  // __syncthreads: a real deadlock.
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
    __syncwarp();
  }
}
#endif

}  // namespace

int main() {
#if defined(GK_SELFTEST_DEADLOCK)
  gk::emu::launch(deadlock_kernel, dim3(2), dim3(64), 0);
  std::printf("FAIL deadlock was not detected\n");
  return 1;
#endif
  const auto t0 = std::chrono::steady_clock::now();
  test_mma<gk::fp16_t>("mma.m16n8k16 f16 (2 warps)", false);
  test_mma<gk::fp16_t>("mma.m16n8k16 f16, D aliases C", true);
  test_mma<gk::bf16_t>("mma.m16n8k16 bf16 (2 warps)", false);
  test_mma<gk::bf16_t>("mma.m16n8k16 bf16, D aliases C", true);
  test_ldmatrix<1, false>("ldmatrix.x1");
  test_ldmatrix<2, false>("ldmatrix.x2");
  test_ldmatrix<4, false>("ldmatrix.x4");
  test_ldmatrix<1, true>("ldmatrix.x1.trans");
  test_ldmatrix<2, true>("ldmatrix.x2.trans");
  test_ldmatrix<4, true>("ldmatrix.x4.trans");
  test_cp_async();
  test_shuffles();
  test_atomics();
  test_dynamic_smem();
  test_block_reduce();
  test_launch_errors();
  measure_switch_cost();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %d failure(s), %.1f ms\n", g_failures ? "FAILED" : "OK", g_failures, ms);
  return g_failures ? 1 : 0;
}
