// Per-thread queue of in-flight cp.async copies, for the emulation in cuda/ptx.cuh.
//
// A copy is not performed when it is issued: it waits in its thread's queue until a
// cp.async.wait_group retires its group (or the thread exits). A kernel that reads shared memory
// before waiting therefore reads stale data in the emulator, as it may on hardware; performing
// copies eagerly would hide exactly that class of bug.
#pragma once
#include <cstddef>
#include <cstring>
#include <deque>

namespace gk::emu {

class AsyncCopyQueue {
 public:
  // Queues a copy of `bytes` bytes; `zero_fill` writes zeros instead of reading `src`.
  void issue(void* dst, const void* src, size_t bytes, bool zero_fill) {
    pending_.push_back(Copy{dst, src, bytes, zero_fill});
  }
  // cp.async.commit_group: the copies issued since the last commit form one group (possibly empty).
  void commit() { group_sizes_.push_back(pending_.size() - committed_copies_); committed_copies_ = pending_.size(); }
  // cp.async.wait_group N: completes every committed group except the newest `newest_to_keep`.
  // Copies issued after the last commit are not part of any group and stay in flight.
  void wait(size_t newest_to_keep) {
    while (group_sizes_.size() > newest_to_keep) {
      for (size_t i = group_sizes_.front(); i > 0; --i) perform_front();
      group_sizes_.pop_front();
    }
  }
  // At thread exit every copy lands, committed or not.
  void complete_all() {
    while (!pending_.empty()) perform_front();
    group_sizes_.clear();
    committed_copies_ = 0;
  }
  void clear() { pending_.clear(); group_sizes_.clear(); committed_copies_ = 0; }
  size_t in_flight() const { return pending_.size(); }

 private:
  struct Copy { void* dst; const void* src; size_t bytes; bool zero_fill; };
  void perform_front() {
    const Copy c = pending_.front();
    pending_.pop_front();
    if (committed_copies_ > 0) --committed_copies_;
    if (c.zero_fill) std::memset(c.dst, 0, c.bytes);
    else std::memcpy(c.dst, c.src, c.bytes);
  }
  std::deque<Copy> pending_;
  std::deque<size_t> group_sizes_;  // oldest group first
  size_t committed_copies_ = 0;     // how many of `pending_` (from the front) belong to groups
};

}  // namespace gk::emu
