// Declarations of the CPU kernels, once per compiled ISA level (see isa.h). Each kernel is
// defined in csrc/cpu/kernels/<name>.cpp, which CMake compiles once per level with that
// level's flags and GK_CPU_ISA_NS set to the level's namespace.
#pragma once
#include "core/merge_params.h"
#include "cpu/isa.h"

#define GK_DECLARE_CPU_KERNELS(ns)                                                    \
  namespace gk::cpu::ns {                                                             \
  template <class T> void merge_attention_states(const MergeStatesParams& p, int num_threads); \
  }
GK_CPU_FOR_EACH_ISA(GK_DECLARE_CPU_KERNELS)
#undef GK_DECLARE_CPU_KERNELS
