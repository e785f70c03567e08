// Pass 2 of the exact attention maps, compiled once per instruction set like every file in
// kernels/ (everything in a per-ISA anonymous namespace, no library templates instantiated).
//
// Given each row's log-sum-exp from pass 1 (the attention kernel), a work item (plan item,
// head; the plan built for kMapsTiles) recomputes the scores of each group of query rows over
// the key spans the mask plan lists, chunk by chunk (BC keys), with the kernel's semantics:
// s = scale q.k, then softcap, ALiBi and float mask, then -inf where the mask rule
// (mask_rule.h) disallows the key in a partial span. p = 2^((s - lse) log2 e) is reduced
// straight into
//   - the pooled map: per chunk, rows of one query bin are summed into a BC-vector, which is
//     then cut at the key-bin edges; the group's bins are added to the shared output at the
//     end with an atomic add (neighbouring groups may share a query bin);
//   - the row entropy -sum p log p = -ln 2 sum p t with t = (s - lse) log2 e (p > 0 only);
//   - a min-heap of the K largest p per row;
//   - column sums, into a per-thread slot of partial sums (merged after the run).
// Each row counts once: rows aligned to global tokens are skipped in the windowed group that
// holds them and computed by their own group. Nothing of size Lq x Lk exists: per thread
// O(BR x BC + BR x K), plus the column-sum slots (threads x B x Hq x Lk).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "entries.h"
#include "thread_pool.h"

namespace attn {
namespace ATTN_ISA_NS {
namespace {

#include "mask_rule.h"
#include "tile_util.h"

constexpr int BR = kMapsTiles.max_rows;  // query rows per group, at most
constexpr int BC = 96;                   // keys per chunk (a multiple of 3 vectors for every ISA)
constexpr int MR = 4;                    // micro-tile rows
constexpr int MC = 3;                    // micro-tile width in vectors
constexpr int CW = MC * VL;              // micro-tile width in keys
static_assert(BC % CW == 0, "BC must be a multiple of the micro-tile width");
static_assert(BR % MR == 0, "BR must be a multiple of the micro-tile height");

constexpr double LN2 = 0.693147180559945309;

struct Ctx {
  const MapArgs* m;
  const AttnArgs* a;
  const MaskRule* rule;
  const MaskPlan* plan;
  int64_t group;  // query heads per kv head
  const float* kt;  // K transposed per tile of BC keys: [(b*Hkv + hk) * n_kt + t][D][BC]
  int64_t n_kt;
  double* slots;  // column-sum partials: [slot][B*Hq*Lk]
  int n_slots;
  uint64_t call_id;
  int next_slot;  // atomic counter
};

struct Scratch {
  Buf<float> qs, s, p, col, bin, ent, kt;
  Buf<double> loc, entd;
  Buf<float> hw;
  Buf<int64_t> hi, rows, rbin, qbins, keys, kbin, kbin_at;
  Buf<int> hn;
  Buf<uint8_t> skip;
  uint64_t call_id = 0;
  int slot = -1;
};
thread_local Scratch tls;

uint64_t g_calls = 0;  // atomic: tells the calls apart for the slot assignment

// S[r][jj] = sum_d Qs[r][d] Kt[d][jj] for rows [0, nr) (a multiple of MR) and all BC keys
// (Kt rows ldkt floats apart).
void qk_tile(const float* qs, int nr, const float* kt, int64_t ldkt, int64_t D, float* s) {
  for (int r0 = 0; r0 < nr; r0 += MR)
    for (int c0 = 0; c0 < BC; c0 += CW) {
      vf acc[MR][MC];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < MC; ++c) acc[r][c] = simd::zero();
      const float* q0 = qs + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        vf kv[MC];
#pragma GCC unroll 4
        for (int c = 0; c < MC; ++c) kv[c] = simd::load(kt + d * ldkt + c0 + c * VL);
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const vf qb = simd::set1(q0[r * D + d]);
#pragma GCC unroll 4
          for (int c = 0; c < MC; ++c) acc[r][c] = simd::fma(qb, kv[c], acc[r][c]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < MC; ++c) simd::store(s + (r0 + r) * BC + c0 + c * VL, acc[r][c]);
    }
}

void atomic_add(double* p, double x) {
  double cur, want;
  __atomic_load(p, &cur, __ATOMIC_RELAXED);
  do {
    want = cur + x;
  } while (!__atomic_compare_exchange(p, &cur, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}

// Inserts (w, j) into the min-heap of one row (root = the worst kept entry: smallest w, and
// among equal w the largest index). Keys may arrive in any order (a group's global keys come
// after its band), so ties are settled by the index.
bool worse(float wa, int64_t ja, float wb, int64_t jb) { return wa < wb || (wa == wb && ja > jb); }

// Moves the entry (w, j) down from slot i of a heap of n entries.
void sift_down(float* hw, int64_t* hj, int n, int i, float w, int64_t j) {
  for (;;) {
    int ch = 2 * i + 1;
    if (ch >= n) break;
    if (ch + 1 < n && worse(hw[ch + 1], hj[ch + 1], hw[ch], hj[ch])) ++ch;
    if (!worse(hw[ch], hj[ch], w, j)) break;
    hw[i] = hw[ch];
    hj[i] = hj[ch];
    i = ch;
  }
  hw[i] = w;
  hj[i] = j;
}

void heap_push(float* hw, int64_t* hj, int& n, int K, float w, int64_t j) {
  if (n == K) {  // full: (w, j) replaces the root if it is better
    if (worse(hw[0], hj[0], w, j)) sift_down(hw, hj, n, 0, w, j);
    return;
  }
  int i = n++;
  while (i > 0) {
    const int par = (i - 1) / 2;
    if (!worse(w, j, hw[par], hj[par])) break;
    hw[i] = hw[par];
    hj[i] = hj[par];
    i = par;
  }
  hw[i] = w;
  hj[i] = j;
}

// The maps of one plan group for head h over its spans [sp0, sp1); cs: this thread's
// column sums of (b, h), or null (then atomic adds into the output).
void map_group(const Ctx& c, Scratch& s, const PlanGroup& g, int64_t h, const PlanSpan* sp0,
               const PlanSpan* sp1, double* cs) {
  const MapArgs& m = *c.m;
  const AttnArgs& a = *c.a;
  const MaskRule& rule = *c.rule;
  const int64_t b = g.b, bh = b * a.Hq + h, hk = h / c.group;
  const int n = g.n;
  const int nr = (n + MR - 1) / MR * MR;
  const int64_t D = a.D, K = m.K;
  const RowCtx x = row_ctx(rule, g, h);

  int64_t* rows = s.rows.p;
  for (int r = 0; r < n; ++r) rows[r] = g.rstride ? g.i0 + r * g.rstride : c.plan->rows[g.i0 + r];
  // Rows aligned to global tokens belong to their own group, which follows this one.
  uint8_t* skip = s.skip.p;
  const float* lse = a.lse + bh * a.Lq;
  bool any = false;
  for (int r = 0; r < n; ++r) {
    skip[r] = !g.global_rows && is_global_row(rule, *x.d, rows[r]);
    any = any || (!skip[r] && lse[rows[r]] != NEG_INF);
  }
  // The query bins of the rows (non-decreasing, as the rows are): local index per row.
  int64_t* rbin = s.rbin.p;
  int64_t* qbins = s.qbins.p;
  int64_t nqb = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t qb = ((rows[r] + 1) * m.Pq - 1) / a.Lq;
    if (nqb == 0 || qbins[nqb - 1] != qb) qbins[nqb++] = qb;
    rbin[r] = nqb - 1;
  }
  double* entd = s.entd.p;
  int* hn = s.hn.p;
  float* hw = s.hw.p;
  int64_t* hj = s.hi.p;
  for (int r = 0; r < n; ++r) {
    entd[r] = 0.0;
    hn[r] = 0;
  }
  double* loc = s.loc.get(size_t(nqb * m.Pk));
  std::memset(loc, 0, sizeof(double) * size_t(nqb * m.Pk));

  if (any) {
    // Queries, pre-scaled, rows padded with zeros to a multiple of MR.
    float* qs = s.qs.p;
    const float* qb = a.q + b * a.sq[0] + h * a.sq[1];
    for (int r = 0; r < nr; ++r)
      for (int64_t d = 0; d < D; ++d) qs[r * D + d] = r < n ? qb[rows[r] * a.sq[2] + d] * a.scale : 0.0f;
    const float* kb = a.k + b * a.sk[0] + hk * a.sk[1];
    const float* ktb = c.kt + (b * a.Hkv + hk) * c.n_kt * D * BC;
    float* st = s.s.p;
    float* pt = s.p.p;
    float* col = s.col.p;
    float* bin = s.bin.get(size_t(nqb) * BC);
    float* kt = s.kt.p;
    int64_t* keys = s.keys.p;
    int64_t* kbin = s.kbin.p;
    int64_t* kbin_at = s.kbin_at.p;
    float* entv = s.ent.p;
    for (int r = 0; r < BR * VL; ++r) entv[r] = 0.0f;
    const float slope = a.alibi ? -a.alibi[h] : 0.0f;

    for (const PlanSpan* sp = sp0; sp != sp1; ++sp)
      for (int64_t m0 = 0, jn = 0; m0 < sp->n; m0 += jn) {
        // Consecutive keys: chunks within one tile of the transposed K; others: BC keys.
        jn = sp->kstride == 1 ? min64(BC - (sp->j0 + m0) % BC, sp->n - m0) : min64(BC, sp->n - m0);
        for (int jj = 0; jj < jn; ++jj)
          keys[jj] = sp->kstride ? sp->j0 + (m0 + jj) * sp->kstride : rule.globals[sp->j0 + m0 + jj];
        if (sp->kstride == 1) {  // from the transposed tile, columns past jn spill over (-inf)
          qk_tile(qs, nr, ktb + (keys[0] / BC) * D * BC + keys[0] % BC, BC, D, st);
        } else {  // strided or gathered keys: transposed here ([D][BC], zero-padded)
          for (int jj = 0; jj < BC; ++jj) {
            if (jj < jn) {
              const float* kr = kb + keys[jj] * a.sk[2];
              for (int64_t d = 0; d < D; ++d) kt[d * BC + jj] = kr[d];
            } else {
              for (int64_t d = 0; d < D; ++d) kt[d * BC + jj] = 0.0f;
            }
          }
          qk_tile(qs, nr, kt, BC, D, st);
        }
        if (a.softcap > 0.0f) {
          const vf cap = simd::set1(a.softcap), inv = simd::set1(1.0f / a.softcap);
          for (int r = 0; r < n; ++r)
            for (int jj = 0; jj < BC; jj += VL) {
              float* q = st + r * BC + jj;
              simd::store(q, simd::mul(cap, simd::tanh(simd::mul(simd::load(q), inv))));
            }
        }
        if (a.alibi) {
          // -slope * |c - j| with c = i + shift, in float as the kernel does.
          for (int r = 0; r < n; ++r) {
            const float cpos = float(rows[r] + x.d->shift);
            float* row = st + r * BC;
            for (int jj = 0; jj < jn; ++jj) row[jj] += slope * std::fabs(cpos - float(keys[jj]));
          }
        }
        if (a.float_mask) {
          const int64_t* ms = a.float_mask_strides;
          const float* fm = a.float_mask + b * ms[0] + h * ms[1];
          for (int r = 0; r < n; ++r) {
            const float* fr = fm + rows[r] * ms[2];
            float* row = st + r * BC;
            for (int jj = 0; jj < jn; ++jj) row[jj] += fr[keys[jj] * ms[3]];
          }
        }
        // The mask rule on partial spans; keys past the chunk are -inf.
        const uint32_t checks = sp->checks;
        int64_t gc = (checks & kGlobalsElsewhere) ? first_global(rule, keys[0]) : 0;
        for (int jj = 0; jj < BC; ++jj) {
          bool ok_all = jj < jn, global = sp->kstride == 0;
          if (ok_all && (checks & kGlobalsElsewhere)) {
            while (gc < rule.n_globals && rule.globals[gc] < keys[jj]) ++gc;
            global = gc < rule.n_globals && rule.globals[gc] == keys[jj];
          }
          if (ok_all && skipped_here(checks, global)) ok_all = false;
          if (ok_all && !checks) continue;
          for (int r = 0; r < n; ++r)
            if (!ok_all || !allowed(x, checks, rows[r], keys[jj], global)) st[r * BC + jj] = NEG_INF;
        }

        // p = 2^((s - lse) log2 e); entropy terms; query-bin sums.
        const vf log2e = simd::set1(LOG2E), zero = simd::zero();
        for (int64_t q = 0; q < nqb; ++q)
          for (int jj = 0; jj < BC; ++jj) bin[q * BC + jj] = 0.0f;
        for (int r = 0; r < n; ++r) {
          const float lr = lse[rows[r]];
          if (skip[r] || lr == NEG_INF) continue;  // empty row: no probabilities
          const vf shift = simd::set1(lr);
          const float* srow = st + r * BC;
          float* prow = pt + r * BC;
          float* brow = bin + rbin[r] * BC;
          vf e = simd::load(entv + r * VL);
          vf mx = zero;
          for (int jj = 0; jj < BC; jj += VL) {
            const vf tv = simd::mul(simd::sub(simd::load(srow + jj), shift), log2e);
            const vf pv = simd::exp2(tv);
            simd::store(prow + jj, pv);
            e = simd::add(e, simd::select(simd::lt(zero, pv), simd::mul(pv, tv), zero));
            mx = simd::max(mx, pv);
            simd::store(brow + jj, simd::add(simd::load(brow + jj), pv));
          }
          simd::store(entv + r * VL, e);
          if (K > 0) {
            float* rw = hw + r * K;
            int64_t* rj = hj + r * K;
            float thr = hn[r] < K ? -1.0f : rw[0];
            // Most chunks hold nothing above the row's current k-th largest weight: one look
            // at the chunk maximum skips the scan.
            alignas(64) float lanes[VL];
            simd::store(lanes, mx);
            float tmax = lanes[0];
            for (int l = 1; l < VL; ++l) tmax = lanes[l] > tmax ? lanes[l] : tmax;
            if (!(tmax >= thr)) continue;
            for (int jj = 0; jj < jn; ++jj)
              if (prow[jj] >= thr && srow[jj] != NEG_INF) {
                heap_push(rw, rj, hn[r], int(K), prow[jj], keys[jj]);
                thr = hn[r] < K ? -1.0f : rw[0];
              }
          }
        }
        // Every row adds into exactly one query bin: the column sums are the bins' sum.
        for (int jj = 0; jj < BC; ++jj) col[jj] = 0.0f;
        for (int64_t q = 0; q < nqb; ++q)
          for (int jj = 0; jj < BC; jj += VL)
            simd::store(col + jj, simd::add(simd::load(col + jj), simd::load(bin + q * BC + jj)));
        if (cs)
          for (int jj = 0; jj < jn; ++jj) cs[keys[jj]] += col[jj];
        else
          for (int jj = 0; jj < jn; ++jj) atomic_add(m.colsum + bh * a.Lk + keys[jj], col[jj]);
        // Cut each query bin's row sum at the key-bin edges (keys increase within a chunk):
        // runs of keys in one key bin, [kbin_at[x], kbin_at[x + 1]) in bin kbin[x].
        int nruns = 0;
        for (int jj = 0; jj < jn; ++nruns) {
          const int64_t kbi = ((keys[jj] + 1) * m.Pk - 1) / a.Lk;
          const int64_t kend = (kbi + 1) * a.Lk / m.Pk;  // first key of the next bin
          kbin[nruns] = kbi;
          kbin_at[nruns] = jj;
          while (jj < jn && keys[jj] < kend) ++jj;
        }
        kbin_at[nruns] = jn;
        for (int64_t q = 0; q < nqb; ++q) {
          const float* brow = bin + q * BC;
          double* lrow = loc + q * m.Pk;
          for (int run = 0; run < nruns; ++run) {
            float sum = 0.0f;
            for (int jj = int(kbin_at[run]); jj < kbin_at[run + 1]; ++jj) sum += brow[jj];
            lrow[kbin[run]] += sum;
          }
        }
      }
    for (int r = 0; r < n; ++r) {
      float tmp[VL];
      simd::store(tmp, simd::load(entv + r * VL));
      for (int l = 0; l < VL; ++l) entd[r] += tmp[l];
    }
  }

  // Row results: entropy, top-k sorted largest first (ties: smaller index first).
  for (int r = 0; r < n; ++r) {
    if (skip[r]) continue;
    const int64_t i = rows[r];
    m.entropy[bh * a.Lq + i] = float(0.0 - LN2 * entd[r]);  // +0 for an empty row
    if (K == 0) continue;
    float* rw = hw + r * K;
    int64_t* rj = hj + r * K;
    int cnt = hn[r];
    float* ow = m.top_w + (bh * a.Lq + i) * K;
    int64_t* oj = m.top_idx + (bh * a.Lq + i) * K;
    for (int64_t q = cnt; q < K; ++q) {
      ow[q] = 0.0f;
      oj[q] = -1;
    }
    // Pop the worst entry into the last free place until the heap is empty.
    while (cnt > 0) {
      --cnt;
      ow[cnt] = rw[0];
      oj[cnt] = rj[0];
      if (cnt > 0) sift_down(rw, rj, cnt, 0, rw[cnt], rj[cnt]);
    }
  }
  // Pooled sums of this group's query bins into the shared output.
  double* pooled = m.pooled + bh * m.Pq * m.Pk;
  for (int64_t q = 0; q < nqb; ++q)
    for (int64_t kb = 0; kb < m.Pk; ++kb) {
      const double v = loc[q * m.Pk + kb];
      if (v != 0.0) atomic_add(pooled + qbins[q] * m.Pk + kb, v);
    }
}

void map_item(void* pc, int64_t work) {
  Ctx& c = *static_cast<Ctx*>(pc);
  const AttnArgs& a = *c.a;
  const MaskPlan& plan = *c.plan;
  const int64_t h = work % a.Hq;
  const PlanItem& item = plan.items[work / a.Hq];
  Scratch& s = tls;
  const int64_t D = a.D, K = c.m->K;

  // This thread's column-sum slot for this call.
  if (s.call_id != c.call_id) {
    s.call_id = c.call_id;
    s.slot = __atomic_fetch_add(&c.next_slot, 1, __ATOMIC_RELAXED);
  }
  s.qs.get(size_t(BR) * size_t(D));
  s.s.get(size_t(BR) * BC);
  s.p.get(size_t(BR) * BC);
  s.col.get(BC);
  s.kt.get(size_t(D) * BC);
  s.keys.get(BC);
  s.kbin.get(BC);
  s.kbin_at.get(BC + 1);
  s.ent.get(size_t(BR) * VL);
  s.entd.get(BR);
  s.hn.get(BR);
  s.hw.get(size_t(BR) * size_t(K > 0 ? K : 1));
  s.hi.get(size_t(BR) * size_t(K > 0 ? K : 1));
  s.rows.get(BR);
  s.rbin.get(BR);
  s.qbins.get(BR);
  s.skip.get(BR);

  const int64_t hp = plan.n_heads > 1 ? h : 0;
  for (int64_t g = item.g0; g < item.g1; ++g) {
    const PlanGroup& grp = plan.groups[g];
    const int64_t bh = grp.b * a.Hq + h;
    double* cs = s.slot < c.n_slots ? c.slots + size_t(s.slot) * size_t(a.B * a.Hq * a.Lk) +
                                          size_t(bh * a.Lk)
                                    : nullptr;
    const int64_t* sp = plan.span_ptr + hp * plan.n_groups + g;
    map_group(c, s, grp, h, plan.spans + sp[0], plan.spans + sp[1], cs);
  }
}

void maps_impl(const MapArgs& m) {
  const AttnArgs& a = *m.a;
  Ctx c{};
  c.m = &m;
  c.a = &a;
  c.rule = a.rule;
  c.plan = m.plan;
  c.group = a.Hq / a.Hkv;

  // K transposed tile by tile ([D][BC], zero-padded), once per call; one spare tile at the
  // end takes the spill-over of a chunk that starts inside the last tile.
  Buf<float> kt;
  c.n_kt = (a.Lk + BC - 1) / BC;
  const size_t tile = size_t(a.D) * BC;
  float* ktp = kt.get(size_t(a.B * a.Hkv * c.n_kt + 1) * tile);
  for (int64_t bk = 0; bk < a.B * a.Hkv; ++bk) {
    const float* kb = a.k + (bk / a.Hkv) * a.sk[0] + (bk % a.Hkv) * a.sk[1];
    for (int64_t t = 0; t < c.n_kt; ++t) {
      float* dst = ktp + size_t(bk * c.n_kt + t) * tile;
      for (int jj = 0; jj < BC; ++jj) {
        const int64_t j = t * BC + jj;
        if (j < a.Lk) {
          const float* kr = kb + j * a.sk[2];
          for (int64_t d = 0; d < a.D; ++d) dst[d * BC + jj] = kr[d];
        } else {
          for (int64_t d = 0; d < a.D; ++d) dst[d * BC + jj] = 0.0f;
        }
      }
    }
  }
  std::memset(ktp + size_t(a.B * a.Hkv * c.n_kt) * tile, 0, sizeof(float) * tile);
  c.kt = ktp;

  // One column-sum slot per thread that takes part.
  const size_t per = size_t(a.B * a.Hq * a.Lk);
  c.n_slots = a.num_threads > 0 ? a.num_threads : 1;
  Buf<double> slots;
  c.slots = slots.get(per * size_t(c.n_slots));
  std::memset(c.slots, 0, sizeof(double) * per * size_t(c.n_slots));
  c.call_id = __atomic_add_fetch(&g_calls, 1, __ATOMIC_RELAXED);
  c.next_slot = 0;

  parallel_for(c.plan->n_items * a.Hq, a.num_threads, &map_item, &c);

  for (int sl = 0; sl < c.n_slots; ++sl) {
    const double* src = c.slots + size_t(sl) * per;
    for (size_t x = 0; x < per; ++x) m.colsum[x] += src[x];
  }
}

}  // namespace

void maps(const MapArgs& m) { maps_impl(m); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
