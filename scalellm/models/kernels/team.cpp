// team.h's workers. A worker spins a while after each job (the next kernel of a step follows within microseconds),
// then sleeps on a futex; a job wakes sleepers but never waits for them. The caller, done with its own grabs,
// spins briefly for a grab a worker is still computing, then sleeps too, so that Linux can move that worker,
// preempted on its own core, onto the caller's.
#include "team.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

namespace scalellm::team {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kWorkerSpin = std::chrono::microseconds(300);  // covers the Python between a step's kernels
constexpr auto kCallerSpin = std::chrono::microseconds(30);   // about one grab

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

// Spins until pred() or ``limit`` has passed; whether pred() held.
template <typename Pred>
bool spin(Pred&& pred, Clock::duration limit) {
  const auto until = Clock::now() + limit;
  for (int i = 1;; ++i) {
    if (pred()) return true;
    _mm_pause();
    if (i % 64 == 0 && Clock::now() > until) return pred();
  }
}

struct Team {
  std::atomic<uint32_t> epoch{0};   // odd while a job is open; the futex idle workers sleep on
  std::atomic<uint32_t> inside{0};  // workers inside the open job's body; the futex the caller sleeps on
  std::atomic<uint32_t> sleepers{0};
  std::atomic<bool> caller_asleep{false};
  const std::function<void()>* body = nullptr;  // the open job's; valid while epoch is odd or inside > 0
  int64_t joiners = 0;                          // workers 0..joiners-1 may join the open job

  std::mutex run_lock;    // one job at a time: a second caller meanwhile (another engine) runs its job alone
  std::mutex start_lock;  // starting workers, their nice
  std::vector<std::thread> workers;
  std::vector<pid_t> tids;
  int64_t nice = 0;

  void work(int64_t index, std::promise<pid_t> tid) {
    tid.set_value(static_cast<pid_t>(syscall(SYS_gettid)));
    uint32_t seen = epoch.load();
    for (;;) {
      if (!spin([&] { return epoch.load(std::memory_order_acquire) != seen; }, kWorkerSpin)) {
        sleepers.fetch_add(1);
        futex_wait(epoch, seen);  // returns at once if the epoch has moved on
        sleepers.fetch_sub(1);
        continue;
      }
      const uint32_t now = epoch.load();
      seen = now;
      if (!(now & 1) || index >= joiners) continue;  // closed before we looked, or not in this team
      inside.fetch_add(1);
      if (epoch.load() == now) (*body)();  // still open: the caller waits for us from here on
      inside.fetch_sub(1);
      if (caller_asleep.load()) futex_wake(inside);
    }
  }

  void ensure_workers(int64_t count) {
    std::lock_guard<std::mutex> hold(start_lock);
    while (static_cast<int64_t>(workers.size()) < count) {
      std::promise<pid_t> started;
      std::future<pid_t> tid = started.get_future();
      workers.emplace_back(&Team::work, this, static_cast<int64_t>(workers.size()), std::move(started));
      pthread_setname_np(workers.back().native_handle(), "scalellm-team");
      workers.back().detach();  // they live as long as the process
      tids.push_back(tid.get());
      if (nice) setpriority(PRIO_PROCESS, static_cast<id_t>(tids.back()), static_cast<int>(nice));
    }
  }

  void run(const std::function<void()>& job) {
    const int64_t helpers = size() - 1;
    std::unique_lock<std::mutex> mine(run_lock, std::try_to_lock);
    if (helpers < 1 || !mine.owns_lock()) {
      job();
      return;
    }
    ensure_workers(helpers);
    body = &job;
    joiners = helpers;
    epoch.fetch_add(1);  // open
    if (sleepers.load()) futex_wake(epoch);
    job();
    epoch.fetch_add(1);  // closed: no worker joins from here on
    if (!spin([&] { return inside.load() == 0; }, kCallerSpin)) {
      caller_asleep.store(true);
      for (uint32_t left; (left = inside.load()) != 0;) futex_wait(inside, left);
      caller_asleep.store(false);
    }
  }
};

thread_local int64_t team_size = 0;

Team& the_team() {
  static Team* team = new Team();  // never destroyed: detached workers may outlive static destructors
  return *team;
}

}  // namespace

void run(const std::function<void()>& body) {
  if (team_size == 0) {  // a thread that never took its threads (set_size): OpenMP's, beside torch's own ops
#pragma omp parallel
    body();
    return;
  }
  the_team().run(body);
}

int64_t size() { return team_size > 0 ? team_size : omp_get_max_threads(); }

void set_size(int64_t threads) { team_size = threads; }

int64_t set_nice(int64_t nice) {
  Team& team = the_team();
  std::lock_guard<std::mutex> hold(team.start_lock);
  team.nice = nice;
  int64_t done = 0;
  for (pid_t tid : team.tids) done += setpriority(PRIO_PROCESS, static_cast<id_t>(tid), static_cast<int>(nice)) == 0;
  return done;
}

}  // namespace scalellm::team
