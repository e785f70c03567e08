// Masking, in one module: the checks of every masking option (masking.cpp), the rule they make
// (MaskRule; its element form is mask_rule.h), and the plan the kernels follow (MaskPlan:
// per group of query rows, the key spans to visit, each full or partial).
#pragma once

#include <cstdint>
#include <vector>

#include "checks.h"
#include "kernel_abi.h"

namespace attn {

struct MaskOptions {
  int causal = 0;
  ArrayRef mask;  // bool: part of the rule; float32: added to the scores
  ArrayRef key_lengths, global_tokens;
  int64_t window_left = -1, window_right = -1, dilation = 1;
  ArrayRef block_layout;                 // bool, broadcastable to (B, Hq, nqb, nkb)
  int64_t block_q = 0, block_k = 0;      // block_k 0: block_q
  ArrayRef cu_seqlens_q, cu_seqlens_k;   // packed sequences (flash-attn's offsets)
  bool cu_seqlens_shared = false;        // given once as cu_seqlens (errors name that)
  // Only keys in [key_begin, key_end) (-1: Lk) may be seen, every position kept absolute: one
  // slice of the keys of a split-KV computation (service.distributed), whose partial outputs
  // and log-sum-exps merge exactly into the whole call's.
  int64_t key_begin = 0, key_end = -1;
  // Recurrent memory (Transformer-XL, Compressive Transformer): segments of memory_segment
  // rows (0: off), memory_length raw keys before each, memory_compressed slots of memory_rate
  // positions after the raw keys on the key axis (Lk = Lq + ceil(Lq / rate) when compressed).
  int64_t memory_segment = 0, memory_length = 0, memory_compressed = 0, memory_rate = 1;
};

// Checked masking options: the rule and the data it points into.
class Masking {
 public:
  // Checks `o` against the shapes (std::invalid_argument naming the option).
  Masking(const MaskOptions& o, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk);
  Masking() = default;

  // The rule, pointing into this object (valid while it lives unchanged).
  MaskRule rule() const;
  const float* float_mask() const { return float_mask_; }
  const int64_t* float_mask_strides() const { return float_mask_strides_; }

 private:
  MaskRule rule_{};
  const float* float_mask_ = nullptr;
  int64_t float_mask_strides_[4] = {0, 0, 0, 0};
  // Recurrent memory: one document per segment (per batch with key_lengths).
  void memory_docs(const MaskOptions& o, int64_t B, int64_t Lq, int64_t Lk,
                   const std::vector<int64_t>& lengths);

  std::vector<MaskDoc> docs_;
  std::vector<int64_t> globals_;
};

// A MaskPlan and its storage.
struct PlanStorage {
  std::vector<PlanGroup> groups;
  std::vector<PlanItem> items;
  std::vector<int64_t> span_ptr;
  std::vector<PlanSpan> spans;
  std::vector<int64_t> rows;
  int64_t n_heads = 1;
  MaskPlan view() const;
};

// The plan of a call with B batches of Lq rows and Hq heads, groups sized for `tiles`. Costs
// O(groups x spans) (plus the block layout's cells when there is one), never O(Lq x Lk).
PlanStorage build_plan(const MaskRule& rule, TileGeometry tiles, int64_t B, int64_t Hq,
                       int64_t Lq);

// The size and build time of the plan for some masking options and shapes (checks included).
struct PlanStats {
  int64_t groups = 0, items = 0, spans = 0, full_spans = 0;
  int64_t pairs = 0;  // (query row, key) pairs the kernel visits, over every batch and head
  bool head_dependent = false;
  double build_seconds = 0.0;
};
PlanStats plan_stats(const MaskOptions& o, TileGeometry tiles, int64_t B, int64_t Hq, int64_t Lq,
                     int64_t Lk);

}  // namespace attn
