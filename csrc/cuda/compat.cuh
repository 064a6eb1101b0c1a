// The one header every CUDA kernel file includes first. It lets the same kernel source compile
//  - with nvcc, for the GPU (GK_CUDA_NS = cuda), and
//  - with the host C++ compiler against the CUDA-on-CPU emulator in csrc/emu (GK_CUDA_NS =
//    cuda_emu), so tests can run every CUDA kernel on a machine without a GPU.
// Launchers are written once, in the kernel's .cuh, inside `namespace gk::GK_CUDA_NS`, and
// launch through GK_LAUNCH_KERNEL; they return a cudaError_t as int (0 = success) so that the
// torch-free, CUDA-free bindings can declare them (see cuda/launchers.h).
#pragma once
#include "core/common.h"
#include "core/numeric.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define GK_CUDA_NS cuda
#define GK_EMULATED 0
// Launch on the caller's stream; report launch-configuration errors without synchronising.
#define GK_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...)                        \
  (kernel<<<(grid), (block), (smem_bytes), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__), \
   static_cast<int>(cudaGetLastError()))
// Kernels needing more than 48 KiB of dynamic shared memory must opt in once per kernel.
#define GK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  static_cast<int>(cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (bytes)))
// Dynamic shared memory as a typed pointer.
#define GK_DYNAMIC_SMEM(type, name)                       \
  extern __shared__ __align__(16) unsigned char name##_raw_[]; \
  type* name = reinterpret_cast<type*>(name##_raw_)
#else
#include "emu/emu.h"
#define GK_CUDA_NS cuda_emu
#define GK_EMULATED 1
#define GK_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  (static_cast<void>(stream), ::gk::emu::launch((kernel), (grid), (block), (smem_bytes), __VA_ARGS__))
#define GK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) (static_cast<void>(kernel), static_cast<void>(bytes), 0)
#define GK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::gk::emu::dynamic_smem())
#endif
