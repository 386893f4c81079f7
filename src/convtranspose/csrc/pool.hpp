// Worker threads for batches of kernel calls, without Python in the loop.
//
// Why not Python's thread pool: a pool worker that wakes (a futex, ~0.1 ms on a virtual
// machine whose idle core has halted) then needs the GIL, which the caller holds while it
// builds the call, and every hand-over of the GIL is another sleep and wake. Measured on
// W5 (2 threads): the second thread started its kernel 0.1-0.35 ms after the first, and
// the call returned 0.1 ms after both kernels had finished. These threads never take the
// GIL: they run the batch's kernel calls and nothing else, and they can be asked to spin
// (`warm`) while the caller is still in Python, so that they start at once.
//
// Work sharing mirrors run_jobs in _execute.py: tasks are taken in order; a thread that
// finds none left joins a shared task still running (its calls divide their rows through
// the kernel's cursors), so that the batch ends with every thread busy. Unlike run_jobs,
// a thread about to start a task first joins any running one that writes the same output
// rows (Task::rows, `join_same_rows`). Which thread runs
// what changes no bit of any result: tasks write disjoint outputs, or are one thread's
// sequence of calls in a fixed order.
//
// Stopping early (Ctrl-C): every thread in a batch has `ct_stop` (correlate_api.h) set:
// the caller's is module.cpp's, which looks for a signal and then raises the batch's flag;
// the helpers' reads that flag. It is asked before each task, between a task's calls and
// between the kernel's runs of rows; a batch that stops leaves its output half-written.
// The helpers block every signal, so that a signal is delivered to a Python thread.
#pragma once

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "correlate_api.h"

namespace pool {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Until pred() holds: spin for a few microseconds (a wait inside a batch is short: a
// sharer finishing its last rows), then yield the core, then sleep in short naps so that
// a long wait does not hold a core a shared machine needs.
template <typename Pred>
inline void wait_until(Pred&& pred) {
  const int64_t start = now_ns();
  for (int64_t spins = 0; !pred(); ++spins) {
    if ((spins & 63) != 0) {
      cpu_relax();
      continue;
    }
    const int64_t waited = now_ns() - start;
    if (waited < 20000) continue;
    if (waited < 1000000) {
      sched_yield();
      continue;
    }
    const timespec nap{0, 50000};
    nanosleep(&nap, nullptr);
  }
}

// Whether this thread's batch is to stop (see the top of this file).
inline bool stopping() {
  CtStop* s = ct_stop;
  return s && s->stop(s);
}

// A helper's stop: the batch's flag, which the caller raises.
struct FlagStop : CtStop {
  explicit FlagStop(const std::atomic<int>* f) : flag(f) {
    stop = [](CtStop* s) {
      return static_cast<FlagStop*>(s)->flag->load(std::memory_order_relaxed) != 0;
    };
  }
  const std::atomic<int>* flag;
};

// Calls that run once, before any task that needs them (a weight's packing, which the
// tasks then read): the first thread to need them runs them; the others wait.
struct Once {
  std::atomic<int> state{0};  // 0: not started, 1: running, 2: done
  std::function<void()> body;

  void ensure() {
    int expected = 0;
    if (state.load(std::memory_order_acquire) == 0 &&
        state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      body();
      state.store(2, std::memory_order_release);
      return;
    }
    wait_until([&] { return state.load(std::memory_order_acquire) == 2; });
  }
};

struct Task {
  std::function<void()> body;
  bool shared;   // every thread may run it: its calls share their rows through cursors
  Once* once;    // run before the body, or null
  int64_t rows;  // -1; else tasks of equal `rows` write the same output rows (join_same_rows)
};

struct Batch {
  Batch(std::vector<Task> t, const std::atomic<int>* s)
      : tasks(std::move(t)),
        open(new std::atomic<int>[tasks.size()]),
        running(new std::atomic<int>[tasks.size()]),
        stop(s) {
    for (size_t i = 0; i < tasks.size(); ++i) {
      open[i].store(tasks[i].shared ? 1 : 0, std::memory_order_relaxed);
      running[i].store(0, std::memory_order_relaxed);
    }
  }
  std::vector<Task> tasks;
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int>[]> open;  // a shared task not yet returned from
  std::unique_ptr<std::atomic<int>[]> running;  // a task some thread has begun
  int seats = 0;                              // helpers that may still join (under the lock)
  std::atomic<int> inside{0};                 // helpers that joined and have not left
  const std::atomic<int>* stop;               // raised by the caller: take no more work
};

inline void run_task(const Task& t) {
  if (t.once) t.once->ensure();
  t.body();
}

// Before task i: join any shared task still open that writes the same output rows (a
// stride's phases of one output row interleave their pixels along W). Two threads writing
// them at once sent the lines where the phases meet back and forth between the cores:
// 8 -> 117 k3 s2 ran no faster on two threads than on one. Run one at a time, they share
// the rows of each.
inline void join_same_rows(Batch& b, int64_t i) {
  const int64_t rows = b.tasks[i].rows;
  if (rows < 0) return;
  for (int64_t j = std::max<int64_t>(0, i - 64); j < i; ++j)  // a tile's phases: at most 64
    if (b.tasks[j].rows == rows && b.running[j].load(std::memory_order_acquire) &&
        b.open[j].load(std::memory_order_acquire)) {
      run_task(b.tasks[j]);
      b.open[j].store(0, std::memory_order_release);
    }
}

// Take tasks until none is left, then join shared ones still open (or until the batch
// stops).
inline void participate(Batch& b) {
  const int64_t n = static_cast<int64_t>(b.tasks.size());
  for (;;) {
    if (stopping()) return;
    const int64_t i = b.next.fetch_add(1, std::memory_order_acq_rel);
    if (i < n) {
      const Task& t = b.tasks[i];
      if (t.shared) join_same_rows(b, i);
      b.running[i].store(1, std::memory_order_release);
      run_task(t);
      if (t.shared) b.open[i].store(0, std::memory_order_release);  // all its rows taken
      continue;
    }
    int64_t j = 0;  // every task is taken: join the first shared one still running
    while (j < n && !b.open[j].load(std::memory_order_acquire)) ++j;
    if (j == n) return;
    run_task(b.tasks[j]);
    b.open[j].store(0, std::memory_order_release);
  }
}

class Pool {
 public:
  // Start helpers up to `helpers` and keep them spinning (not asleep) for `spin_ns`: the
  // caller is about to hand them a batch.
  void warm(int helpers, int64_t spin_ns) {
    std::lock_guard<std::mutex> lock(mutex_);
    grow(helpers);
    const int64_t until = now_ns() + spin_ns;
    if (until > spin_until_.load(std::memory_order_relaxed))
      spin_until_.store(until, std::memory_order_relaxed);
    wake_.notify_all();
  }

  // Run every task on the caller and up to `helpers` pool threads; returns once all are
  // done, or once the caller's `ct_stop` has raised `stop` and every helper has left.
  // Another batch already running (a second caller thread): this one runs on its caller
  // alone.
  void run(std::vector<Task> tasks, int helpers, const std::atomic<int>* stop) {
    const int64_t started = now_ns();
    Batch batch(std::move(tasks), stop);
    std::unique_lock<std::mutex> turn(turn_, std::try_to_lock);
    if (!turn.owns_lock()) helpers = 0;
    if (helpers > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      batch.seats = grow(helpers);
      batch_ = &batch;
      generation_.fetch_add(1, std::memory_order_release);
      wake_.notify_all();
    }
    participate(batch);
    if (helpers > 0) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        batch_ = nullptr;  // no one joins from here on
        // A grace: a call that follows soon finds the helpers still awake. Waking a helper
        // that sleeps costs the waker 13-27 us here (its core has halted), a tenth of W6's
        // 0.2 ms of Python between two backward calls. A quarter of the batch's time
        // (50 us to 1 ms) bounds the spinning to a quarter of the work's own. In a stream
        // of batches (this one began within STREAM_NS of the last one's end) it is
        // STREAM_NS: after the machine has idled a while, a halted core wakes slowly (a
        // virtual machine's idle polling has shrunk). A 1 ms backward call in bursts after
        // 0.3 s idle: 2.8 ms a call, against 1.0 without the idle; 2.7 with the yield in
        // the helpers' spin alone, 1.2 with it and this grace. A stream's end costs one
        // STREAM_NS of spinning.
        const int64_t now = now_ns();
        const int64_t gap = started - last_end_;
        int64_t grace = std::min<int64_t>(1000000, std::max<int64_t>(50000, (now - started) / 4));
        if (gap >= 0 && gap < STREAM_NS) grace = STREAM_NS;
        last_end_ = now;
        const bool stopped = stop && stop->load(std::memory_order_relaxed);
        spin_until_.store(stopped ? 0 : now + grace, std::memory_order_relaxed);
      }
      wait_until([&] { return batch.inside.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  // Start helpers up to `helpers` (under mutex_); returns how many there are. A thread the
  // system refuses (a process at its limit) leaves the batch to fewer helpers. They start
  // with every signal blocked (a thread inherits its creator's mask).
  int grow(int helpers) {
    if (workers_ >= helpers) return helpers;
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);
    try {
      for (; workers_ < helpers; ++workers_) std::thread([this] { work(); }).detach();
    } catch (const std::system_error&) {
    }
    pthread_sigmask(SIG_SETMASK, &before, nullptr);
    return std::min(workers_, helpers);
  }

  void work() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      for (;;) {  // until a new batch: spin while asked to, else sleep
        if (generation_.load(std::memory_order_acquire) != seen) break;
        if (now_ns() < spin_until_.load(std::memory_order_relaxed)) {
          for (int k = 0; k < 32; ++k) cpu_relax();
          // After an idle spell the system may wake a helper on its caller's core (the
          // other one halted): spinning there, it took half the caller's time for a whole
          // burst of calls (a 1 ms backward call at 2.8 ms). Yielding lets the caller run.
          sched_yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          return generation_.load(std::memory_order_acquire) != seen ||
                 now_ns() < spin_until_.load(std::memory_order_relaxed);
        });
      }
      Batch* batch = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        if (batch_ && batch_->seats > 0) {
          --batch_->seats;
          batch_->inside.fetch_add(1, std::memory_order_acq_rel);
          batch = batch_;
        }
      }
      if (batch) {
        FlagStop stop(batch->stop);
        ct_stop = batch->stop ? &stop : nullptr;
        participate(*batch);
        ct_stop = nullptr;
        batch->inside.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex turn_;   // one batch at a time uses the helpers
  std::mutex mutex_;  // guards batch_, workers_, and the sleep/wake of helpers
  std::condition_variable wake_;
  Batch* batch_ = nullptr;
  int workers_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> spin_until_{0};
  int64_t last_end_ = 0;  // when the last batch with helpers ended (under mutex_)
  static constexpr int64_t STREAM_NS = 3000000;
};

// The process's pool. A forked child has none of its parent's threads (and its locks may
// have been held at the fork): it starts a new pool, leaving the old one unused.
inline Pool*& instance() {
  static Pool* p = [] {
    pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); });
    return new Pool();
  }();
  return p;
}

}  // namespace pool
