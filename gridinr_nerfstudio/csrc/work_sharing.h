// Parallel loops for our CPU kernels that never wait for a thread that has not started (when torch's ops run on
// fewer threads than ours).
//
// Why not always OpenMP: an `omp parallel` region ends with a barrier that waits for every thread of the team,
// also one that has not even been scheduled yet. On a machine with other work, a team thread often sits behind a
// busy process for a whole time slice, and the region then takes as long as that slice while the calling thread
// spins in the barrier. So when torch's intra-op count is below `threads` (thread_policy.py runs torch's ops on
// one thread and our kernels on all when the machine is busy), the calling thread claims items and helpers from
// torch's inter-op pool (which wait passively on a condition variable) claim items when they get to run. The call
// returns once every item is done: an item is only waited for once a thread has claimed it, so a helper that
// starts late finds nothing left and returns at once. When torch's own OpenMP team is as large as `threads`, its
// threads are awake anyway and the items go to them. Either way items are claimed one at a time (a dynamic
// schedule: a thread that runs slowly does fewer), and which thread runs an item never changes its result:
// callers make each item's output independent of the others (see hash_grid.cpp). Bodies must not throw.
//
// Usage: parallel_items(n, threads, [&] { return Scratch(...); }, [&](int64_t item, Scratch& scratch) { ... });
// make_scratch runs once per participating thread, before its first item.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

namespace gridinr {

struct WorkSharingState {
  explicit WorkSharingState(int64_t total) : total(total) {}
  const int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
  const void* job = nullptr;  // the caller's job; only read by a thread holding a claimed item
};

// Claims and runs items until none is left. A helper dereferences `state->job` only while it holds an unfinished
// item, i.e. while the caller still waits in parallel_items, so the job it points to is alive.
template <typename Job>
void work_on(WorkSharingState& state) {
  int64_t item = state.next.fetch_add(1, std::memory_order_relaxed);
  if (item >= state.total) return;
  const Job& job = *static_cast<const Job*>(state.job);
  auto scratch = job.make_scratch();
  while (true) {
    job.body(item, scratch);
    const int64_t next = state.next.fetch_add(1, std::memory_order_relaxed);  // claim before releasing the job
    if (state.done.fetch_add(1, std::memory_order_acq_rel) + 1 == state.total) {
      std::lock_guard<std::mutex> lock(state.mutex);
      state.finished.notify_all();
    }
    if (next >= state.total) return;
    item = next;
  }
}

template <typename MakeScratch, typename Body>
struct WorkSharingJob {
  const MakeScratch& make_scratch;
  const Body& body;
};

// Runs body(item, scratch) for item in [0, n) on up to `threads` threads (the caller's included); returns when all
// are done. threads <= 1 or n <= 1 runs them in order on the calling thread.
template <typename MakeScratch, typename Body>
void parallel_items(int64_t n, int64_t threads, const MakeScratch& make_scratch, const Body& body) {
  if (n <= 0) return;
  threads = std::min<int64_t>(threads, n);
  if (threads <= 1) {
    auto scratch = make_scratch();
    for (int64_t item = 0; item < n; ++item) body(item, scratch);
    return;
  }
  if (at::get_num_threads() >= threads) {
    // torch's own OpenMP team is this large: its threads are awake (they spin between torch's ops), and helpers
    // from another pool would only compete with them for the cores. Items are still claimed one at a time.
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    {
      auto scratch = make_scratch();
      for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(item, scratch);
    }
    return;
  }
  using Job = WorkSharingJob<MakeScratch, Body>;
  const Job job{make_scratch, body};
  auto state = std::make_shared<WorkSharingState>(n);
  state->job = &job;
  for (int64_t t = 1; t < threads; ++t) {
    at::launch([state] { work_on<Job>(*state); });
  }
  work_on<Job>(*state);
  if (state->done.load(std::memory_order_acquire) < n) {
    std::unique_lock<std::mutex> lock(state->mutex);
    state->finished.wait(lock, [&] { return state->done.load(std::memory_order_acquire) == n; });
  }
}

}  // namespace gridinr

namespace gridinr {

// For tests: occupy `count` threads of torch's inter-op pool until release_helpers(), so that a kernel's helpers
// cannot start; the kernel must still finish (its caller claims every item).
inline std::atomic<bool>& helpers_released() {
  static std::atomic<bool> released{false};
  return released;
}

inline void occupy_helpers(int64_t count) {
  helpers_released().store(false);
  for (int64_t i = 0; i < count; ++i) {
    at::launch([] {
      while (!helpers_released().load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
  }
}

inline void release_helpers() { helpers_released().store(true); }

}  // namespace gridinr
