// The checked entry point of attention_maps (maps_api.cpp), for the bindings. Kept apart from
// kernel_abi.h (MapArgs), which the per-ISA kernels include and which must stay free of
// library templates.
#pragma once

#include <cstdint>
#include <vector>

#include "api.h"

namespace attn {

struct MapsPlan {
  AttentionPlan attn;
  int64_t Pq = 0, Pk = 0, K = 0;
  std::vector<int64_t> pooled_shape, top_shape, colsum_shape;
};

// Checks (std::invalid_argument naming the argument) and output shapes. Pq, Pk are clamped to
// Lq, Lk and K to Lk.
MapsPlan plan_maps(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v, double scale,
                   const CallOptions& opts, int64_t bins_q, int64_t bins_k, int64_t top_k);
// Pass 1 (the attention kernel: out, lse) then pass 2; pooled comes back as bin means.
void run_maps(MapsPlan& plan, float* out, float* lse, double* pooled, float* entropy,
              int64_t* top_idx, float* top_w, double* colsum);

}  // namespace attn
