// CUDA language keywords, vector types and runtime-API scalars for the CUDA-on-CPU emulator.
//
// Only the subset our kernels use. Nothing here includes a CUDA toolkit header: the emulator must
// build on machines without CUDA, and mixing toolkit headers with these definitions would give
// two incompatible `dim3`s.
#pragma once
#if defined(__CUDACC__)
#error "csrc/emu is the host-compiler emulation of CUDA; nvcc must not include it"
#endif
#include <cstddef>
#include <cstdint>

// ---- execution-space and storage keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Blocks of a launch run one after another and launches are serialized, so one instance of each
// __shared__ variable per kernel function is enough. Like on a GPU, its content at the start of
// a block is whatever the previous block left there (undefined).
#define __shared__ static
#define __constant__
#define __align__(n) __attribute__((aligned(n)))

// ---- vector types (same sizes and alignments as CUDA's vector_types.h) ----
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "CUDA float4 layout");
static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8, "CUDA uint2 layout");

inline constexpr int2 make_int2(int x, int y) { return {x, y}; }
inline constexpr uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline constexpr float2 make_float2(float x, float y) { return {x, y}; }
inline constexpr int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline constexpr uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline constexpr float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- runtime-API scalars ----
// Values match the CUDA runtime's so that error codes mean the same thing in both builds.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
  }
  return "unknown error (emulated)";
}

// ---- built-in variables ----
// threadIdx/blockIdx are per CUDA thread: thread-local, and in fiber mode rewritten by the
// scheduler before every switch into a fiber. blockDim/gridDim are the same for the whole launch.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
inline constexpr int warpSize = 32;
