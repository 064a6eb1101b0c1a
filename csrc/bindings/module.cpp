// genkernels._C: the one file that lists every entry point of the extension module.
//
// Entry points are torch-free: they take raw pointers (uintptr_t), sizes, int64 strides, a dtype
// code (gk::DType), a device code (gk::Device), the caller's CUDA stream (uintptr_t) and the CPU
// thread count. The Python layer (python/genkernels) validates every argument first; the checks
// here re-state shape consistency so that no call can reach a kernel with an impossible problem
// (std::invalid_argument becomes ValueError). The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <omp.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/common.h"
#include "core/decode_params.h"
#include "core/diffusion_coeffs.h"
#include "core/philox.h"
#include "core/merge_params.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cuda/launchers.h"

namespace py = pybind11;

namespace {

using gk::Device;

template <class T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Throws std::invalid_argument("genkernels: " + message) when `ok` is false. A macro so that the
// message is built only then: some checks run once per page or per position on every call, and
// building their strings eagerly cost ~0.1 us each (0.1 ms of a 16k-token paged decode at page
// size 16, 0.8 ms at batch 8, single-threaded before the kernel starts).
#define GK_REQUIRE(ok, ...) \
  do {                      \
    if (!(ok)) throw std::invalid_argument(std::string("genkernels: ") + (__VA_ARGS__)); \
  } while (0)

Device device_of(int code) {
  switch (code) {
    case static_cast<int>(Device::kCPU): return Device::kCPU;
    case static_cast<int>(Device::kCUDA):
      if (!GK_WITH_CUDA) throw std::runtime_error("genkernels: this build has no CUDA kernels (built without nvcc)");
      return Device::kCUDA;
    case static_cast<int>(Device::kEmulated):
      if (!GK_WITH_EMU) throw std::runtime_error("genkernels: this build has no CUDA emulation (GK_EMU=OFF)");
      return Device::kEmulated;
  }
  throw std::invalid_argument("genkernels: unknown device code " + std::to_string(code));
}

// Turns a launcher's cudaError_t into an exception.
void check_launch(int err, const char* op) {
  if (err == 0) return;
  std::string msg = std::string("genkernels.") + op + ": ";
  if (err == gk::cuda::kErrorNotCompiled) {
    msg += "this kernel instantiation was trimmed from the build (GK_KERNELS)";
  } else {
#if GK_WITH_CUDA
    msg += std::string("CUDA error: ") + gk::cuda::error_string(err);
#else
    msg += "emulated launch failed with code " + std::to_string(err);
#endif
  }
  throw std::runtime_error(msg);
}

// Runs `cpu()` or the CUDA / emulated launcher for the device.
template <class Cpu, class Cuda, class Emu>
void run_on(Device dev, const char* op, Cpu&& cpu, Cuda&& cuda_launch, Emu&& emu_launch) {
  switch (dev) {
    case Device::kCPU: cpu(); return;
    case Device::kCUDA: check_launch(cuda_launch(), op); return;
    case Device::kEmulated: check_launch(emu_launch(), op); return;
  }
}

// Runs `op<T>` for the dtype code on the device: the CPU kernel at the active ISA level (with
// the params struct and the thread count), or the CUDA / emulated launcher on the caller's
// stream. Every entry point that fills a params struct ends with this.
#define GK_RUN_KERNEL(op, dev, dtype, params, num_threads, stream)                       \
  GK_DISPATCH_DTYPE(dtype, T,                                                            \
    run_on(dev, #op,                                                                     \
      [&] { GK_CPU_DISPATCH(op<T>, params, num_threads); },                              \
      [&] { return GK_WITH_CUDA ? gk::cuda::op<T>(params, stream) : 0; },                \
      [&] { return GK_WITH_EMU ? gk::cuda_emu::op<T>(params, stream) : 0; }))

// ------------------------------------------------------------------ merge_attention_states
void merge_attention_states(int device, int dtype, uintptr_t out_first, uintptr_t out_rest, uintptr_t lse_first,
                            uintptr_t lse_rest, int64_t num_partials, int64_t out_partial_stride,
                            int64_t lse_partial_stride, int64_t batch, int64_t seqlen, int64_t heads,
                            int64_t head_dim, int64_t ofs_b, int64_t ofs_s, int64_t ofs_h, int64_t ors_b,
                            int64_t ors_s, int64_t ors_h, int64_t lfs_b, int64_t lfs_h, int64_t lfs_s,
                            int64_t lrs_b, int64_t lrs_h, int64_t lrs_s, uintptr_t dst_out, uintptr_t dst_lse,
                            uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(num_partials >= 1, "merge_attention_states: need at least one partial state");
  GK_REQUIRE(batch >= 0 && seqlen >= 0 && heads >= 0 && head_dim >= 1, "merge_attention_states: negative or zero size");
  GK_REQUIRE(num_threads >= 1, "merge_attention_states: num_threads must be >= 1");
  gk::MergeStatesParams p;
  p.out_first = as_ptr<const void>(out_first);
  p.out_rest = as_ptr<const void>(out_rest);
  p.lse_first = as_ptr<const float>(lse_first);
  p.lse_rest = as_ptr<const float>(lse_rest);
  p.num_partials = num_partials;
  p.out_partial_stride = out_partial_stride;
  p.lse_partial_stride = lse_partial_stride;
  p.batch = batch, p.seqlen = seqlen, p.heads = heads, p.head_dim = head_dim;
  const int64_t ofs[3] = {ofs_b, ofs_s, ofs_h}, ors[3] = {ors_b, ors_s, ors_h};
  const int64_t lfs[3] = {lfs_b, lfs_h, lfs_s}, lrs[3] = {lrs_b, lrs_h, lrs_s};
  for (int k = 0; k < 3; ++k) {
    p.out_first_stride[k] = ofs[k], p.out_rest_stride[k] = ors[k];
    p.lse_first_stride[k] = lfs[k], p.lse_rest_stride[k] = lrs[k];
  }
  p.dst_out = as_ptr<void>(dst_out);
  p.dst_lse = as_ptr<float>(dst_lse);
  if (p.rows() == 0) return;
  GK_REQUIRE(p.out_first && p.lse_first && p.dst_out, "merge_attention_states: null pointer");
  GK_REQUIRE(num_partials == 1 || (p.out_rest && p.lse_rest), "merge_attention_states: null pointer for partials 1..");
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(merge_attention_states, dev, dtype, p, num_threads, s);
}

// ------------------------------------------------------------------ flash attention (prefill)
// cu_seqlens checks need the values: run for host memory (CPU and emulated devices) before any
// kernel reads through them; CUDA callers get the shape checks of the Python layer only.
void check_cu_seqlens(const char* name, const int32_t* cu, int64_t batch, int64_t total, int64_t max_seqlen,
                      const char* max_name) {
  GK_REQUIRE(cu[0] == 0, std::string("flash_attention_varlen: ") + name + "[0] must be 0, got " + std::to_string(cu[0]));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    GK_REQUIRE(len >= 0, std::string("flash_attention_varlen: ") + name + " must be non-decreasing, but " + name + "[" +
                          std::to_string(b + 1) + "] = " + std::to_string(cu[b + 1]) + " < " + name + "[" +
                          std::to_string(b) + "] = " + std::to_string(cu[b]));
    GK_REQUIRE(len <= max_seqlen, std::string("flash_attention_varlen: sequence ") + std::to_string(b) + " has " +
                                   std::to_string(len) + " tokens (" + name + "), more than " + max_name + " = " +
                                   std::to_string(max_seqlen));
  }
  GK_REQUIRE(cu[batch] <= total, std::string("flash_attention_varlen: ") + name + "[-1] = " + std::to_string(cu[batch]) +
                                  " exceeds the " + std::to_string(total) + " tokens of the tensor");
}

void flash_attention(int device, int dtype, uintptr_t q, int64_t q_sb, int64_t q_ss, int64_t q_sh, uintptr_t k,
                     int64_t k_sb, int64_t k_ss, int64_t k_sh, uintptr_t v, int64_t v_sb, int64_t v_ss, int64_t v_sh,
                     uintptr_t out, int64_t o_sb, int64_t o_ss, int64_t o_sh, uintptr_t lse, int64_t l_sb, int64_t l_sh,
                     int64_t l_ss, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, int64_t total_q, int64_t total_k,
                     uintptr_t alibi, int64_t alibi_bstride, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                     int64_t heads_q, int64_t heads_kv, int64_t head_dim, double scale, double softcap, bool causal,
                     int64_t window_left, int64_t window_right, uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(batch >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && heads_q >= 1 && heads_kv >= 1,
          "flash_attention: negative or zero size");
  GK_REQUIRE(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= 256, "flash_attention: head_dim must be a multiple of 8 in [8, 256]");
  GK_REQUIRE(heads_q % heads_kv == 0, "flash_attention: heads_q must be a multiple of heads_kv");
  GK_REQUIRE(seqlen_q < (1 << 24) && seqlen_k < (1 << 24), "flash_attention: sequences must be shorter than 2^24 tokens");
  GK_REQUIRE(window_left >= -1 && window_right >= -1, "flash_attention: window bounds must be >= -1");
  GK_REQUIRE(softcap >= 0.0, "flash_attention: softcap must be >= 0");
  GK_REQUIRE(num_threads >= 1, "flash_attention: num_threads must be >= 1");
  GK_REQUIRE((cu_seqlens_q == 0) == (cu_seqlens_k == 0), "flash_attention: pass both cu_seqlens_q and cu_seqlens_k or neither");
  gk::FlashParams p;
  p.q = as_ptr<const void>(q), p.k = as_ptr<const void>(k), p.v = as_ptr<const void>(v);
  p.out = as_ptr<void>(out), p.lse = as_ptr<float>(lse);
  const int64_t qs[3] = {q_sb, q_ss, q_sh}, ks[3] = {k_sb, k_ss, k_sh}, vs[3] = {v_sb, v_ss, v_sh};
  const int64_t os[3] = {o_sb, o_ss, o_sh}, ls[3] = {l_sb, l_sh, l_ss};
  for (int i = 0; i < 3; ++i)
    p.q_stride[i] = qs[i], p.k_stride[i] = ks[i], p.v_stride[i] = vs[i], p.out_stride[i] = os[i], p.lse_stride[i] = ls[i];
  p.cu_seqlens_q = as_ptr<const int32_t>(cu_seqlens_q), p.cu_seqlens_k = as_ptr<const int32_t>(cu_seqlens_k);
  p.alibi_slopes = as_ptr<const float>(alibi), p.alibi_batch_stride = alibi_bstride;
  p.batch = batch, p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k;
  p.heads_q = heads_q, p.heads_kv = heads_kv, p.head_dim = head_dim;
  p.scale = float(scale), p.softcap = float(softcap), p.causal = causal;
  p.window_left = window_left, p.window_right = window_right;
  if (batch == 0) return;
  if (p.varlen() && dev != Device::kCUDA) {
    check_cu_seqlens("cu_seqlens_q", p.cu_seqlens_q, batch, total_q, seqlen_q, "max_seqlen_q");
    check_cu_seqlens("cu_seqlens_k", p.cu_seqlens_k, batch, total_k, seqlen_k, "max_seqlen_k");
  }
  if (seqlen_q == 0) return;
  GK_REQUIRE(p.q && p.out && ((p.k && p.v) || seqlen_k == 0 || total_k == 0), "flash_attention: null pointer");
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(flash_attention, dev, dtype, p, num_threads, s);
}

// ------------------------------------------------------------------ decode attention, KV append
// Test hook: when set, the emulated device skips the host-side index checks below, as CUDA does,
// so tests can drive the kernels' own guards against bad cache_seqlens / block_table values.
bool g_emulate_unchecked_indices = false;
bool set_emulate_unchecked_indices(bool on) {
  const bool old = g_emulate_unchecked_indices;
  g_emulate_unchecked_indices = on;
  return old;
}
bool host_checks_indices(Device dev) {
  return dev == Device::kCPU || (dev == Device::kEmulated && !g_emulate_unchecked_indices);
}

// Cache checks that need the values of cache_seqlens and block_table: run for host memory (CPU
// and emulated devices) before anything is read or written. On CUDA the kernels guard instead
// (reading device values here would synchronise): see csrc/cuda/decode_attention.cuh.
void check_cache_indices(const char* op, const int32_t* seqlens, int64_t batch, int64_t extra, int64_t capacity,
                         const int32_t* block_table, int64_t bt_stride, int64_t page_size, int64_t num_pages) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(seqlens[b]) + extra;
    GK_REQUIRE(seqlens[b] >= 0, std::string(op) + ": cache_seqlens[" + std::to_string(b) + "] = " +
                                 std::to_string(seqlens[b]) + " is negative");
    GK_REQUIRE(len <= capacity, std::string(op) + ": cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(seqlens[b]) +
                                 (extra ? " + " + std::to_string(extra) + " new tokens" : std::string()) +
                                 " exceeds the cache capacity of " + std::to_string(capacity) + " tokens");
    if (!block_table) continue;
    for (int64_t i = 0; i < (len + page_size - 1) / page_size; ++i) {
      const int32_t page = block_table[b * bt_stride + i];
      GK_REQUIRE(page >= 0 && page < num_pages, std::string(op) + ": block_table[" + std::to_string(b) + ", " +
                                                 std::to_string(i) + "] = " + std::to_string(page) +
                                                 " is not a page index in [0, " + std::to_string(num_pages) + ")");
    }
  }
}

// Paged appends (host memory, after check_cache_indices): no two new tokens may land in one cache
// slot. Block tables that share a page between sequences (a common prefix) are fine as long as
// nobody writes into the shared part; two sequences appending into one page's same slots (a
// shared last page not copied before the write), or one table listing a page twice where it
// writes, would have the writes race and leave one of them, whichever came last. Checked per
// run of a sequence's new tokens within one page: sorted by (page, first slot), a run that
// starts before the previous runs of its page end overlaps them.
void check_distinct_write_slots(const int32_t* seqlens, int64_t batch, int64_t seqlen_new, const int32_t* block_table,
                                int64_t bt_stride, int64_t page_size) {
  struct Run {
    int64_t page, lo, hi, seq;
  };
  std::vector<Run> runs;
  runs.reserve(size_t(batch * ((seqlen_new + page_size - 1) / page_size + 1)));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t pos = seqlens[b], end = pos + seqlen_new; pos < end;) {
      const int64_t off = pos % page_size, n = std::min(page_size - off, end - pos);
      runs.push_back({block_table[b * bt_stride + pos / page_size], off, off + n, b});
      pos += n;
    }
  std::sort(runs.begin(), runs.end(),
            [](const Run& a, const Run& b) { return a.page != b.page ? a.page < b.page : a.lo < b.lo; });
  for (size_t i = 1, last = 0; i < runs.size(); ++i) {  // last: the run of this page that ends latest so far
    if (runs[i].page != runs[last].page) {
      last = i;
      continue;
    }
    GK_REQUIRE(runs[i].lo >= runs[last].hi, [&] {
      const int64_t s0 = std::min(runs[last].seq, runs[i].seq), s1 = std::max(runs[last].seq, runs[i].seq);
      const std::string where = "slot " + std::to_string(runs[i].lo) + " of page " + std::to_string(runs[i].page);
      return s0 == s1 ? "append_kv_cache: sequence " + std::to_string(s0) + " would write " + where +
                            " twice (block_table[" + std::to_string(s0) + "] lists that page more than once where it appends)"
                      : "append_kv_cache: sequences " + std::to_string(s0) + " and " + std::to_string(s1) +
                            " would both write " + where +
                            " (their block_table rows share that page where they append; copy a shared page before "
                            "writing into it)";
    }());
    if (runs[i].hi > runs[last].hi) last = i;
  }
}

void decode_attention(int device, int dtype, uintptr_t q, int64_t q_sb, int64_t q_ss, int64_t q_sh, uintptr_t k,
                      uintptr_t v, int64_t k_s0, int64_t k_s1, int64_t k_s2, int64_t v_s0, int64_t v_s1, int64_t v_s2,
                      uintptr_t block_table, int64_t bt_stride, int64_t page_size, int64_t capacity, int64_t num_pages,
                      uintptr_t cache_seqlens, uintptr_t alibi, int64_t alibi_bstride, uintptr_t out, uintptr_t lse,
                      uintptr_t partial_out, uintptr_t partial_lse, int64_t batch, int64_t seqlen_q, int64_t heads_q,
                      int64_t heads_kv, int64_t head_dim, int64_t num_splits, double scale, double softcap, bool causal,
                      int64_t window_left, int64_t window_right, uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(batch >= 0 && seqlen_q >= 0 && head_dim >= 1 && heads_kv >= 1 && heads_q >= 1,
          "decode_attention: negative or zero size");
  GK_REQUIRE(heads_q % heads_kv == 0, "decode_attention: heads_q must be a multiple of heads_kv");
  GK_REQUIRE(num_splits >= (dev == Device::kCPU ? 0 : 1) && num_splits <= 1024,
          "decode_attention: num_splits must be in [1, 1024] (0: automatic, CPU only)");
  GK_REQUIRE(num_threads >= 1, "decode_attention: num_threads must be >= 1");
  GK_REQUIRE(!block_table || (page_size >= 1 && (page_size & (page_size - 1)) == 0),
          "decode_attention: page_size must be a power of two");
  GK_REQUIRE(num_splits <= 1 || dev == Device::kCPU || (partial_out && partial_lse),
          "decode_attention: split-KV needs the fp32 workspace");
  gk::DecodeParams p;
  p.q = as_ptr<const void>(q);
  p.q_stride[0] = q_sb, p.q_stride[1] = q_ss, p.q_stride[2] = q_sh;
  p.k = as_ptr<const void>(k), p.v = as_ptr<const void>(v);
  p.k_stride[0] = k_s0, p.k_stride[1] = k_s1, p.k_stride[2] = k_s2;
  p.v_stride[0] = v_s0, p.v_stride[1] = v_s1, p.v_stride[2] = v_s2;
  p.block_table = as_ptr<const int32_t>(block_table);
  p.block_table_stride = bt_stride;
  p.page_size = block_table ? page_size : 0;
  p.capacity = capacity, p.num_pages = num_pages;
  p.cache_seqlens = as_ptr<const int32_t>(cache_seqlens);
  p.alibi_slopes = as_ptr<const float>(alibi);
  p.alibi_batch_stride = alibi_bstride;
  p.out = as_ptr<void>(out), p.lse = as_ptr<float>(lse);
  p.partial_out = as_ptr<float>(partial_out), p.partial_lse = as_ptr<float>(partial_lse);
  p.batch = batch, p.seqlen_q = seqlen_q, p.heads_q = heads_q, p.heads_kv = heads_kv, p.head_dim = head_dim;
  p.num_splits = int(num_splits);
  p.scale = float(scale), p.softcap = float(softcap), p.causal = causal;
  p.window_left = window_left, p.window_right = window_right;
  if (batch == 0 || seqlen_q == 0) return;
  // A cache that holds no token (capacity 0, or an empty page pool) may come with null K and V:
  // every length must then be 0 (checked below on the host; the CUDA kernel guards), so no row
  // is ever read.
  const bool empty_cache = block_table ? num_pages == 0 : capacity == 0;
  GK_REQUIRE(p.q && p.out && p.cache_seqlens && ((p.k && p.v) || empty_cache), "decode_attention: null pointer");
  if (host_checks_indices(dev))
    check_cache_indices("decode_attention", p.cache_seqlens, batch, 0, capacity, p.block_table, bt_stride, page_size, num_pages);
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(decode_attention, dev, dtype, p, num_threads, s);
}

void append_kv_cache(int device, int dtype, uintptr_t k_new, uintptr_t v_new, int64_t kn_sb, int64_t kn_ss,
                     int64_t kn_sh, int64_t vn_sb, int64_t vn_ss, int64_t vn_sh, uintptr_t k, uintptr_t v, int64_t k_s0,
                     int64_t k_s1, int64_t k_s2, int64_t v_s0, int64_t v_s1, int64_t v_s2, uintptr_t block_table,
                     int64_t bt_stride, int64_t page_size, int64_t capacity, int64_t num_pages, uintptr_t cache_seqlens,
                     int64_t batch, int64_t seqlen_new, int64_t heads_kv, int64_t head_dim, uintptr_t rotary_cos,
                     uintptr_t rotary_sin, int64_t rotary_dim, int64_t rotary_positions, bool rotary_interleaved,
                     uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(batch >= 0 && seqlen_new >= 0 && heads_kv >= 1 && head_dim >= 1, "append_kv_cache: negative or zero size");
  GK_REQUIRE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
          "append_kv_cache: rotary_dim must be even and at most head_dim");
  GK_REQUIRE(!block_table || (page_size >= 1 && (page_size & (page_size - 1)) == 0),
          "append_kv_cache: page_size must be a power of two");
  GK_REQUIRE(num_threads >= 1, "append_kv_cache: num_threads must be >= 1");
  gk::AppendKVParams p;
  p.k_new = as_ptr<const void>(k_new), p.v_new = as_ptr<const void>(v_new);
  p.k_new_stride[0] = kn_sb, p.k_new_stride[1] = kn_ss, p.k_new_stride[2] = kn_sh;
  p.v_new_stride[0] = vn_sb, p.v_new_stride[1] = vn_ss, p.v_new_stride[2] = vn_sh;
  p.k = as_ptr<void>(k), p.v = as_ptr<void>(v);
  p.k_stride[0] = k_s0, p.k_stride[1] = k_s1, p.k_stride[2] = k_s2;
  p.v_stride[0] = v_s0, p.v_stride[1] = v_s1, p.v_stride[2] = v_s2;
  p.block_table = as_ptr<const int32_t>(block_table);
  p.block_table_stride = bt_stride;
  p.page_size = block_table ? page_size : 0;
  p.capacity = capacity, p.num_pages = num_pages;
  p.cache_seqlens = as_ptr<int32_t>(cache_seqlens);
  p.batch = batch, p.seqlen_new = seqlen_new, p.heads_kv = heads_kv, p.head_dim = head_dim;
  p.rotary_cos = as_ptr<const float>(rotary_cos), p.rotary_sin = as_ptr<const float>(rotary_sin);
  p.rotary_dim = rotary_dim, p.rotary_positions = rotary_positions, p.rotary_interleaved = rotary_interleaved;
  if (batch == 0) return;
  GK_REQUIRE(p.cache_seqlens, "append_kv_cache: null cache_seqlens");
  if (seqlen_new == 0) return;
  GK_REQUIRE(p.k_new && p.v_new && p.k && p.v, "append_kv_cache: null pointer");
  GK_REQUIRE(rotary_dim == 0 || (p.rotary_cos && p.rotary_sin), "append_kv_cache: null rotary table");
  if (host_checks_indices(dev)) {
    check_cache_indices("append_kv_cache", p.cache_seqlens, batch, seqlen_new, capacity, p.block_table, bt_stride,
                        page_size, num_pages);
    if (p.block_table) check_distinct_write_slots(p.cache_seqlens, batch, seqlen_new, p.block_table, bt_stride, page_size);
    for (int64_t b = 0; b < batch && rotary_dim; ++b)
      GK_REQUIRE(int64_t(p.cache_seqlens[b]) + seqlen_new <= rotary_positions,
              "append_kv_cache: rotary_cos/rotary_sin have " + std::to_string(rotary_positions) +
                  " positions but sequence " + std::to_string(b) + " needs " +
                  std::to_string(int64_t(p.cache_seqlens[b]) + seqlen_new));
  }
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(append_kv_cache, dev, dtype, p, num_threads, s);
}

void apply_rotary(int device, int dtype, uintptr_t x, int64_t x_sb, int64_t x_ss, int64_t x_sh, uintptr_t out,
                  uintptr_t positions, int64_t pos_sb, int64_t pos_ss, uintptr_t cos, uintptr_t sin, int64_t rotary_dim,
                  int64_t rotary_positions, bool interleaved, int64_t batch, int64_t seqlen, int64_t heads,
                  int64_t head_dim, uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(batch >= 0 && seqlen >= 0 && heads >= 0 && head_dim >= 1, "apply_rotary: negative or zero size");
  GK_REQUIRE(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
          "apply_rotary: rotary_dim must be even, >= 2 and at most head_dim");
  GK_REQUIRE(num_threads >= 1, "apply_rotary: num_threads must be >= 1");
  gk::RotaryParams p;
  p.x = as_ptr<const void>(x);
  p.x_stride[0] = x_sb, p.x_stride[1] = x_ss, p.x_stride[2] = x_sh;
  p.out = as_ptr<void>(out);
  p.positions = as_ptr<const int32_t>(positions);
  p.positions_stride[0] = pos_sb, p.positions_stride[1] = pos_ss;
  p.cos = as_ptr<const float>(cos), p.sin = as_ptr<const float>(sin);
  p.rotary_dim = rotary_dim, p.rotary_positions = rotary_positions, p.interleaved = interleaved;
  p.batch = batch, p.seqlen = seqlen, p.heads = heads, p.head_dim = head_dim;
  if (batch * seqlen * heads == 0) return;
  GK_REQUIRE(p.x && p.out && p.positions && p.cos && p.sin, "apply_rotary: null pointer");
  if (host_checks_indices(dev))
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t s = 0; s < seqlen; ++s) {
        const int32_t pos = p.positions[b * pos_sb + s * pos_ss];
        GK_REQUIRE(pos >= 0 && pos < rotary_positions, "apply_rotary: positions[" + std::to_string(b) + ", " +
                                                        std::to_string(s) + "] = " + std::to_string(pos) +
                                                        " is outside the cos/sin table [0, " +
                                                        std::to_string(rotary_positions) + ")");
      }
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(apply_rotary, dev, dtype, p, num_threads, s);
}

// ------------------------------------------------------------------ diffusion steps, Philox noise
py::tuple philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const gk::Philox4x32Result r = gk::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
}

void gaussian_noise(int device, int dtype, uintptr_t out, int64_t n, uint64_t seed, uint64_t offset,
                    uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  GK_REQUIRE(n >= 0, "gaussian_noise: negative size");
  GK_REQUIRE(num_threads >= 1, "gaussian_noise: num_threads must be >= 1");
  if (n == 0) return;
  GK_REQUIRE(out != 0, "gaussian_noise: null pointer");
  void* s = as_ptr<void>(stream);
  GK_DISPATCH_DTYPE(dtype, T,
    run_on(dev, "gaussian_noise",
      [&] { GK_CPU_DISPATCH(gaussian_noise<T>, as_ptr<T>(out), n, seed, offset, num_threads); },
      [&] { return GK_WITH_CUDA ? gk::cuda::gaussian_noise<T>(as_ptr<T>(out), n, seed, offset, s) : 0; },
      [&] { return GK_WITH_EMU ? gk::cuda_emu::gaussian_noise<T>(as_ptr<T>(out), n, seed, offset, s) : 0; }));
}

// The per-step scalars (px, pm, pz, cx, cm, c0, ch, cz, clip) of csrc/core/diffusion_coeffs.h.
py::tuple diffusion_step_coeffs(int sampler, int prediction, double alpha_prod_t, double alpha_prod_prev, double eta,
                                bool use_clipped_model_output, bool variance_large, bool add_noise, double clip,
                                double sigma_prev, double sigma, double sigma_next, double gamma, double s_noise,
                                int order, bool sde, bool flow_sigmas, bool keep_x0) {
  gk::StepScalars in;
  in.alpha_prod_t = alpha_prod_t, in.alpha_prod_prev = alpha_prod_prev, in.eta = eta;
  in.use_clipped_model_output = use_clipped_model_output, in.variance_large = variance_large;
  in.add_noise = add_noise, in.clip = clip;
  in.sigma_prev = sigma_prev, in.sigma = sigma, in.sigma_next = sigma_next, in.gamma = gamma, in.s_noise = s_noise;
  in.order = order, in.sde = sde, in.flow_sigmas = flow_sigmas, in.keep_x0 = keep_x0;
  const gk::StepCoeffs k = gk::step_coeffs(sampler, prediction, in);
  return py::make_tuple(k.px, k.pm, k.pz, k.cx, k.cm, k.c0, k.ch, k.cz, k.clip);
}

// One fused step over n contiguous elements of `batch` items; see csrc/core/diffusion_step.h.
// per_sample: 2 * batch floats of workspace for guidance_rescale / dynamic thresholding.
void diffusion_step(int device, int dtype, int64_t n, uintptr_t model_uncond, uintptr_t model_cond, double guidance,
                    uintptr_t sample, uintptr_t history, uintptr_t noise, uintptr_t prev_sample,
                    uintptr_t pred_original, double px, double pm, double pz, double cx, double cm, double c0,
                    double ch, double cz, double clip, uint64_t seed, uint64_t offset, uintptr_t stream,
                    int num_threads, int64_t batch, double guidance_rescale, double threshold_ratio,
                    double threshold_max, uintptr_t per_sample) {
  const Device dev = device_of(device);
  GK_REQUIRE(n >= 0, "diffusion_step: negative size");
  GK_REQUIRE(num_threads >= 1, "diffusion_step: num_threads must be >= 1");
  gk::DiffusionStepParams p;
  p.n = n;
  p.model_uncond = as_ptr<const void>(model_uncond);
  p.model_cond = as_ptr<const void>(model_cond);
  p.sample = as_ptr<const void>(sample);
  p.history = as_ptr<const void>(history);
  p.noise = as_ptr<const void>(noise);
  p.prev_sample = as_ptr<void>(prev_sample);
  p.pred_original = as_ptr<void>(pred_original);
  p.guidance = float(guidance);
  gk::StepCoeffs k;
  k.px = px, k.pm = pm, k.pz = pz, k.cx = cx, k.cm = cm, k.c0 = c0, k.ch = ch, k.cz = cz, k.clip = clip;
  p.set_coeffs(k);
  p.seed = seed, p.offset = offset;
  p.batch = batch, p.guidance_rescale = float(guidance_rescale), p.threshold_ratio = float(threshold_ratio);
  p.threshold_max = float(threshold_max), p.per_sample = as_ptr<float>(per_sample);
  GK_REQUIRE(batch >= 1 && n % batch == 0, "diffusion_step: batch must be >= 1 and divide the size");
  GK_REQUIRE(threshold_ratio >= 0 && threshold_ratio <= 1, "diffusion_step: threshold_ratio must be in [0, 1]");
  GK_REQUIRE(!p.thresholds() || clip == 0, "diffusion_step: clip and dynamic thresholding are exclusive");
  GK_REQUIRE(!p.rescales() || p.model_cond, "diffusion_step: guidance_rescale needs guidance (the conditional half)");
  if (n == 0) return;
  GK_REQUIRE(!p.needs_reduction() || p.per_sample, "diffusion_step: null per-sample workspace");
  GK_REQUIRE(p.model_uncond && p.sample && p.prev_sample, "diffusion_step: null pointer");
  GK_REQUIRE(p.ch == 0.f || p.history, "diffusion_step: the update uses the history but none was given");
  void* s = as_ptr<void>(stream);
  GK_RUN_KERNEL(diffusion_step, dev, dtype, p, num_threads, s);
}

// ------------------------------------------------------------------ machine peaks (bench)
double cpu_peak_gflops(int kind, int num_threads, int64_t iters) {
  GK_REQUIRE(kind == 0 || kind == 1, "cpu_peak_gflops: kind must be 0 (fp32 FMA) or 1 (bf16 dot product)");
  GK_REQUIRE(num_threads >= 1 && iters >= 1, "cpu_peak_gflops: num_threads and iters must be >= 1");
  double gflops = 0.0;
  GK_CPU_DISPATCH(peak_gflops, static_cast<gk::cpu::PeakKind>(kind), num_threads, iters, &gflops);
  return gflops;
}

// ------------------------------------------------------------------ runtime information
py::dict build_info() {
  py::dict d;
  d["version"] = GK_VERSION;
  d["with_cuda"] = bool(GK_WITH_CUDA);
  d["cuda_archs"] = std::string(GK_CUDA_ARCHS_STR);
  d["with_emulation"] = bool(GK_WITH_EMU);
  d["cpu_isa"] = gk::cpu::isa_name(gk::cpu::active_isa());
  d["cpu_isa_detected"] = gk::cpu::isa_name(gk::cpu::detect_isa());
  d["cpu_isas_compiled"] = gk::cpu::compiled_isas();
  d["openmp_max_threads"] = omp_get_max_threads();
  return d;
}

py::tuple cuda_device_count() {
#if GK_WITH_CUDA
  char why[256] = {0};
  const int n = gk::cuda::device_count(why, sizeof why);
  return py::make_tuple(n < 0 ? 0 : n, std::string(why));
#else
  return py::make_tuple(0, std::string("built without CUDA"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genkernels native module (torch-free entry points; see python/genkernels for the API)";
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "(count, reason when 0)");
  m.def("reload_cpu_isa", &gk::cpu::set_isa_from_env, "re-read GK_CPU_ISA");
  m.def("cpu_peak_gflops", &cpu_peak_gflops, "measured fp32 FMA (kind 0) or bf16 dot-product (kind 1) peak",
        py::call_guard<py::gil_scoped_release>());
  m.def("merge_attention_states", &merge_attention_states, py::call_guard<py::gil_scoped_release>());
  m.def("flash_attention", &flash_attention, py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, py::call_guard<py::gil_scoped_release>());
  m.def("_set_emulate_unchecked_indices", &set_emulate_unchecked_indices,
        "test hook: emulated decode/append skip the host index checks, as on CUDA; returns the old value");
  m.def("append_kv_cache", &append_kv_cache, py::call_guard<py::gil_scoped_release>());
  m.def("apply_rotary", &apply_rotary, py::call_guard<py::gil_scoped_release>());
  m.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 of (counter[4], key[2]) (known-answer tests)");
  m.def("gaussian_noise", &gaussian_noise, py::call_guard<py::gil_scoped_release>());
  m.def("diffusion_step_coeffs", &diffusion_step_coeffs, py::arg("sampler"), py::arg("prediction"),
        py::arg("alpha_prod_t") = 0.0, py::arg("alpha_prod_prev") = 0.0, py::arg("eta") = 0.0,
        py::arg("use_clipped_model_output") = false, py::arg("variance_large") = false, py::arg("add_noise") = false,
        py::arg("clip") = 0.0, py::arg("sigma_prev") = 0.0, py::arg("sigma") = 0.0, py::arg("sigma_next") = 0.0,
        py::arg("gamma") = 0.0, py::arg("s_noise") = 1.0, py::arg("order") = 1, py::arg("sde") = false,
        py::arg("flow_sigmas") = false, py::arg("keep_x0") = false);
  m.def("diffusion_step", &diffusion_step, py::call_guard<py::gil_scoped_release>());
}
