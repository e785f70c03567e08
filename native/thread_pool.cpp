// One process-wide pool shared by every call. Compute happens only while holding one of
// `slots_` tokens (the pool's size: max(hardware threads, largest thread count asked for)), so
// concurrent calls from several Python threads share the cores instead of oversubscribing them:
// a caller takes a slot and works on its own job; idle workers take free slots and help
// whichever queued job still has items and room (a job runs on at most max_threads threads).
// Items are handed out one at a time through an atomic counter (dynamic balancing).
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "thread_pool.h"

namespace attn {
namespace {

constexpr int kMaxThreads = 256;

// CPUs this process may run on (honours taskset / cpusets), else the hardware count.
int hardware_threads() {
  cpu_set_t set;
  int n = 0;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = int(std::thread::hardware_concurrency());
  return n <= 0 ? 1 : std::min(n, kMaxThreads);
}

// ATTN_NUM_THREADS, parsed once: the thread count (0 when unset or invalid) and, when it is
// invalid, why (the bindings turn that into a warning at import).
struct EnvThreads {
  int n = 0;
  std::string problem;
};

const EnvThreads& env_threads_setting() {
  static const EnvThreads parsed = [] {
    EnvThreads e;
    const char* s = std::getenv("ATTN_NUM_THREADS");
    if (s == nullptr || *s == '\0') return e;
    char* end = nullptr;
    const long n = std::strtol(s, &end, 10);
    if (*end != '\0' || n < 1)
      e.problem = std::string("ATTN_NUM_THREADS ignored: expected an integer >= 1, got '") + s +
                  "'";
    else
      e.n = int(std::min<long>(n, kMaxThreads));
    return e;
  }();
  return parsed;
}

int env_threads() { return env_threads_setting().n; }

struct Job {
  void (*fn)(void*, int64_t);
  void* ctx;
  int64_t n;
  int max_threads;
  std::atomic<int64_t> next{0};
  const std::atomic<int>* cancel = nullptr;  // optional; checked before each item
  std::atomic<bool> cancelled{false};
  int active = 0;  // threads working on it; guarded by the pool mutex
  std::mutex err_mu;
  std::exception_ptr error;

  void work() {
    for (;;) {
      if (cancel != nullptr && cancel->load(std::memory_order_relaxed) != 0) {
        cancelled.store(true, std::memory_order_relaxed);
        next.store(n, std::memory_order_relaxed);  // stop handing out items
        return;
      }
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        fn(ctx, i);
      } catch (...) {
        std::lock_guard<std::mutex> g(err_mu);
        if (!error) error = std::current_exception();
        next.store(n, std::memory_order_relaxed);  // stop handing out items
      }
    }
  }
  bool has_room() const { return next.load(std::memory_order_relaxed) < n && active < max_threads; }
};

class Pool {
 public:
  Pool() : slots_(std::max(hardware_threads(), env_threads())), free_slots_(slots_) {}

  void run(int64_t n, int max_threads, void (*fn)(void*, int64_t), void* ctx,
           const std::atomic<int>* cancel) {
    Job job;
    job.cancel = cancel;
    job.fn = fn;
    job.ctx = ctx;
    job.n = n;
    job.max_threads = int(std::max<int64_t>(1, std::min<int64_t>(max_threads, n)));
    std::unique_lock<std::mutex> lk(mu_);
    grow_locked(job.max_threads);
    jobs_.push_back(&job);
    if (job.max_threads > 1) cv_.notify_all();
    for (;;) {
      if (free_slots_ > 0 && job.has_room()) {
        --free_slots_;
        ++job.active;
        lk.unlock();
        job.work();
        lk.lock();
        --job.active;
        ++free_slots_;
        cv_.notify_all();
        continue;
      }
      if (job.next.load(std::memory_order_relaxed) >= n && job.active == 0) break;
      cv_.wait(lk);
    }
    jobs_.erase(std::find(jobs_.begin(), jobs_.end(), &job));
    lk.unlock();
    if (job.error) std::rethrow_exception(job.error);
    if (job.cancelled.load(std::memory_order_relaxed)) throw Cancelled();
  }

  void reserve(int threads) {
    std::lock_guard<std::mutex> g(mu_);
    grow_locked(threads);
  }

 private:
  // Makes room for `threads` concurrent threads: slots, and workers to fill them (the caller
  // is one of the threads, so a pool of S slots has S - 1 workers).
  void grow_locked(int threads) {
    threads = std::min(threads, kMaxThreads);
    if (threads > slots_) {
      free_slots_ += threads - slots_;
      slots_ = threads;
    }
    while (int(workers_) < threads - 1) {
      std::thread(&Pool::worker, this).detach();  // the pool lives for the whole process
      ++workers_;
    }
  }

  void worker() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      Job* job = nullptr;
      if (free_slots_ > 0)
        for (Job* j : jobs_)
          if (j->has_room()) {
            job = j;
            break;
          }
      if (job == nullptr) {
        cv_.wait(lk);
        continue;
      }
      --free_slots_;
      ++job->active;
      lk.unlock();
      job->work();
      lk.lock();
      --job->active;
      ++free_slots_;
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> jobs_;
  int slots_;
  int free_slots_;
  int workers_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};
thread_local const std::atomic<int>* t_cancel = nullptr;  // see CancelScope
std::atomic<int> g_default_threads{0};
std::once_flag g_atfork_once;

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();  // never deleted: detached workers use it until process exit
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel))
      p = fresh;
    else
      delete fresh;
  }
  std::call_once(g_atfork_once, [] {
    // A forked child has none of the parent's workers and maybe a locked mutex: give it a
    // fresh pool (the old one is leaked on purpose).
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int max_threads, void (*fn)(void*, int64_t), void* ctx) {
  if (n <= 0) return;
  if (t_cancel != nullptr && t_cancel->load(std::memory_order_relaxed) != 0) throw Cancelled();
  if (max_threads <= 0) max_threads = default_num_threads();
  pool().run(n, max_threads, fn, ctx, t_cancel);
}

Cancelled::Cancelled() : std::runtime_error("native call cancelled") {}

std::string num_threads_env_problem() { return env_threads_setting().problem; }

CancelScope::CancelScope(const std::atomic<int>* flag) : previous_(t_cancel) { t_cancel = flag; }
CancelScope::~CancelScope() { t_cancel = previous_; }

int default_num_threads() {
  int n = g_default_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  n = env_threads();
  if (n == 0) n = hardware_threads();
  g_default_threads.store(n, std::memory_order_relaxed);
  return n;
}

void set_default_num_threads(int n) {
  n = std::max(1, std::min(n, kMaxThreads));
  g_default_threads.store(n, std::memory_order_relaxed);
  pool().reserve(n);
}

}  // namespace attn
