// Plain-data interface between the ISA-neutral code (checks, dispatch, thread pool, bindings)
// and the kernel translation unit, which is compiled once per instruction set.
//
// This header must stay free of templates and inline functions: anything inline that both a
// baseline and an AVX TU instantiate could be merged by the linker into the AVX copy and then
// run on a CPU without AVX.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>

namespace attn {

// Everything the attention core needs. Strides are in elements; the last axis of q, k, v and
// out is contiguous. lse is dense (B, Hq, Lq); weights is dense (B, Hq, Lq, Lk) or null.
struct AttnArgs {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  const float* q;
  int64_t sq[3];  // batch, head, row
  const float* k;
  int64_t sk[3];
  const float* v;
  int64_t sv[3];
  float* out;
  int64_t so[3];
  float* lse;
  float* weights;

  float scale;
  int causal;  // 0 none, 1 top-left (j <= i), 2 bottom-right (j <= i + Lk - Lq)
  const uint8_t* bool_mask;  // (B, Hq, Lq, Lk) through mask_strides, or null
  const float* float_mask;   // idem, or null
  int64_t mask_strides[4];
  const int64_t* key_lengths;  // (B,) or null
  int64_t window_left, window_right, dilation;  // -1 = unbounded; dilation >= 1
  const int64_t* global_tokens;                 // sorted unique key positions, or null
  int64_t n_global;
  const float* alibi;  // (Hq,) or null
  float softcap;       // 0 = off
  int num_threads;
};

// Y[m][n] = sum_k X[m][k] * W[n][k] + bias[n]  (x @ W.T + b, torch Linear layout).
// Row m of X is x + (m / rows_per_batch) * sx_batch + (m % rows_per_batch) * sx_row, its
// k axis contiguous. W may have any strides. Y rows are dense with leading dimension ldy.
struct GemmArgs {
  int64_t M, N, K;
  const float* x;
  int64_t rows_per_batch, sx_batch, sx_row;
  const float* w;
  int64_t sw_n, sw_k;
  const float* bias;  // or null
  int64_t sbias;
  float* y;
  int64_t ldy;
  int num_threads;
};

struct KernelTable {
  const char* name;
  void (*attention)(const AttnArgs&);
  void (*gemm)(const GemmArgs&);
};

// One table per ISA translation unit (defined in kernel.cpp under a per-ISA namespace).
namespace isa_baseline {
extern const KernelTable table;
}
namespace isa_avx2 {
extern const KernelTable table;
}
namespace isa_avx512 {
extern const KernelTable table;
}

// Thread pool (thread_pool.cpp): runs fn(ctx, i) for i in [0, n) on at most max_threads
// threads, the caller included; items are handed out dynamically in index order.
// A parallel_for made while a CancelScope is active on the calling thread stops handing out
// items once the scope's flag is non-zero (each thread finishes the item it is on) and then
// throws Cancelled; a flag already set when it starts throws at once.
void parallel_for(int64_t n, int max_threads, void (*fn)(void* ctx, int64_t item), void* ctx);
int default_num_threads();
void set_default_num_threads(int n);

struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("native call cancelled") {}
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
