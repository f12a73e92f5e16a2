// Work split over XLA's CPU intra-op threads from inside an FFI handler (segjax's kernels).

#ifndef SEGJAX_KERNELS_PARTS_H_
#define SEGJAX_KERNELS_PARTS_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

extern "C" int omp_get_max_threads(void);
extern "C" void omp_set_num_threads(int);

namespace segjax {

// OpenMP, so oneDNN, on one thread for this thread's calls while in scope.
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// Runs part(0) .. part(n - 1), single-threaded each, on this thread and n - 1 pool tasks: each
// takes the next part not yet taken, so the call ends even when the pool's threads are busy.
// Returns the first error's text (a part's exception), empty when none.
inline std::string ForEachPart(xla::ffi::ThreadPool& pool, int64_t n,
                               const std::function<void(int64_t)>& part) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable all_done;
    int64_t done = 0;
    std::string error;
  };
  auto state = std::make_shared<State>();
  // A task that starts after the call returned finds no part left and never touches `part`.
  auto take_parts = [state, &part, n] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      std::string error;
      try {
        SingleThreaded single_threaded;
        part(i);
      } catch (const std::exception& e) {
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->error.empty()) state->error = error;
      if (++state->done == n) state->all_done.notify_all();
    }
  };
  for (int64_t i = 1; i < n; ++i) pool.Schedule(std::function<void()>(take_parts));
  take_parts();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == n; });
  return state->error;
}

}  // namespace segjax

#endif  // SEGJAX_KERNELS_PARTS_H_
