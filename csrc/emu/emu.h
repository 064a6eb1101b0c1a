// CUDA-on-CPU emulator: lets a CUDA kernel source compile with the host C++ compiler and run on
// the CPU, for tests on machines without a GPU (DESIGN.md, "Testing CUDA without a GPU").
// Included by cuda/compat.cuh when the compiler is not nvcc; never includes a CUDA header.
//
//   types.h       keywords (__global__, __shared__ ...), dim3 and vector types, threadIdx & co
//   runtime.h     blocks, barriers, warps, fibers/threads, gk::emu::launch, dynamic_smem
//   async_copy.h  per-thread cp.async queue used by cuda/ptx.cuh
//   intrinsics.h  __syncthreads, warp shuffles/ballot, atomics, math intrinsics
//
// Modes (pick one per binary): default ucontext fibers; -DGK_EMU_BOOST_CONTEXT Boost.Context
// fibers (faster); -DGK_EMU_THREADS one OS thread per CUDA thread, for -fsanitize=thread.
// Deadlocks (a barrier or warp collective that not all threads reach) abort with a report
// naming the kernel and block. GK_EMU_STACK_KIB sets the fiber stack size (default 128).
#pragma once
#include "emu/types.h"
#include "emu/async_copy.h"
#include "emu/runtime.h"
#include "emu/intrinsics.h"
