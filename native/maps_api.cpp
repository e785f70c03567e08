// Entry point of attention_maps: checks, pass 1 through the existing kernel (which gives each
// row's log-sum-exp), pass 2 through the map kernel of the instruction set in use. Compiled
// for the baseline target only.
#include <cstring>
#include <stdexcept>
#include <string>

#include "maps_api.h"

namespace attn {

MapsPlan plan_maps(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v, double scale,
                   const CallOptions& opts, int64_t bins_q, int64_t bins_k, int64_t top_k) {
  if (bins_q < 1) throw std::invalid_argument("bins: query bins must be >= 1, got " +
                                              std::to_string(bins_q));
  if (bins_k < 1) throw std::invalid_argument("bins: key bins must be >= 1, got " +
                                              std::to_string(bins_k));
  if (top_k < 0) throw std::invalid_argument("top_k: must be >= 0, got " +
                                             std::to_string(top_k));
  MapsPlan p;
  CallOptions o = opts;  // the maps replace the weights
  o.return_weights = false;
  o.weights_rows = ArrayRef{};
  p.attn = plan_attention(q, k, v, scale, o);
  const AttnArgs& a = p.attn.args;
  p.Pq = bins_q < a.Lq ? bins_q : a.Lq;
  p.Pk = bins_k < a.Lk ? bins_k : a.Lk;
  p.K = top_k < a.Lk ? top_k : a.Lk;
  p.pooled_shape = {a.B, a.Hq, p.Pq, p.Pk};
  p.top_shape = {a.B, a.Hq, a.Lq, p.K};
  p.colsum_shape = {a.B, a.Hq, a.Lk};
  return p;
}

void run_maps(MapsPlan& p, float* out, float* lse, double* pooled, float* entropy,
              int64_t* top_idx, float* top_w, double* colsum) {
  AttnArgs& a = p.attn.args;
  run_attention(p.attn, out, lse, nullptr);
  const size_t npool = size_t(a.B * a.Hq * p.Pq * p.Pk);
  std::memset(pooled, 0, sizeof(double) * npool);
  std::memset(colsum, 0, sizeof(double) * size_t(a.B * a.Hq * a.Lk));
  if (a.B == 0 || a.Hq == 0 || a.Lq == 0) return;
  // Pass 2 follows its own plan: the same rule, grouped for the map kernel's tiles.
  const MaskRule rule = p.attn.masking.rule();
  const PlanStorage storage = build_plan(rule, kMapsTiles, a.B, a.Hq, a.Lq);
  const MaskPlan plan = storage.view();
  a.rule = &rule;
  MapArgs m{&a, &plan, p.Pq, p.Pk, p.K, pooled, entropy, top_idx, top_w, colsum};
  kernels().maps(m);
  a.rule = nullptr;
  // Sums -> means over each bin's cells.
  if (p.Pq == 0 || p.Pk == 0) return;
  for (int64_t bh = 0; bh < a.B * a.Hq; ++bh)
    for (int64_t qb = 0; qb < p.Pq; ++qb) {
      const int64_t nq = (qb + 1) * a.Lq / p.Pq - qb * a.Lq / p.Pq;
      double* row = pooled + (bh * p.Pq + qb) * p.Pk;
      for (int64_t kb = 0; kb < p.Pk; ++kb) {
        const int64_t nk = (kb + 1) * a.Lk / p.Pk - kb * a.Lk / p.Pk;
        row[kb] /= double(nq * nk);
      }
    }
}

}  // namespace attn
