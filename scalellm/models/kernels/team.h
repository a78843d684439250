// The threads our kernels run on, on the engine's loop thread (the one that called set_size): that thread plus
// workers of our own, instead of OpenMP's parallel regions. Any other caller keeps OpenMP's threads (run()).
//
// Why not OpenMP: a serving process shares its cores with Triton's threads. When one of them preempts a worker,
// an OpenMP region cannot end until that worker has come back and reached the closing barrier, even when the
// caller has taken every piece of work itself (dynamic schedules): for the length of the preemption the engine
// stops. Here the caller returns as soon as every grab of work is done; a worker that had not joined the job by
// then never does. The caller waits only for a grab a worker is still computing.
//
// A job hands out [begin, end) ranges of 0..n in grabs of ``grain`` to whichever thread asks first: which thread
// computes a range never changes what is computed, so results stay the same bits.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace scalellm::team {

// Ranges of 0..n handed out ``grain`` at a time.
class Grabs {
 public:
  Grabs(int64_t n, int64_t grain) : n_(n), grain_(grain < 1 ? 1 : grain) {}
  bool next(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(grain_, std::memory_order_relaxed);
    end = begin + grain_ < n_ ? begin + grain_ : n_;
    return begin < n_;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_, grain_;
};

// Runs ``body`` on the caller and on up to size() - 1 workers that join in time; each takes work from the Grabs
// it shares. Returns when the caller's call has returned and no worker is inside ``body``. On a thread that
// never called set_size, ``body`` runs in an OpenMP parallel region instead, on torch's threads: where torch's
// ops run between our kernels on OpenMP's workers, those spin ~9 ms after each op, on the cores our workers
// would need.
void run(const std::function<void()>& body);

// How many threads a job of the calling thread runs on (itself included): set_size's, else omp_get_max_threads().
int64_t size();
// The calling thread's jobs on the team, ``threads`` threads, from now on (0: back to OpenMP's).
void set_size(int64_t threads);

// fn(i) for every i in 0..n, ``grain`` at a time, on the team.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  Grabs grabs(n, grain);
  run([&] {
    for (int64_t begin, end; grabs.next(begin, end);)
      for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// The workers' nice value (theirs, not the caller's), now and for those started later; returns how many were set.
int64_t set_nice(int64_t nice);

}  // namespace scalellm::team
