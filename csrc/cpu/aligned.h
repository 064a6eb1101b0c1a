// std::vector storage aligned to whole cache lines, for scratch buffers that SIMD code loads and
// stores a vector at a time: with the default allocator (16-byte alignment) a 64-byte AVX-512
// access of such a buffer can straddle two cache lines on every access, depending on where malloc
// happened to put it.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace gk::cpu {

template <class T, std::size_t kAlign = 64>
struct AlignedAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, kAlign>;
  };
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, kAlign>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kAlign)); }
  template <class U>
  bool operator==(const AlignedAllocator<U, kAlign>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U, kAlign>&) const noexcept { return false; }
};

template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace gk::cpu
