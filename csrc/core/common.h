// genkernels core: definitions shared by the CPU kernels, the CUDA kernels and their emulation.
// No torch, no CUDA runtime. Everything here compiles with a host C++17 compiler and with nvcc.
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define GK_HOST_DEVICE __host__ __device__
#define GK_DEVICE __device__
#define GK_INLINE __forceinline__
#else
#define GK_HOST_DEVICE
#define GK_DEVICE
#define GK_INLINE inline __attribute__((always_inline))
#endif

namespace gk {

// Element type codes shared with python/genkernels/_dtypes.py. Keep the numbers in sync.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device codes for entry points: where the pointers live and which implementation runs.
//   kCPU      : the C++ CPU kernels
//   kCUDA     : the real CUDA kernels (only in a CUDA build with a usable GPU)
//   kEmulated : the CUDA kernels run on the CPU by the emulator in csrc/emu (tests only)
enum class Device : int { kCPU = 0, kCUDA = 1, kEmulated = 2 };

}  // namespace gk
