// Declarations of the CPU kernels, once per compiled ISA level (see isa.h). Each kernel is
// defined in csrc/cpu/kernels/<name>.cpp, which CMake compiles once per level with that
// level's flags and GK_CPU_ISA_NS set to the level's namespace.
#pragma once
#include "core/decode_params.h"
#include "core/merge_params.h"
#include "core/flash_params.h"
#include "core/diffusion_step.h"
#include "cpu/isa.h"

namespace gk::cpu {
// Machine peak probes (csrc/cpu/kernels/machine_peak.cpp), for the benchmarks.
enum class PeakKind : int { kFma = 0, kBf16Dot = 1 };
}  // namespace gk::cpu

#define GK_DECLARE_CPU_KERNELS(ns)                                                    \
  namespace gk::cpu::ns {                                                             \
  template <class T> void merge_attention_states(const MergeStatesParams& p, int num_threads); \
  template <class T> void flash_attention(const FlashParams& p, int num_threads);             \
  template <class T> void decode_attention(const DecodeParams& p, int num_threads);          \
  template <class T> void append_kv_cache(const AppendKVParams& p, int num_threads);          \
  template <class T> void apply_rotary(const RotaryParams& p, int num_threads);               \
  template <class T> void diffusion_step(const DiffusionStepParams& p, int num_threads);       \
  template <class T> void gaussian_noise(T* out, int64_t n, uint64_t seed, uint64_t offset, int num_threads); \
  void peak_gflops(PeakKind kind, int num_threads, int64_t iters, double* gflops);                  \
  }
GK_CPU_FOR_EACH_ISA(GK_DECLARE_CPU_KERNELS)
#undef GK_DECLARE_CPU_KERNELS
