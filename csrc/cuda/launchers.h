// Declarations of the CUDA launchers, for the bindings. Plain C++: no CUDA header, so the
// bindings compile with the host compiler. Each launcher returns a cudaError_t as int and is
// defined twice from the same source (csrc/cuda/<kernel>.cuh):
//   gk::cuda      compiled by nvcc for the GPU (only in a CUDA build, GK_WITH_CUDA)
//   gk::cuda_emu  compiled by the host compiler against csrc/emu (GK_WITH_EMU), tests only
// The explicit instantiations come from the table in python/genkernels/tools/instantiations.py.
#pragma once
#include "core/diffusion_step.h"
#include "core/decode_params.h"
#include "core/flash_params.h"
#include "core/merge_params.h"
#include "core/numeric.h"

#define GK_DECLARE_CUDA_LAUNCHERS(ns)                                                  \
  namespace gk::ns {                                                                   \
  template <class T> int merge_attention_states(const MergeStatesParams& p, void* stream); \
  template <class T> int decode_attention(const DecodeParams& p, void* stream);              \
  template <class T> int flash_attention(const FlashParams& p, void* stream);                \
  template <class T, int kHeadDim> int flash_attention_hd(const FlashParams& p, void* stream); \
  template <class T, int kHeadDim> int decode_attention_hd(const DecodeParams& p, void* stream); \
  template <class T> int append_kv_cache(const AppendKVParams& p, void* stream);             \
  template <class T> int apply_rotary(const RotaryParams& p, void* stream);                  \
  template <class T> int diffusion_step(const DiffusionStepParams& p, void* stream);       \
  template <class T> int gaussian_noise(T* out, int64_t n, uint64_t seed, uint64_t offset, void* stream); \
  }
GK_DECLARE_CUDA_LAUNCHERS(cuda)
GK_DECLARE_CUDA_LAUNCHERS(cuda_emu)
#undef GK_DECLARE_CUDA_LAUNCHERS

namespace gk::cuda {
// Returned by a launcher whose instantiation was trimmed from this build (GK_KERNELS).
constexpr int kErrorNotCompiled = -1;
// Number of usable CUDA devices, or -1 with a reason in `why` (no driver, no device, ...).
int device_count(char* why, int why_len);
// The error string of a cudaError_t code.
const char* error_string(int code);
}  // namespace gk::cuda
