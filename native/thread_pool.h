// The process-wide thread pool (thread_pool.cpp) and the cancel scope of a native call.
// Included by the per-ISA kernels as well: like kernel_abi.h it holds no inline function.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace attn {

// Runs fn(ctx, i) for i in [0, n) on at most max_threads threads, the caller included; items
// are handed out dynamically in index order. A parallel_for made while a CancelScope is active
// on the calling thread stops handing out items once the scope's flag is non-zero (each thread
// finishes the item it is on) and then throws Cancelled; a flag already set when it starts
// throws at once.
void parallel_for(int64_t n, int max_threads, void (*fn)(void* ctx, int64_t item), void* ctx);

// Threads for calls with num_threads = 0: set_default_num_threads, else ATTN_NUM_THREADS,
// else the CPUs this process may run on.
int default_num_threads();
void set_default_num_threads(int n);
// Why ATTN_NUM_THREADS was ignored ("" when it is unset or valid), for the bindings to warn.
std::string num_threads_env_problem();

struct Cancelled : std::runtime_error {
  Cancelled();
};

// Binds a cancel flag (owned by the caller, alive for the scope) to this thread's
// parallel_for calls: a thread-local so every kernel and GEMM pass of one entry point sees it
// without threading it through each argument struct.
class CancelScope {
 public:
  explicit CancelScope(const std::atomic<int>* flag);
  ~CancelScope();
  CancelScope(const CancelScope&) = delete;
  CancelScope& operator=(const CancelScope&) = delete;

 private:
  const std::atomic<int>* previous_;
};

}  // namespace attn
