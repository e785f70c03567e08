// Exact attention maps in O(L) memory: the plain-data interface between the ISA-neutral entry
// point (maps_api.cpp) and the pass-2 kernel (maps_kernel.cpp, compiled once per instruction
// set like kernel.cpp). Same rule as attention.h: no templates or inline functions here.
#pragma once

#include <cstdint>

#include "attention.h"

namespace attn {

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

struct MapTable {
  void (*maps)(const MapArgs&);
};

namespace isa_baseline {
extern const MapTable map_table;
}
namespace isa_avx2 {
extern const MapTable map_table;
}
namespace isa_avx512 {
extern const MapTable map_table;
}

}  // namespace attn
