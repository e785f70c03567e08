// Plain-data interface between the ISA-neutral code (checks, dispatch, thread pool, bindings)
// and the kernels in kernels/, which are compiled once per instruction set.
//
// This header must stay free of templates and inline functions: anything inline that both a
// baseline and an AVX TU instantiate could be merged by the linker into the AVX copy and then
// run on a CPU without AVX.
#pragma once

#include <cstdint>

namespace attn {

// ---------------------------------------------------------------------------------------------
// Masking: the rule (MaskRule, MaskDoc; applied by mask_rule.h) and the plan built from it
// (MaskPlan; built by masking.cpp). Every pattern is a producer of these; the attention and
// maps kernels are their consumers.

// One document: query rows [qs, qe) see keys [ks, kend) only, plus the extra keys [xs, xe)
// (empty unless xs < xe). Without packed sequences each batch is one document (qs = ks = 0,
// qe = Lq, kend = key_lengths[b]; without key_lengths, one document with kend = Lk serves every
// batch). Under recurrent memory each segment is a document: rows [s*S, (s+1)*S) see keys from
// its raw memory's start max(0, s*S - M) to the segment's end, and its compressed memory slots
// as extra keys, which sit after the L raw keys on the key axis and are seen whole (no
// causality, no window). Row i's aligned key position is c = i + shift (bottom-right alignment:
// the window, ALiBi and bottom-right causality are measured from it); causality allows
// j <= i + coff.
struct MaskDoc {
  int64_t qs, qe, ks, kend;
  int64_t shift, coff;
  int64_t xs, xe;
};

// Everything "may query i see key j" depends on, checked.
struct MaskRule {
  int causal;  // 0 none, 1 top-left, 2 bottom-right (coff of each document)
  bool window;
  int64_t wl, wr;          // window sides in keys (window_left * dilation; -1 unbounded),
  int64_t dil;             // clamped to Lq + Lk + 1, beyond which they change nothing
  const int64_t* globals;  // sorted global key positions: null unless a window is active
  int64_t n_globals;
  const uint8_t* bool_mask;  // (B, Hq, Lq, Lk) through mask_strides (elements), or null
  int64_t mask_strides[4];
  const uint8_t* layout;  // block layout (B, Hq, ceil(Lq/bq), ceil(Lk/bk)), broadcast by
  int64_t layout_strides[4];  // zero strides, or null
  int64_t bq, bk;
  const MaskDoc* docs;  // per batch (or shared) n_segments each, or (packed: B = 1) one per
  int64_t n_docs;       // document
  int64_t n_segments;   // documents per batch: the segments of recurrent memory, else 1
  bool packed;
};

// Query rows the kernels process together, one SIMD lane each: rows i0 + l * rstride for l in
// [0, n), or (rstride 0) the sorted rows plan.rows[i0 .. i0 + n). All in one document.
// global_rows: rows aligned to a global token, which ignore the window; such a group follows
// the group holding the same rows (computed there with the window) and overrides its results.
struct PlanGroup {
  int64_t b, doc, i0;
  int32_t n, rstride;
  int32_t global_rows;
};

// Parts of the element rule a span needs (0: a full span, every key allowed for every row).
enum : uint32_t {
  kCheckRange = 1,   // document, causality, window bounds and dilation cut some (row, key)
  kCheckMask = 2,    // the boolean mask
  kCheckLayout = 4,  // the block layout differs between the group's rows or keys
  kGlobalsElsewhere = 8,  // global keys here are visited by the group's global span: skip them
};

// Keys a group visits: j0 + m * kstride for m in [0, n), or (kstride 0) the global tokens
// rule.globals[j0 .. j0 + n). A group's spans never share a key.
struct PlanSpan {
  int64_t j0;
  int32_t n, kstride;
  uint32_t checks;
};

// One thread's unit of work (times the heads): groups [g0, g1), run in order.
struct PlanItem {
  int64_t g0, g1;
};

// The spans of group g for head h are spans[span_ptr[hp * n_groups + g] ..
// span_ptr[hp * n_groups + g + 1]) with hp = h when the plan depends on the head
// (n_heads == Hq), else 0. Items are ordered by decreasing work.
struct MaskPlan {
  const PlanGroup* groups;
  int64_t n_groups;
  const PlanItem* items;
  int64_t n_items;
  const int64_t* span_ptr;
  const PlanSpan* spans;
  int64_t n_heads;
  const int64_t* rows;  // explicit rows of groups with rstride 0
};

// Rows per group the planner makes for a kernel: `rows` normally, up to `max_rows` to follow
// the query blocks of a block layout.
struct TileGeometry {
  int rows, max_rows;
};
constexpr TileGeometry kAttentionTiles{96, 144};
constexpr TileGeometry kMapsTiles{64, 64};

// Everything the attention core needs. Strides are in elements; the last axis of q, k, v and
// out is contiguous. lse is dense (B, Hq, Lq). weights is dense (B, Hq, n_weight_rows, Lk) or
// null; query row i goes to weights row weight_index[i] (-1: none), or row i when
// weight_index is null.
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
  const int64_t* weight_index;
  int64_t n_weight_rows;

  float scale;
  const MaskRule* rule;
  const MaskPlan* plan;
  const float* float_mask;  // (B, Hq, Lq, Lk) through float_mask_strides, added to the scores
  int64_t float_mask_strides[4];
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
  const MaskPlan* plan;  // built with kMapsTiles
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
