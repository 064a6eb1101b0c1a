// The CUDA-on-CPU execution engine: blocks, barriers, warps and the launch loop.
//
// Model. Blocks of a grid run one after another on the calling OS thread. The threads of a block
// run either
//  - as fibers on the calling OS thread (default): Boost.Context when GK_EMU_BOOST_CONTEXT is
//    defined (~tens of ns per switch), ucontext otherwise (no dependency; a syscall per switch).
//    A fiber runs until it blocks at a barrier or exits; the scheduler resumes runnable fibers
//    round-robin, so all memory effects are sequentially consistent and plain operations are
//    atomic. A pass over the block that makes no progress is a deadlock.
//  - or as one std::thread each (GK_EMU_THREADS), for ThreadSanitizer. Barriers are a mutex +
//    condition variable per barrier, not std::barrier: libstdc++'s std::barrier waits through a
//    process-wide pool of waiters, which makes TSan see happens-before edges between unrelated
//    barriers and hides exactly the races a missing __syncthreads leaves.
// A process-wide mutex serializes launches (Python may launch from several threads), which is
// also what makes `__shared__` as a function-local static correct.
//
// Every translation unit of one binary must be built in the same mode (the header is inline).
#pragma once
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu/async_copy.h"
#include "emu/types.h"

#if defined(GK_EMU_THREADS)
// one OS thread per CUDA thread: nothing else to include
#elif defined(GK_EMU_BOOST_CONTEXT)
#include <boost/context/fiber.hpp>
#else
#include <ucontext.h>
#endif

namespace gk::emu {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;  // sm_90's opt-in maximum
// Fresh dynamic shared memory is filled with this byte: as float, bf16 or fp16 every element
// reads as NaN, so a kernel that consumes smem it never wrote produces NaN, not plausible zeros.
inline constexpr unsigned char kSmemPoisonByte = 0xFF;
// Bytes each lane may publish in one warp collective (mma publishes 24).
inline constexpr size_t kLaneExchangeBytes = 64;

namespace detail {

[[noreturn]] inline void fatal(const char* fmt, ...) {
  std::fflush(stdout);
  std::va_list args;
  va_start(args, fmt);
  std::fputs("gk::emu: ", stderr);
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

// Best-effort readable kernel name for error messages (only computed when reporting).
inline void describe_function(const void* fn, char* out, size_t out_size) {
  Dl_info info{};
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::snprintf(out, out_size, "%s", status == 0 && demangled ? demangled : info.dli_sname);
    std::free(demangled);
  } else {
    std::snprintf(out, out_size, "kernel at %p (link with -rdynamic for its name)", fn);
  }
}

struct Block;
struct CudaThread;
inline thread_local CudaThread* tl_current_thread = nullptr;

// What a waiting thread is blocked on, for deadlock reports.
enum class BarrierKind { kSyncthreads, kWarp, kBlockStart, kBlockEnd };

// ---------------------------------------------------------------------------------------------
// Barrier: `expected` live participants; arrive_and_wait blocks until all have arrived.
// drop() removes an exited thread so that the others' barriers still complete (on sm_70+ exited
// threads do not hold back bar.sync either).
#if defined(GK_EMU_THREADS)
struct Barrier {
  Block* block = nullptr;
  BarrierKind kind = BarrierKind::kSyncthreads;
  int warp = -1;
  std::mutex mutex;
  std::condition_variable released;
  int expected = 0, arrived = 0;
  uint64_t generation = 0;

  void reset(Block* b, BarrierKind k, int w, int participants) {
    block = b; kind = k; warp = w; expected = participants; arrived = 0;
  }
  void arrive_and_wait();
  void drop();

 private:
  void release_locked(int waiters);
};
#else
struct Barrier {
  Block* block = nullptr;
  BarrierKind kind = BarrierKind::kSyncthreads;
  int warp = -1;
  int expected = 0, arrived = 0;
  uint64_t generation = 0;

  void reset(Block* b, BarrierKind k, int w, int participants) {
    block = b; kind = k; warp = w; expected = participants; arrived = 0;
  }
  void arrive_and_wait();
  void drop() {
    --expected;
    if (arrived > 0 && arrived == expected) { arrived = 0; ++generation; }
  }
};
#endif

// ---------------------------------------------------------------------------------------------
struct Warp {
  int index = 0;
  uint32_t present_lanes = 0;             // lanes that exist (the last warp may be partial)
  std::atomic<uint32_t> live_lanes{0};    // present lanes that have not exited yet
  Barrier barrier;                        // all warp collectives and __syncwarp
  alignas(16) unsigned char exchange[kWarpSize * kLaneExchangeBytes];
};

struct CudaThread {
  Block* block = nullptr;
  Warp* warp = nullptr;
  int linear_id = 0, lane = 0;
  uint3 index{0, 0, 0};
  AsyncCopyQueue async_copies;
  std::atomic<Barrier*> waiting_on{nullptr};  // for deadlock reports (relaxed: no sync edges)
#if !defined(GK_EMU_THREADS)
  uint64_t waiting_generation = 0;
  bool finished = false;
#if defined(GK_EMU_BOOST_CONTEXT)
  boost::context::fiber fiber, scheduler;
#else
  ucontext_t context;
#endif
#endif
};

struct Block {
  const void* kernel = nullptr;
  void (*body)(void*) = nullptr;  // runs the kernel with the launch's arguments
  void* body_arg = nullptr;
  uint3 index{0, 0, 0};
  int nthreads = 0;
  Barrier syncthreads;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<CudaThread>> threads;
  std::vector<uint4> dynamic_smem;  // uint4: 16-byte alignment
  size_t dynamic_smem_bytes = 0;
  // Threads mode only: threads currently blocked and a count of barrier releases, read without
  // synchronization (relaxed atomics create no happens-before edges for TSan).
  std::atomic<int> blocked{0};
  std::atomic<uint64_t> releases{0};
};

inline CudaThread& current_thread() {
  if (!tl_current_thread) fatal("a device function was called outside a kernel launch");
  return *tl_current_thread;
}

[[noreturn]] inline void report_deadlock(const Block& b) {
  // In threads mode several waiting threads may notice the deadlock: only the first reports.
  static std::atomic<bool> reporting{false};
  if (reporting.exchange(true)) for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  char name[512];
  describe_function(b.kernel, name, sizeof name);
  std::fflush(stdout);
  std::fprintf(stderr,
               "gk::emu: DEADLOCK in %s, block (%u,%u,%u) of grid (%u,%u,%u), %d threads: some "
               "threads wait at a barrier or warp collective that the others never reach.\n",
               name, b.index.x, b.index.y, b.index.z, gridDim.x, gridDim.y, gridDim.z, b.nthreads);
  int start = 0;
  auto describe = [](const Barrier* w) -> const char* {
    if (!w) return "exited (or, in threads mode, running)";
    switch (w->kind) {
      case BarrierKind::kSyncthreads: return "waiting at __syncthreads";
      case BarrierKind::kWarp: return "waiting at a warp collective (__syncwarp/__shfl*/ballot/ldmatrix/mma)";
      case BarrierKind::kBlockStart: return "not started";
      case BarrierKind::kBlockEnd: return "exited";
    }
    return "?";
  };
  // Print runs of consecutive threads in the same state.
  for (int t = 1; t <= b.nthreads; ++t) {
    const Barrier* w0 = b.threads[start]->waiting_on.load(std::memory_order_relaxed);
    const Barrier* wt = t < b.nthreads ? b.threads[t]->waiting_on.load(std::memory_order_relaxed) : nullptr;
    if (t < b.nthreads && wt == w0) continue;
    std::fprintf(stderr, "  threads %d..%d: %s", start, t - 1, describe(w0));
    if (w0 && w0->kind == BarrierKind::kWarp) std::fprintf(stderr, " of warp %d", w0->warp);
    std::fputc('\n', stderr);
    start = t;
  }
  std::fflush(stderr);
  std::abort();
}

// ---------------------------------------------------------------------------------------------
#if defined(GK_EMU_THREADS)
inline void Barrier::release_locked(int waiters) {
  block->blocked.fetch_sub(waiters, std::memory_order_relaxed);
  block->releases.fetch_add(1, std::memory_order_relaxed);
  arrived = 0;
  ++generation;
  released.notify_all();
}

inline void Barrier::arrive_and_wait() {
  CudaThread& self = current_thread();
  std::unique_lock<std::mutex> lock(mutex);
  const uint64_t my_generation = generation;
  if (++arrived == expected) { release_locked(arrived - 1); return; }
  block->blocked.fetch_add(1, std::memory_order_relaxed);
  self.waiting_on.store(this, std::memory_order_relaxed);
  // A deadlock is every thread of the block blocked with no barrier released for a while.
  // Counts are updated by the releasing thread, so "blocked" never includes a thread whose
  // barrier has already opened.
  uint64_t releases_seen = block->releases.load(std::memory_order_relaxed);
  int quiet_periods = 0;
  while (generation == my_generation) {
    if (released.wait_for(lock, std::chrono::milliseconds(100)) != std::cv_status::timeout) continue;
    const uint64_t releases_now = block->releases.load(std::memory_order_relaxed);
    const bool all_blocked = block->blocked.load(std::memory_order_relaxed) == block->nthreads;
    quiet_periods = (all_blocked && releases_now == releases_seen) ? quiet_periods + 1 : 0;
    releases_seen = releases_now;
    if (quiet_periods >= 5 && generation == my_generation) report_deadlock(*block);
  }
  self.waiting_on.store(nullptr, std::memory_order_relaxed);
}

inline void Barrier::drop() {
  std::lock_guard<std::mutex> lock(mutex);
  --expected;
  if (arrived > 0 && arrived == expected) release_locked(arrived);
}
#else
inline void yield_to_scheduler(CudaThread& self);

inline void Barrier::arrive_and_wait() {
  if (++arrived == expected) { arrived = 0; ++generation; return; }
  CudaThread& self = current_thread();
  self.waiting_on.store(this, std::memory_order_relaxed);
  self.waiting_generation = generation;
  yield_to_scheduler(self);  // resumed only once `generation` has moved on
  self.waiting_on.store(nullptr, std::memory_order_relaxed);
}
#endif

// ---------------------------------------------------------------------------------------------
// Fiber stacks: mmap'd once and reused by every launch (guarded by the launch mutex), each with
// a PROT_NONE guard page below it so that an overflow faults instead of corrupting a neighbour.
// Size: GK_EMU_STACK_KIB (default 128 KiB).
#if !defined(GK_EMU_THREADS)
class StackPool {
 public:
  struct Stack { unsigned char* usable_base; size_t usable_size; };

  Stack get(size_t i) {
    while (stacks_.size() <= i) stacks_.push_back(allocate());
    return stacks_[i];
  }
  ~StackPool() {
    for (const Stack& s : stacks_) munmap(s.usable_base - page_size(), s.usable_size + page_size());
  }

 private:
  static size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  static size_t stack_bytes() {
    size_t kib = 128;
    if (const char* env = std::getenv("GK_EMU_STACK_KIB")) kib = std::strtoul(env, nullptr, 10);
    if (kib < 16) kib = 16;
    const size_t page = page_size();
    return (kib * 1024 + page - 1) / page * page;
  }
  Stack allocate() {
    const size_t usable = stack_bytes(), page = page_size();
    void* region = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) fatal("cannot allocate a %zu-byte fiber stack", usable);
    mprotect(region, page, PROT_NONE);  // stacks grow down: the guard is the lowest page
    return Stack{static_cast<unsigned char*>(region) + page, usable};
  }
  std::vector<Stack> stacks_;
};

inline StackPool& stack_pool() { static StackPool pool; return pool; }
#endif

inline std::mutex& launch_mutex() { static std::mutex m; return m; }

inline void finish_thread(CudaThread& t) {
  t.async_copies.complete_all();  // copies still in flight land before the thread retires
  t.warp->live_lanes.fetch_and(~(1u << t.lane), std::memory_order_relaxed);
  t.block->syncthreads.drop();
  t.warp->barrier.drop();
}

// ---------------------------------------------------------------------------------------------
#if defined(GK_EMU_THREADS)
inline void run_block(Block& b) {
  Barrier start_gate, end_gate;
  // The gates keep all OS threads of a block alive together, like a GPU's resident threads:
  // otherwise thread t could finish before t+1 starts and TSan would see false ordering.
  start_gate.reset(&b, BarrierKind::kBlockStart, -1, b.nthreads);
  end_gate.reset(&b, BarrierKind::kBlockEnd, -1, b.nthreads);
  std::vector<std::thread> os_threads;
  os_threads.reserve(b.nthreads);
  const uint3 block_index = b.index;
  for (int i = 0; i < b.nthreads; ++i) {
    os_threads.emplace_back([&b, &start_gate, &end_gate, block_index, i] {
      CudaThread& t = *b.threads[i];
      tl_current_thread = &t;
      threadIdx = t.index;
      blockIdx = block_index;
      start_gate.arrive_and_wait();
      b.body(b.body_arg);
      finish_thread(t);
      end_gate.arrive_and_wait();
      tl_current_thread = nullptr;
    });
  }
  for (std::thread& th : os_threads) th.join();
}
#else
#if defined(GK_EMU_BOOST_CONTEXT)
// Hands Boost.Context a stack from our pool instead of letting it allocate one per fiber.
struct PooledStackAllocator {
  StackPool::Stack stack;
  boost::context::stack_context allocate() {
    boost::context::stack_context sc;
    sc.size = stack.usable_size;
    sc.sp = stack.usable_base + stack.usable_size;  // top: stacks grow down
    return sc;
  }
  void deallocate(boost::context::stack_context&) noexcept {}
};
inline void yield_to_scheduler(CudaThread& self) { self.scheduler = std::move(self.scheduler).resume(); }
#else
inline thread_local ucontext_t tl_scheduler_context;
inline void yield_to_scheduler(CudaThread& self) { swapcontext(&self.context, &tl_scheduler_context); }
#endif

inline void fiber_main(CudaThread& t) {
  try {
    t.block->body(t.block->body_arg);
#if defined(GK_EMU_BOOST_CONTEXT)
  } catch (const boost::context::detail::forced_unwind&) {
    throw;  // Boost.Context unwinding a fiber it destroys: must pass through
#endif
  } catch (...) {
    fatal("a kernel threw a C++ exception (thread %d of block (%u,%u,%u))", t.linear_id,
          t.block->index.x, t.block->index.y, t.block->index.z);
  }
  finish_thread(t);
  t.finished = true;
}

#if !defined(GK_EMU_BOOST_CONTEXT)
inline void ucontext_entry() { fiber_main(*tl_current_thread); }  // makecontext takes no pointer
#endif

inline void run_block(Block& b) {
  for (int i = 0; i < b.nthreads; ++i) {
    CudaThread& t = *b.threads[i];
    t.finished = false;
    const StackPool::Stack stack = stack_pool().get(i);
#if defined(GK_EMU_BOOST_CONTEXT)
    t.fiber = boost::context::fiber(std::allocator_arg, PooledStackAllocator{stack},
                                    [&t](boost::context::fiber&& scheduler) {
                                      t.scheduler = std::move(scheduler);
                                      fiber_main(t);
                                      return std::move(t.scheduler);
                                    });
#else
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stack.usable_base;
    t.context.uc_stack.ss_size = stack.usable_size;
    t.context.uc_link = &tl_scheduler_context;  // returning from the entry resumes the scheduler
    makecontext(&t.context, &ucontext_entry, 0);
#endif
  }
  int running = b.nthreads;
  while (running > 0) {
    bool progressed = false;
    for (int i = 0; i < b.nthreads; ++i) {
      CudaThread& t = *b.threads[i];
      if (t.finished) continue;
      const Barrier* w = t.waiting_on.load(std::memory_order_relaxed);
      if (w && w->generation == t.waiting_generation) continue;  // its barrier is still closed
      tl_current_thread = &t;
      threadIdx = t.index;
#if defined(GK_EMU_BOOST_CONTEXT)
      t.fiber = std::move(t.fiber).resume();
#else
      swapcontext(&tl_scheduler_context, &t.context);
#endif
      progressed = true;
      if (t.finished) --running;
    }
    if (!progressed) { tl_current_thread = nullptr; report_deadlock(b); }
  }
  tl_current_thread = nullptr;
}
#endif

// Sets up the threads and warps of one block shape; reused for every block of the launch.
inline void prepare_block(Block& b, dim3 block_dim, size_t smem_bytes) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  b.nthreads = n;
  const int nwarps = (n + kWarpSize - 1) / kWarpSize;
  b.warps.clear();
  for (int w = 0; w < nwarps; ++w) {
    auto warp = std::make_unique<Warp>();
    warp->index = w;
    const int lanes = std::min(kWarpSize, n - w * kWarpSize);
    warp->present_lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    b.warps.push_back(std::move(warp));
  }
  b.threads.clear();
  for (int i = 0; i < n; ++i) {
    auto t = std::make_unique<CudaThread>();
    t->block = &b;
    t->linear_id = i;
    t->lane = i % kWarpSize;
    t->warp = b.warps[i / kWarpSize].get();
    // threadIdx.x varies fastest, as in CUDA's linear thread id
    t->index = uint3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    b.threads.push_back(std::move(t));
  }
  b.dynamic_smem_bytes = smem_bytes;
  b.dynamic_smem.assign((smem_bytes + 15) / 16 + 1, uint4{});
}

inline void begin_block(Block& b, uint3 index) {
  b.index = index;
  blockIdx = index;
  b.syncthreads.reset(&b, BarrierKind::kSyncthreads, -1, b.nthreads);
  for (auto& w : b.warps) {
    w->live_lanes.store(w->present_lanes, std::memory_order_relaxed);
    w->barrier.reset(&b, BarrierKind::kWarp, w->index, __builtin_popcount(w->present_lanes));
  }
  for (auto& t : b.threads) {
    t->waiting_on.store(nullptr, std::memory_order_relaxed);
    t->async_copies.clear();
  }
  b.blocked.store(0, std::memory_order_relaxed);
  // fresh (poisoned) dynamic shared memory for every block: nothing carries over between blocks
  std::memset(b.dynamic_smem.data(), kSmemPoisonByte, b.dynamic_smem.size() * sizeof(uint4));
}

inline int check_launch(dim3 grid, dim3 block, size_t smem_bytes) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    return cudaErrorInvalidConfiguration;
  if (smem_bytes > kMaxDynamicSmemBytes) return cudaErrorInvalidValue;
  return cudaSuccess;
}

inline void run_grid(const void* kernel, void (*body)(void*), void* body_arg, dim3 grid, dim3 block,
                     size_t smem_bytes) {
  static Block b;  // reused across launches (guarded by the launch mutex): keeps allocations warm
  b.kernel = kernel;
  b.body = body;
  b.body_arg = body_arg;
  gridDim = grid;
  blockDim = block;
  prepare_block(b, block, smem_bytes);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        begin_block(b, uint3{x, y, z});
        run_block(b);
      }
}

}  // namespace detail

// Runs `kernel<<<grid, block, dynamic_smem_bytes>>>(args...)` to completion on the CPU.
// Returns 0, or a cudaError_t code for an invalid configuration (nothing runs then).
template <class... Params, class... Args>
int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "gk::emu::launch: wrong number of kernel arguments");
  if (const int err = detail::check_launch(grid, block, dynamic_smem_bytes)) return err;
  // Kernel parameters are copied once, converted to the parameter types, like a real launch;
  // each CUDA thread then gets its own by-value copy when the kernel is called.
  using ParamTuple = std::tuple<std::decay_t<Params>...>;
  ParamTuple params(std::forward<Args>(args)...);
  struct Call { void (*kernel)(Params...); ParamTuple* params; } call{kernel, &params};
  auto body = [](void* p) {
    Call* c = static_cast<Call*>(p);
    std::apply(c->kernel, *c->params);
  };
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::run_grid(reinterpret_cast<const void*>(kernel), body, &call, grid, block, dynamic_smem_bytes);
  return 0;
}

// The current block's dynamic shared memory: 16-byte aligned, poisoned with 0xFF bytes.
inline void* dynamic_smem() { return detail::current_thread().block->dynamic_smem.data(); }
inline size_t dynamic_smem_bytes() { return detail::current_thread().block->dynamic_smem_bytes; }
// The calling CUDA thread's queue of in-flight cp.async copies (used by cuda/ptx.cuh).
inline AsyncCopyQueue& async_copy_queue() { return detail::current_thread().async_copies; }

}  // namespace gk::emu
