// Plain-data interface between the ISA-neutral code (checks, dispatch, thread pool, bindings)
// and the kernels in kernels/, which are compiled once per instruction set.
//
// This header must stay free of templates and inline functions: anything inline that both a
// baseline and an AVX TU instantiate could be merged by the linker into the AVX copy and then
// run on a CPU without AVX.
#pragma once

#include <cstdint>

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

// Pass 2 of attention_maps. `a` is a checked AttnArgs whose lse (B, Hq, Lq) pass 1 (the
// attention kernel) has filled in. Query row i falls in query bin (i+1)*Pq-1 / Lq (integer
// division; the bins of numpy's (arange(P+1)*L)//P edges), key j likewise; 1 <= Pq <= Lq,
// 1 <= Pk <= Lk. Outputs (all dense, zeroed by the caller where they are sums):
//   pooled  (B, Hq, Pq, Pk)  sum of the probabilities of each bin's cells (not yet divided)
//   entropy (B, Hq, Lq)      -sum_j p log p of each row (0 for a row with no allowed key)
//   top_idx, top_w (B, Hq, Lq, K)  the K largest probabilities of each row, largest first,
//                            ties by the smaller key index; -1 / 0 past the allowed keys
//   colsum  (B, Hq, Lk)      sum over query rows of the probabilities of each key
struct MapArgs {
  const AttnArgs* a;
  int64_t Pq, Pk, K;
  double* pooled;
  float* entropy;
  int64_t* top_idx;
  float* top_w;
  double* colsum;
};

// The entry points of one instruction set's build (kernels/table.cpp).
struct KernelTable {
  const char* name;
  void (*attention)(const AttnArgs&);
  void (*gemm)(const GemmArgs&);
  void (*maps)(const MapArgs&);
};

namespace isa_baseline {
extern const KernelTable table;
}
namespace isa_avx2 {
extern const KernelTable table;
}
namespace isa_avx512 {
extern const KernelTable table;
}

}  // namespace attn
