// Pass 2 of the exact attention maps, compiled once per instruction set like every file in
// kernels/ (everything in a per-ISA anonymous namespace, no library templates instantiated).
//
// Given each row's log-sum-exp from pass 1 (the attention kernel), a work item (batch, head,
// tile of BR query rows) recomputes the scores tile by tile (BC keys), with the kernel's
// semantics: s = scale q.k, then softcap, ALiBi and float mask, then -inf where the bool mask,
// causality, the window (with dilation, global tokens exempt) or key_lengths disallow the key.
// p = 2^((s - lse) log2 e) is reduced straight into
//   - the pooled map: per tile, rows of one query bin are summed into a BC-vector, which is
//     then cut at the key-bin edges; the item's bins are added to the shared output at the end
//     with an atomic add (neighbouring items may share a query bin);
//   - the row entropy -sum p log p = -ln 2 sum p t with t = (s - lse) log2 e (p > 0 only);
//   - a min-heap of the K largest p per row;
//   - column sums, into a per-thread slot of partial sums (merged after the run).
// Nothing of size Lq x Lk exists: per thread O(BR x BC + BR x K), plus K transposed once per
// call (O(Lk D)) and the column-sum slots (threads x B x Hq x Lk).
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

#include "tile_util.h"

constexpr int BR = 64;        // query rows per work item
constexpr int BC = 96;        // keys per tile (a multiple of 3 vectors for every ISA)
constexpr int MR = 4;         // micro-tile rows
constexpr int MC = 3;         // micro-tile width in vectors
constexpr int CW = MC * VL;   // micro-tile width in keys
static_assert(BC % CW == 0, "BC must be a multiple of the micro-tile width");
static_assert(BR % MR == 0, "BR must be a multiple of the micro-tile height");

constexpr double LN2 = 0.693147180559945309;

struct Ctx {
  const MapArgs* m;
  const AttnArgs* a;
  int64_t group, coff, off;
  bool window;
  int64_t wl, wr, dil, dlo, dhi;  // clamped window; allowed offsets [dlo, dhi]
  const int64_t* globals;        // null unless a window is active
  int64_t n_globals;
  int64_t n_qt, n_kt;
  const float* kt;  // K transposed per tile: [(b*Hkv + hk) * n_kt + t][D][BC]
  double* slots;    // column-sum partials: [slot][B*Hq*Lk]
  int n_slots;
  uint64_t call_id;
  int next_slot;  // atomic counter
};

struct Scratch {
  Buf<float> qs, s, p, col, bin, ent;
  Buf<double> loc, entd;
  Buf<float> hw;
  Buf<int64_t> hi;
  Buf<int> hn;
  Buf<uint8_t> grow, gkey;
  uint64_t call_id = 0;
  int slot = -1;
};
thread_local Scratch tls;

uint64_t g_calls = 0;  // atomic: tells the calls apart for the slot assignment

int64_t first_global_at_or_after(const Ctx& c, int64_t pos) {
  return lower_bound64(c.globals, c.n_globals, pos);
}

// S[r][jj] = sum_d Qs[r][d] Kt[d][jj] for rows [0, nr) (a multiple of MR) and all BC keys.
void qk_tile(const float* qs, int nr, const float* kt, int64_t D, float* s) {
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
        for (int c = 0; c < MC; ++c) kv[c] = simd::load(kt + d * BC + c0 + c * VL);
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
// among equal w the largest index). Keys arrive in increasing j, so a later key with a tied
// weight never displaces an earlier one.
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
  if (n == K) {  // full: (w, j) is better than the root, which it replaces
    sift_down(hw, hj, n, 0, w, j);
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

void map_item(void* pc, int64_t item) {
  Ctx& c = *static_cast<Ctx*>(pc);
  const MapArgs& m = *c.m;
  const AttnArgs& a = *c.a;
  const int64_t qt = item % c.n_qt, bh = item / c.n_qt;
  const int64_t b = bh / a.Hq, h = bh % a.Hq, hk = h / c.group;
  const int64_t i0 = qt * BR;
  const int n = int(min64(BR, a.Lq - i0));
  const int nr = (n + MR - 1) / MR * MR;
  const int64_t D = a.D, K = m.K;
  Scratch& s = tls;

  // This thread's column-sum slot for this call.
  if (s.call_id != c.call_id) {
    s.call_id = c.call_id;
    s.slot = __atomic_fetch_add(&c.next_slot, 1, __ATOMIC_RELAXED);
  }
  double* cs = s.slot < c.n_slots ? c.slots + size_t(s.slot) * size_t(a.B * a.Hq * a.Lk) : nullptr;
  cs = cs ? cs + bh * a.Lk : nullptr;

  const float* lse = a.lse + bh * a.Lq + i0;
  float* ent_out = m.entropy + bh * a.Lq + i0;
  int64_t* ti = m.top_idx + (bh * a.Lq + i0) * K;
  float* tw = m.top_w + (bh * a.Lq + i0) * K;

  bool any = false;
  for (int r = 0; r < n; ++r) any = any || lse[r] != NEG_INF;
  double* entd = s.entd.get(BR);
  int* hn = s.hn.get(BR);
  float* hw = s.hw.get(size_t(BR) * size_t(K > 0 ? K : 1));
  int64_t* hj = s.hi.get(size_t(BR) * size_t(K > 0 ? K : 1));
  for (int r = 0; r < n; ++r) {
    entd[r] = 0.0;
    hn[r] = 0;
  }

  const int64_t qb0 = ((i0 + 1) * m.Pq - 1) / a.Lq;
  const int64_t qb1 = ((i0 + n) * m.Pq - 1) / a.Lq;
  const int64_t nqb = qb1 - qb0 + 1;
  double* loc = s.loc.get(size_t(nqb * m.Pk));
  std::memset(loc, 0, sizeof(double) * size_t(nqb * m.Pk));

  if (any) {
    // Queries, pre-scaled, rows padded with zeros to a multiple of MR.
    float* qs = s.qs.get(size_t(BR) * size_t(D));
    const float* qb = a.q + b * a.sq[0] + h * a.sq[1];
    for (int r = 0; r < nr; ++r)
      for (int64_t d = 0; d < D; ++d)
        qs[r * D + d] = r < n ? qb[(i0 + r) * a.sq[2] + d] * a.scale : 0.0f;
    uint8_t* grow = s.grow.get(BR);
    bool any_grow = false;
    for (int r = 0; r < n; ++r) {
      grow[r] = 0;
      if (c.globals) {
        const int64_t pos = i0 + r + c.off;
        const int64_t g = first_global_at_or_after(c, pos);
        grow[r] = g < c.n_globals && c.globals[g] == pos;
        any_grow = any_grow || grow[r];
      }
    }
    const int64_t imin = i0, imax = i0 + n - 1;
    int64_t jend = a.Lk;
    if (a.key_lengths) jend = min64(jend, a.key_lengths[b]);
    int64_t jmax = jend - 1;
    if (a.causal) jmax = min64(jmax, imax + c.coff);
    // Window band of the whole item (rows exempt from the window disable it).
    const bool band = c.window && !any_grow;
    int64_t blo = 0, bhi = jmax;
    if (band) {
      if (c.wl >= 0) blo = max64(blo, imin + c.off - c.wl * c.dil);
      if (c.wr >= 0) bhi = min64(bhi, imax + c.off + c.wr * c.dil);
    }

    float* st = s.s.get(size_t(BR) * BC);
    float* pt = s.p.get(size_t(BR) * BC);
    float* col = s.col.get(BC);
    float* bin = s.bin.get(size_t(nqb) * BC);
    uint8_t* gkey = s.gkey.get(BC);
    float* entv = s.ent.get(size_t(BR) * VL);
    for (int r = 0; r < BR * VL; ++r) entv[r] = 0.0f;
    const int64_t* ms = a.mask_strides;
    const float slope = a.alibi ? -a.alibi[h] : 0.0f;

    for (int64_t t = 0; t * BC <= jmax; ++t) {
      const int64_t j0 = t * BC;
      const int jn = int(min64(BC, jend - j0));
      const int64_t jl = j0 + jn - 1;
      bool has_g = false;
      if (c.globals) {
        const int64_t g = first_global_at_or_after(c, j0);
        has_g = g < c.n_globals && c.globals[g] <= jl;
      }
      // Tiles no row may see are skipped: beyond the causal limit (loop bound) or the band.
      if (band && !has_g && (jl < blo || j0 > bhi)) continue;
      bool bnd = a.bool_mask != nullptr || jn < BC;
      if (a.causal && jl > imin + c.coff) bnd = true;
      if (c.window) {
        if (any_grow || has_g || c.dil > 1) bnd = true;
        if (c.wl >= 0 && j0 < imax + c.off - c.wl * c.dil) bnd = true;
        if (c.wr >= 0 && jl > imin + c.off + c.wr * c.dil) bnd = true;
      }

      qk_tile(qs, nr, c.kt + ((b * a.Hkv + hk) * c.n_kt + t) * D * BC, D, st);
      if (a.softcap > 0.0f) {
        const vf cap = simd::set1(a.softcap), inv = simd::set1(1.0f / a.softcap);
        for (int r = 0; r < n; ++r)
          for (int jj = 0; jj < BC; jj += VL) {
            float* q = st + r * BC + jj;
            simd::store(q, simd::mul(cap, simd::tanh(simd::mul(simd::load(q), inv))));
          }
      }
      if (a.alibi) {
        // -slope * |c - j| with c = i + Lk - Lq, in float as the kernel does.
        for (int r = 0; r < n; ++r) {
          const float cpos = float(i0 + r + c.off);
          float* row = st + r * BC;
          for (int jj = 0; jj < jn; ++jj) row[jj] += slope * std::fabs(cpos - float(j0 + jj));
        }
      }
      if (a.float_mask) {
        const float* fm = a.float_mask + b * ms[0] + h * ms[1];
        for (int r = 0; r < n; ++r) {
          const float* fr = fm + (i0 + r) * ms[2];
          float* row = st + r * BC;
          for (int jj = 0; jj < jn; ++jj) row[jj] += fr[(j0 + jj) * ms[3]];
        }
      }
      if (bnd) {
        // The per-element predicate: allowed(i, j) for j < jend.
        if (has_g) {
          int64_t g = first_global_at_or_after(c, j0);
          for (int jj = 0; jj < jn; ++jj) {
            while (g < c.n_globals && c.globals[g] < j0 + jj) ++g;
            gkey[jj] = g < c.n_globals && c.globals[g] == j0 + jj;
          }
        }
        const uint8_t* bm = a.bool_mask ? a.bool_mask + b * ms[0] + h * ms[1] : nullptr;
        for (int r = 0; r < n; ++r) {
          const int64_t i = i0 + r;
          float* row = st + r * BC;
          const bool win = c.window && !grow[r];
          for (int jj = 0; jj < jn; ++jj) {
            const int64_t j = j0 + jj;
            bool ok = true;
            if (bm) ok = bm[i * ms[2] + j * ms[3]] != 0;
            if (a.causal && j > i + c.coff) ok = false;
            if (win && !(has_g && gkey[jj])) {
              const int64_t delta = j - (i + c.off);
              if (delta < c.dlo || delta > c.dhi || (c.dil > 1 && delta % c.dil != 0)) ok = false;
            }
            if (!ok) row[jj] = NEG_INF;
          }
          for (int jj = jn; jj < BC; ++jj) row[jj] = NEG_INF;  // past the tile's keys
        }
      }

      // p = 2^((s - lse) log2 e); entropy terms; query-bin sums.
      const vf log2e = simd::set1(LOG2E), zero = simd::zero();
      for (int64_t q = 0; q < nqb; ++q)
        for (int jj = 0; jj < BC; ++jj) bin[q * BC + jj] = 0.0f;
      for (int r = 0; r < n; ++r) {
        if (lse[r] == NEG_INF) continue;  // empty row: no probabilities
        const vf shift = simd::set1(lse[r]);
        const float* srow = st + r * BC;
        float* prow = pt + r * BC;
        float* brow = bin + (((i0 + r + 1) * m.Pq - 1) / a.Lq - qb0) * BC;
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
          // Most tiles hold nothing above the row's current k-th largest weight: one look at
          // the tile maximum skips the scan.
          alignas(64) float lanes[VL];
          simd::store(lanes, mx);
          float tmax = lanes[0];
          for (int l = 1; l < VL; ++l) tmax = lanes[l] > tmax ? lanes[l] : tmax;
          if (!(tmax > thr)) continue;
          for (int jj = 0; jj < jn; ++jj)
            if (prow[jj] > thr && srow[jj] != NEG_INF) {
              heap_push(rw, rj, hn[r], int(K), prow[jj], j0 + jj);
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
        for (int jj = 0; jj < jn; ++jj) cs[j0 + jj] += col[jj];
      else
        for (int jj = 0; jj < jn; ++jj) atomic_add(m.colsum + bh * a.Lk + j0 + jj, col[jj]);
      // Cut each query bin's row sum at the key-bin edges.
      for (int64_t q = 0; q < nqb; ++q) {
        const float* brow = bin + q * BC;
        double* lrow = loc + q * m.Pk;
        int jj = 0;
        while (jj < jn) {
          const int64_t j = j0 + jj;
          const int64_t kb = ((j + 1) * m.Pk - 1) / a.Lk;
          const int64_t kend = (kb + 1) * a.Lk / m.Pk;  // first key of the next bin
          const int je = int(min64(jn, kend - j0));
          float sum = 0.0f;
          for (; jj < je; ++jj) sum += brow[jj];
          lrow[kb] += sum;
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
    ent_out[r] = float(0.0 - LN2 * entd[r]);  // +0 for an empty row
    if (K == 0) continue;
    float* rw = hw + r * K;
    int64_t* rj = hj + r * K;
    int cnt = hn[r];
    float* ow = tw + r * K;
    int64_t* oj = ti + r * K;
    for (int64_t x = cnt; x < K; ++x) {
      ow[x] = 0.0f;
      oj[x] = -1;
    }
    // Pop the worst entry into the last free place until the heap is empty.
    while (cnt > 0) {
      --cnt;
      ow[cnt] = rw[0];
      oj[cnt] = rj[0];
      if (cnt > 0) sift_down(rw, rj, cnt, 0, rw[cnt], rj[cnt]);
    }
  }
  // Pooled sums of this item's query bins into the shared output.
  double* pooled = m.pooled + bh * m.Pq * m.Pk;
  for (int64_t q = 0; q < nqb; ++q)
    for (int64_t kb = 0; kb < m.Pk; ++kb) {
      const double x = loc[q * m.Pk + kb];
      if (x != 0.0) atomic_add(pooled + (qb0 + q) * m.Pk + kb, x);
    }
}

void maps_impl(const MapArgs& m) {
  const AttnArgs& a = *m.a;
  Ctx c{};
  c.m = &m;
  c.a = &a;
  c.group = a.Hq / a.Hkv;
  c.off = a.Lk - a.Lq;
  c.coff = a.causal == 2 ? c.off : 0;
  c.window = a.window_left >= 0 || a.window_right >= 0 || a.dilation > 1;
  const int64_t lim = a.Lq + a.Lk + 1;
  c.wl = a.window_left < 0 ? -1 : min64(a.window_left, lim);
  c.wr = a.window_right < 0 ? -1 : min64(a.window_right, lim);
  c.dil = min64(max64(a.dilation, 1), lim);
  c.dlo = c.wl >= 0 ? -c.wl * c.dil : INT64_MIN;
  c.dhi = c.wr >= 0 ? c.wr * c.dil : INT64_MAX;
  if (c.window && a.n_global > 0) {
    c.globals = a.global_tokens;
    c.n_globals = a.n_global;
  }
  c.n_qt = (a.Lq + BR - 1) / BR;
  c.n_kt = (a.Lk + BC - 1) / BC;

  // K transposed tile by tile ([D][BC], zero-padded), once per call.
  Buf<float> kt;
  const size_t tile = size_t(a.D) * BC;
  float* ktp = kt.get(size_t(a.B * a.Hkv * c.n_kt) * tile);
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
  c.kt = ktp;

  // One column-sum slot per thread that takes part.
  const size_t per = size_t(a.B * a.Hq * a.Lk);
  c.n_slots = a.num_threads > 0 ? a.num_threads : 1;
  Buf<double> slots;
  c.slots = slots.get(per * size_t(c.n_slots));
  std::memset(c.slots, 0, sizeof(double) * per * size_t(c.n_slots));
  c.call_id = __atomic_add_fetch(&g_calls, 1, __ATOMIC_RELAXED);
  c.next_slot = 0;

  parallel_for(a.B * a.Hq * c.n_qt, a.num_threads, &map_item, &c);

  for (int sl = 0; sl < c.n_slots; ++sl) {
    const double* src = c.slots + size_t(sl) * per;
    for (size_t x = 0; x < per; ++x) m.colsum[x] += src[x];
  }
}

}  // namespace

void maps(const MapArgs& m) { maps_impl(m); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
