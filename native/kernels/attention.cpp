// The attention kernel. Like every file in kernels/, it is compiled once per instruction set
// (CMake passes -DATTN_ISA_NS=isa_xxx plus that ISA's -m flags), so everything lives in a
// per-ISA namespace, mostly an anonymous one: no inline function or template instance may be
// shared with another TU (the linker could otherwise keep an AVX copy for baseline callers).
//
// Algorithm (FlashAttention with an online softmax, laid out like ggml's tiled CPU kernel):
// a work item is one (batch, head, tile of BR query rows). The query tile is packed transposed
// and pre-scaled (Qt[d][lane]); the score tile is computed transposed, St[key][lane], so that
// the softmax statistics of a query row live in one SIMD lane: the row max, the rescale factor
// and the row sum are plain vertical vector ops, and the accumulator Ot[dv][lane] is updated by
// broadcasting V[key][dv] against P rows. K and V are read in their natural layout.
// For each tile of BC keys, and each lane block (one micro-tile width of query rows):
//   St   = K_tile . Qt                      (register-blocked RJ x RI-vector micro-kernel)
//   St   = softcap / ALiBi / float mask / -inf for disallowed keys (boundary tiles only)
//   m'   = max(m, max_j St[j])              (row max)
//   a    = 2^(m - m'),  P = 2^(St - m')     (vectorised 2^x, 2^-inf = 0)
//   l    = a * l + sum_j P[j]               (row sum)
//   Ot   = a * Ot + V_tile^T . P            (rescale folded into the P.V micro-kernel)
// and at the end out = Ot / l, lse = (m + log2 l) * ln 2. Scores are kept in base-2 units
// (s * log2 e, folded into the packed Q unless a modifier needs natural units), which makes the
// exponentials cheaper. Tiles the mask rules out entirely are never visited, and within a
// boundary tile each lane block only computes the keys some of its rows may see, so a window
// of width W costs O(L * W) and a causal mask about half the dense work. Extra memory is
// O(tile) per thread.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "entries.h"
#include "thread_pool.h"


namespace attn {
namespace ATTN_ISA_NS {
namespace {

#include "tile_util.h"

#if defined(__AVX512F__)
constexpr int RJ = 8;  // micro-tile rows: keys (Q.K) or value columns (P.V)
constexpr int RI = 3;  // micro-tile width in vectors of query lanes
#else
constexpr int RJ = 4;
constexpr int RI = 3;
#endif
constexpr int IB = RI * VL;  // lanes (query rows) per lane block = micro-tile width
constexpr int BR = 96;       // query rows per tile (a multiple of IB for every ISA)
constexpr int BC = 128;      // keys per tile
constexpr int NBLK = BR / IB;
static_assert(BR % IB == 0, "BR must be a multiple of the micro-tile width");

constexpr float LN2 = 0.693147180559945309f;

// ----------------------------------------------------------------------------------------
// Micro-kernels

// out[r][lanes] = sum_d k[r][d] * qt[d][lanes] for R keys and C vectors of query lanes
// (qt and out rows are IB floats apart).
template <int R, int C>
void qk_micro(const float* k, int64_t ldk, const float* qt, int64_t D, float* out) {
  vf acc[R][C];
  const float* kr[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    kr[r] = k + r * ldk;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = simd::zero();
  }
#pragma GCC unroll 2
  for (int64_t d = 0; d < D; ++d) {
    vf qv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) qv[c] = simd::load(qt + d * IB + c * VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vf kv = simd::set1(kr[r][d]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = simd::fma(kv, qv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) simd::store(out + r * IB + c * VL, acc[r][c]);
}

// ot[r][lanes] = alpha[lanes] * ot[r][lanes] + sum_j v[j][r] * pt[j][lanes]
// for R value columns and C vectors of query lanes.
template <int R, int C>
void pv_micro(const float* v, int64_t ldv, const float* pt, int jn, float* ot,
              const float* alpha) {
  vf acc[R][C];
  vf al[C];
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) al[c] = simd::load(alpha + c * VL);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = simd::mul(simd::load(ot + r * IB + c * VL), al[c]);
#pragma GCC unroll 2
  for (int j = 0; j < jn; ++j) {
    vf pv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) pv[c] = simd::load(pt + j * IB + c * VL);
    const float* vr = v + j * ldv;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vf vb = simd::set1(vr[r]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = simd::fma(vb, pv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) simd::store(ot + r * IB + c * VL, acc[r][c]);
}

using QkFn = void (*)(const float*, int64_t, const float*, int64_t, float*);
using PvFn = void (*)(const float*, int64_t, const float*, int, float*, const float*);

// Tables of every (R, C) instance, for the ragged edges of a tile.
template <size_t... I>
struct MicroTables {
  static constexpr QkFn qk[] = {&qk_micro<int(I) / RI + 1, int(I) % RI + 1>...};
  static constexpr PvFn pv[] = {&pv_micro<int(I) / RI + 1, int(I) % RI + 1>...};
};
template <size_t... I>
MicroTables<I...> make_tables(std::index_sequence<I...>);
using Tables = decltype(make_tables(std::make_index_sequence<RJ * RI>{}));

// ----------------------------------------------------------------------------------------
// Attention

struct Tile {
  int64_t j0;
  int32_t jn;
  bool boundary;     // some element of the tile may be disallowed: check each one
  bool has_global;   // holds a global key (which ignores the window)
  int64_t g0;        // first global token at or after the tile start (index into the list)
};

// Per-call constants shared by all work items.
struct Ctx {
  const AttnArgs* a;
  int64_t group;  // query heads per kv head
  int64_t coff;   // causal: key j allowed iff j <= i + coff
  int64_t off;    // aligned key position of query row i: c = i + off
  bool window;
  int64_t wl, wr, dil;       // window, clamped so products cannot overflow
  const int64_t* globals;  // sorted global key positions; null without window or globals
  int64_t n_globals;
  const int64_t* gtiles;  // key tiles holding a global token
  int64_t n_gtiles;
  bool natural;          // modifiers need scores in natural units before conversion to base 2
  int64_t n_qt;          // query tiles per (batch, head)
  const int64_t* order;  // (batch, query tile) pairs, most work first
};

// Keys [js, je) of a tile (tile-relative) that some lane of a lane block may attend to.
struct KeyRange {
  int js, je;
};

struct Scratch {
  Buf<float> qt, st, ot, m, l, alpha, cpos, lsev;
  Buf<int64_t> rows, grows;
  Buf<Tile> tiles;
};
thread_local Scratch tls_scratch;

// Index of the first global token >= pos.
int64_t first_global_at_or_after(const Ctx& c, int64_t pos) {
  return lower_bound64(c.globals, c.n_globals, pos);
}

bool is_global(const Ctx& c, int64_t pos) {
  if (c.globals == nullptr) return false;
  const int64_t g = first_global_at_or_after(c, pos);
  return g < c.n_globals && c.globals[g] == pos;
}

// The key tiles a set of query rows [imin, imax] must visit, with their boundary flags, in
// `out` (grown as needed: its size follows the keys visited, not Lk).
size_t plan_tiles(const Ctx& c, int64_t b, int64_t imin, int64_t imax, bool ignore_window,
                  Buf<Tile>& buf) {
  const AttnArgs& a = *c.a;
  int64_t jend = a.Lk;
  if (a.key_lengths) jend = min64(jend, a.key_lengths[b]);
  if (a.causal) jend = min64(jend, imax + c.coff + 1);
  if (jend <= 0) return 0;
  const bool win = c.window && !ignore_window;
  int64_t lo = 0, hi = jend - 1;
  if (win) {
    if (c.wl >= 0) lo = max64(lo, imin + c.off - c.wl * c.dil);
    if (c.wr >= 0) hi = min64(hi, imax + c.off + c.wr * c.dil);
  }
  int64_t t0 = 0, t1 = -1;
  if (lo <= hi) {
    t0 = lo / BC;
    t1 = hi / BC;
  }
  Tile* out = buf.get(size_t(t1 - t0 + 1 + (win ? c.n_gtiles : 0)));
  size_t n = 0;
  auto add = [&](int64_t t) {
    Tile& T = out[n++];
    T.j0 = t * BC;
    T.jn = int32_t(min64(BC, jend - T.j0));
    const int64_t jlast = T.j0 + T.jn - 1;
    bool bnd = a.bool_mask != nullptr;
    if (a.causal && jlast > imin + c.coff) bnd = true;
    if (win) {
      if (c.dil > 1) bnd = true;
      if (c.wl >= 0 && T.j0 < imax + c.off - c.wl * c.dil) bnd = true;
      if (c.wr >= 0 && jlast > imin + c.off + c.wr * c.dil) bnd = true;
    }
    T.boundary = bnd;
    T.has_global = false;
    T.g0 = 0;
    if (c.globals) {
      T.g0 = first_global_at_or_after(c, T.j0);
      T.has_global = T.g0 < c.n_globals && c.globals[T.g0] <= jlast;
    }
  };
  for (int64_t t = t0; t <= t1; ++t) add(t);
  // Global keys are visible from every row: visit their tiles even outside the band.
  if (win)
    for (int64_t g = 0; g < c.n_gtiles; ++g) {
      const int64_t t = c.gtiles[g];
      if ((t < t0 || t > t1) && t * BC < jend) add(t);
    }
  return n;
}

struct RowSet {
  const int64_t* rows;  // query row of each lane
  int n;                // valid lanes
  int nvec;             // vectors covering the valid lanes
  bool ignore_window;   // global query rows see every key
  bool contiguous;      // rows[l] == rows[0] + l
};

// A lane block: vectors [iv, iv + C) of the row set, i.e. one micro-tile width. Each tile is
// processed block by block (scores, softmax, P.V); each block has its own contiguous slices of
// Qt [d][IB], St [key][IB] and Ot [dv][IB], which stay in L1 between the steps.
struct Block {
  int iv, C;
  int l0, l1;  // valid lanes [l0, l1)
  float* qt;
  float* st;
  float* ot;
};

// The keys of tile t that some lane of block k may attend to. Outside this range the block's
// scores are -inf and its P rows zero, so Q.K and P.V skip them: along a causal diagonal or a
// window edge this saves a large part of a boundary tile.
KeyRange key_range(const Ctx& c, const RowSet& rs, const Tile& t, const Block& k) {
  const AttnArgs& a = *c.a;
  if (!t.boundary || !rs.contiguous || a.bool_mask || t.has_global) return {0, t.jn};
  const int64_t first = rs.rows[0] + k.l0, last = rs.rows[0] + k.l1 - 1;
  int64_t lo = t.j0, hi = t.j0 + t.jn - 1;
  if (a.causal) hi = min64(hi, last + c.coff);
  if (c.window && !rs.ignore_window) {
    if (c.wl >= 0) lo = max64(lo, first + c.off - c.wl * c.dil);
    if (c.wr >= 0) hi = min64(hi, last + c.off + c.wr * c.dil);
  }
  if (hi < lo) return {0, 0};
  return {int(lo - t.j0), int(hi - t.j0 + 1)};
}

// Sets St to -inf where the boolean constraints (bool mask, causal, window) disallow a key,
// for keys [kr.js, kr.je) and the lanes of block k. Called only for tiles that straddle a
// boundary; key_lengths is handled by tile truncation.
void apply_constraints(const Ctx& c, Scratch& s, const RowSet& rs, const Tile& t, int64_t b,
                       int64_t h, const Block& k, KeyRange kr) {
  const AttnArgs& a = *c.a;
  const int64_t* ms = a.mask_strides;
  const bool win = c.window && !rs.ignore_window;
  if (a.bool_mask == nullptr && rs.contiguous && (!win || c.dil == 1)) {
    // Consecutive rows i = i0 + l: each constraint allows an interval of lanes for key j.
    const int64_t i0 = rs.rows[0];
    int64_t g = t.g0;  // cursor over the (sorted) global tokens
    for (int jj = kr.js; jj < kr.je; ++jj) {
      const int64_t j = t.j0 + jj;
      int64_t lo = k.l0, hi = k.l1 - 1;
      if (a.causal) lo = max64(lo, j - c.coff - i0);  // j <= i + coff
      bool global = false;
      if (t.has_global) {
        while (g < c.n_globals && c.globals[g] < j) ++g;
        global = g < c.n_globals && c.globals[g] == j;
      }
      if (win && !global) {
        const int64_t d0 = j - c.off - i0;  // delta = d0 - l
        if (c.wl >= 0) hi = min64(hi, d0 + c.wl);
        if (c.wr >= 0) lo = max64(lo, d0 - c.wr);
      }
      float* row = k.st + jj * IB - k.l0;  // indexed by lane
      if (lo > hi) lo = hi = k.l1;        // nothing allowed
      for (int64_t l = k.l0; l < lo; ++l) row[l] = NEG_INF;
      for (int64_t l = hi + 1; l < k.l1; ++l) row[l] = NEG_INF;
    }
    return;
  }
  const uint8_t* bm = a.bool_mask ? a.bool_mask + b * ms[0] + h * ms[1] + t.j0 * ms[3] : nullptr;
  const int64_t lo = c.wl >= 0 ? -c.wl * c.dil : INT64_MIN;
  const int64_t hi = c.wr >= 0 ? c.wr * c.dil : INT64_MAX;
  int64_t g = t.g0;  // cursor over the (sorted) global tokens
  for (int jj = kr.js; jj < kr.je; ++jj) {
    const int64_t j = t.j0 + jj;
    float* row = k.st + jj * IB - k.l0;  // indexed by lane
    bool global = false;
    if (t.has_global) {
      while (g < c.n_globals && c.globals[g] < j) ++g;
      global = g < c.n_globals && c.globals[g] == j;
    }
    const bool check_win = win && !global;
    for (int l = k.l0; l < k.l1; ++l) {
      const int64_t i = rs.rows[l];
      bool ok = true;
      if (bm) ok = bm[i * ms[2] + jj * ms[3]] != 0;
      if (a.causal && j > i + c.coff) ok = false;
      if (check_win) {
        const int64_t delta = j - (i + c.off);
        if (delta < lo || delta > hi || (c.dil > 1 && delta % c.dil != 0)) ok = false;
      }
      if (!ok) row[l] = NEG_INF;
    }
  }
}

// St[j][lanes of block k] for the keys of tile t: scores with every modifier and constraint
// applied, for the keys of the returned range only (the others are disallowed).
KeyRange scores(const Ctx& c, Scratch& s, const RowSet& rs, const Tile& t, int64_t b,
                int64_t h, const Block& k, const float* kb) {
  const AttnArgs& a = *c.a;
  const int64_t ldk = a.sk[2];
  const int64_t* ms = a.mask_strides;
  float* st = k.st;
  const float* qt = k.qt;
  const KeyRange kr = key_range(c, rs, t, k);
  int jj = kr.js;
  if (k.C == RI)
    for (; jj + RJ <= kr.je; jj += RJ)
      qk_micro<RJ, RI>(kb + (t.j0 + jj) * ldk, ldk, qt, a.D, st + jj * IB);
  for (; jj < kr.je; jj += RJ) {
    const int R = int(min64(RJ, kr.je - jj));
    Tables::qk[(R - 1) * RI + (k.C - 1)](kb + (t.j0 + jj) * ldk, ldk, qt, a.D, st + jj * IB);
  }
  if (a.softcap > 0.0f) {
    const vf cap = simd::set1(a.softcap), inv = simd::set1(1.0f / a.softcap);
    for (jj = kr.js; jj < kr.je; ++jj)
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        simd::store(p, simd::mul(cap, simd::tanh(simd::mul(simd::load(p), inv))));
      }
  }
  if (a.alibi) {
    const vf slope = simd::set1(-a.alibi[h]);
    for (jj = kr.js; jj < kr.je; ++jj) {
      const vf jf = simd::set1(float(t.j0 + jj));
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        const vf dist = simd::abs(simd::sub(simd::load(s.cpos.p + (k.iv + v) * VL), jf));
        simd::store(p, simd::fma(slope, dist, simd::load(p)));
      }
    }
  }
  if (a.float_mask) {
    const float* fm = a.float_mask + b * ms[0] + h * ms[1] + t.j0 * ms[3];
    for (jj = kr.js; jj < kr.je; ++jj) {
      float* row = st + jj * IB - k.l0;  // indexed by lane
      const float* fmj = fm + jj * ms[3];
      for (int l = k.l0; l < k.l1; ++l) row[l] += fmj[rs.rows[l] * ms[2]];
    }
  }
  if (c.natural) {
    const vf log2e = simd::set1(LOG2E);
    for (jj = kr.js; jj < kr.je; ++jj)
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        simd::store(p, simd::mul(simd::load(p), log2e));
      }
  }
  if (t.boundary) apply_constraints(c, s, rs, t, b, h, k, kr);
  return kr;
}

// Online-softmax update of block k for the keys kr of one tile: turns St into P in place,
// updates m and l, and leaves the accumulator rescale factor in alpha.
void softmax_update(Scratch& s, const Block& k, KeyRange kr) {
  const vf ninf = simd::set1(NEG_INF);
  for (int v = k.iv; v < k.iv + k.C; ++v) {
    float* st = k.st + (v - k.iv) * VL;
    vf mt = ninf;
    for (int jj = kr.js; jj < kr.je; ++jj) mt = simd::max(mt, simd::load(st + jj * IB));
    const vf mo = simd::load(s.m.p + v * VL);
    const vf mn = simd::max(mo, mt);
    // Rows with nothing allowed yet keep m = -inf; shift by 0 there so that exp(-inf) = 0
    // instead of exp(-inf - -inf) = NaN.
    const vf mu = simd::select(simd::eq(mn, ninf), simd::zero(), mn);
    const vf al = simd::exp2(simd::sub(mo, mu));
    vf sum = simd::zero();
    for (int jj = kr.js; jj < kr.je; ++jj) {
      const vf e = simd::exp2(simd::sub(simd::load(st + jj * IB), mu));
      simd::store(st + jj * IB, e);
      sum = simd::add(sum, e);
    }
    simd::store(s.l.p + v * VL, simd::fma(simd::load(s.l.p + v * VL), al, sum));
    simd::store(s.m.p + v * VL, mn);
    simd::store(s.alpha.p + v * VL, al);
  }
}

// Ot = alpha * Ot + V^T P for block k over the keys kr of tile t. Skipping an empty range is
// exact: its lanes saw only -inf in this tile, so alpha is 1 (or Ot is still 0).
void pv_update(const AttnArgs& a, Scratch& s, const Tile& t, const Block& k, KeyRange kr,
               const float* vb) {
  if (kr.je <= kr.js) return;
  const int64_t ldv = a.sv[2];
  const float* vt = vb + (t.j0 + kr.js) * ldv;
  const float* pt = k.st + kr.js * IB;
  const float* al = s.alpha.p + k.iv * VL;
  float* ot = k.ot;
  const int jn = kr.je - kr.js;
  int64_t dv = 0;
  if (k.C == RI)
    for (; dv + RJ <= a.Dv; dv += RJ) pv_micro<RJ, RI>(vt + dv, ldv, pt, jn, ot + dv * IB, al);
  for (; dv < a.Dv; dv += RJ) {
    const int R = int(min64(RJ, a.Dv - dv));
    Tables::pv[(R - 1) * RI + (k.C - 1)](vt + dv, ldv, pt, jn, ot + dv * IB, al);
  }
}

// Attention for one set of query rows (one lane each) of batch b, head h.
void process_rows(const Ctx& c, Scratch& s, int64_t b, int64_t h, const RowSet& rs) {
  const AttnArgs& a = *c.a;
  const int64_t hk = h / c.group;
  const float* qb = a.q + b * a.sq[0] + h * a.sq[1];
  const float* kb = a.k + b * a.sk[0] + hk * a.sk[1];
  const float* vb = a.v + b * a.sv[0] + hk * a.sv[1];
  const int lanes = rs.nvec * VL;

  // Pack the query rows transposed and pre-scaled, block by block; padding lanes are zero.
  const float qscale = c.natural ? a.scale : a.scale * LOG2E;
  for (int l = 0; l < lanes; ++l) {
    float* qt = s.qt.p + (l / IB) * a.D * IB + l % IB;
    if (l < rs.n) {
      const float* qr = qb + rs.rows[l] * a.sq[2];
      for (int64_t d = 0; d < a.D; ++d) qt[d * IB] = qr[d] * qscale;
    } else {
      for (int64_t d = 0; d < a.D; ++d) qt[d * IB] = 0.0f;
    }
  }
  int64_t imin = rs.rows[0], imax = rs.rows[0];
  for (int l = 0; l < lanes; ++l) {
    const int64_t i = l < rs.n ? rs.rows[l] : rs.rows[0];
    if (l < rs.n) {
      imin = min64(imin, i);
      imax = max64(imax, i);
    }
    s.cpos.p[l] = float(i + c.off);
    s.m.p[l] = NEG_INF;
    s.l.p[l] = 0.0f;
  }
  std::memset(s.ot.p, 0, sizeof(float) * size_t(a.Dv) * BR);

  Block blocks[NBLK];
  int nblocks = 0;
  for (int iv = 0; iv < rs.nvec; iv += RI, ++nblocks) {
    const int C = int(min64(RI, rs.nvec - iv));
    blocks[nblocks] = Block{iv, C, iv * VL, int(min64(rs.n, (iv + C) * VL)),
                            s.qt.p + nblocks * a.D * IB, s.st.p + nblocks * BC * IB,
                            s.ot.p + nblocks * a.Dv * IB};
  }

  const size_t nt = plan_tiles(c, b, imin, imax, rs.ignore_window, s.tiles);
  for (size_t ti = 0; ti < nt; ++ti) {
    const Tile& t = s.tiles.p[ti];
    for (int bi = 0; bi < nblocks; ++bi) {
      const Block& k = blocks[bi];
      const KeyRange kr = scores(c, s, rs, t, b, h, k, kb);
      softmax_update(s, k, kr);
      pv_update(a, s, t, k, kr, vb);
    }
  }

  // out = Ot / l; lse = m + log(l) (m is in base 2). Rows with no allowed key get 0, -inf.
  float* ob = a.out + b * a.so[0] + h * a.so[1];
  float* lb = a.lse + (b * a.Hq + h) * a.Lq;
  for (int l = 0; l < rs.n; ++l) {
    const float L = s.l.p[l];
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    float* orow = ob + rs.rows[l] * a.so[2];
    const float* ot = s.ot.p + (l / IB) * a.Dv * IB + l % IB;
    for (int64_t dv = 0; dv < a.Dv; ++dv) orow[dv] = ot[dv * IB] * inv;
    lb[rs.rows[l]] = L > 0.0f ? s.m.p[l] * LN2 + std::log(L) : NEG_INF;
    // Base-2 shift for the weights pass; +inf makes every weight of an empty row 2^-inf = 0.
    s.lsev.p[l] = L > 0.0f ? s.m.p[l] + std::log2(L) : INFINITY;
  }
  for (int l = rs.n; l < lanes; ++l) s.lsev.p[l] = INFINITY;

  if (!a.weights) return;
  // Second pass: recompute each visited tile and write exp(s - lse) with the final lse.
  float* wb = a.weights + (b * a.Hq + h) * a.Lq * a.Lk;
  for (int l = 0; l < rs.n; ++l)
    std::memset(wb + rs.rows[l] * a.Lk, 0, sizeof(float) * size_t(a.Lk));
  for (size_t ti = 0; ti < nt; ++ti) {
    const Tile& t = s.tiles.p[ti];
    for (int bi = 0; bi < nblocks; ++bi) {
      const Block& k = blocks[bi];
      const KeyRange kr = scores(c, s, rs, t, b, h, k, kb);
      for (int v = k.iv; v < k.iv + k.C; ++v) {
        const vf shift = simd::load(s.lsev.p + v * VL);
        float* st = k.st + (v - k.iv) * VL;
        for (int jj = kr.js; jj < kr.je; ++jj)
          simd::store(st + jj * IB, simd::exp2(simd::sub(simd::load(st + jj * IB), shift)));
      }
      for (int l = k.l0; l < k.l1; ++l) {
        const float* st = k.st + (l - k.l0);
        float* wrow = wb + rs.rows[l] * a.Lk + t.j0;
        for (int jj = kr.js; jj < kr.je; ++jj) wrow[jj] = st[jj * IB];
      }
    }
  }
}

void attention_item(void* p, int64_t item) {
  const Ctx& c = *static_cast<const Ctx*>(p);
  const AttnArgs& a = *c.a;
  const int64_t k = item / a.Hq, h = item % a.Hq;
  const int64_t bq = c.order[k];
  const int64_t b = bq / c.n_qt, qtile = bq % c.n_qt;

  Scratch& s = tls_scratch;
  s.qt.get(size_t(a.D) * BR);
  s.st.get(size_t(BC) * BR);
  s.ot.get(size_t(a.Dv > 0 ? a.Dv : 1) * BR);
  s.m.get(BR);
  s.l.get(BR);
  s.alpha.get(BR);
  s.cpos.get(BR);
  s.lsev.get(BR);
  int64_t* rows = s.rows.get(BR);
  int64_t* grows = s.grows.get(BR);

  const int64_t i0 = qtile * BR;
  const int n = int(min64(BR, a.Lq - i0));
  for (int l = 0; l < n; ++l) rows[l] = i0 + l;
  process_rows(c, s, b, h, RowSet{rows, n, (n + VL - 1) / VL, false, true});

  // Query rows aligned to a global token ignore the window: redo them over all keys (same
  // thread, so the overwrite cannot race).
  if (c.globals) {
    int ng = 0;
    for (int l = 0; l < n; ++l)
      if (is_global(c, rows[l] + c.off)) grows[ng++] = rows[l];
    if (ng > 0) process_rows(c, s, b, h, RowSet{grows, ng, (ng + VL - 1) / VL, true, false});
  }
}

void attention_impl(const AttnArgs& a) {
  if (a.B == 0 || a.Hq == 0 || a.Lq == 0) return;
  Ctx c{};
  c.a = &a;
  c.group = a.Hq / a.Hkv;
  c.off = a.Lk - a.Lq;
  c.coff = a.causal == 2 ? c.off : 0;
  c.window = a.window_left >= 0 || a.window_right >= 0 || a.dilation > 1;
  c.natural = a.softcap > 0.0f || a.alibi != nullptr || a.float_mask != nullptr;
  // Beyond Lq + Lk the window bounds no longer change anything; clamping keeps products small.
  const int64_t lim = a.Lq + a.Lk + 1;
  c.wl = a.window_left < 0 ? -1 : min64(a.window_left, lim);
  c.wr = a.window_right < 0 ? -1 : min64(a.window_right, lim);
  c.dil = min64(max64(a.dilation, 1), lim);

  // Global tokens only matter with a window.
  Buf<int64_t> gtiles;
  if (c.window && a.n_global > 0) {
    int64_t* gt = gtiles.get(size_t(a.n_global));
    int64_t ng = 0;
    for (int64_t i = 0; i < a.n_global; ++i) {
      const int64_t t = a.global_tokens[i] / BC;
      if (ng == 0 || gt[ng - 1] != t) gt[ng++] = t;  // positions are sorted
    }
    c.globals = a.global_tokens;
    c.n_globals = a.n_global;
    c.gtiles = gt;
    c.n_gtiles = ng;
  }

  // Hand out the (batch, query tile) pairs with the most keys to visit first (causal and
  // key_lengths make the work uneven); a counting sort on a coarse cost keeps this O(n).
  c.n_qt = (a.Lq + BR - 1) / BR;
  const int64_t nbq = a.B * c.n_qt;
  Buf<int64_t> cost, order;
  int64_t* cs = cost.get(size_t(nbq));
  int64_t* od = order.get(size_t(nbq));
  {
    Buf<Tile> tiles;
    int64_t maxc = 0;
    for (int64_t bq = 0; bq < nbq; ++bq) {
      const int64_t b = bq / c.n_qt, i0 = (bq % c.n_qt) * BR;
      const int64_t i1 = min64(a.Lq, i0 + BR) - 1;
      const size_t nt = plan_tiles(c, b, i0, i1, false, tiles);
      int64_t keys = 0;
      for (size_t t = 0; t < nt; ++t) keys += tiles.p[t].jn;
      cs[bq] = keys * (i1 - i0 + 1);  // rows x keys visited
      maxc = max64(maxc, cs[bq]);
    }
    constexpr int NB = 256;
    int64_t count[NB + 1] = {0};
    for (int64_t bq = 0; bq < nbq; ++bq) {
      cs[bq] = maxc > 0 ? (NB - 1) - cs[bq] * (NB - 1) / maxc : 0;  // bucket, largest first
      ++count[cs[bq] + 1];
    }
    for (int i = 0; i < NB; ++i) count[i + 1] += count[i];
    for (int64_t bq = 0; bq < nbq; ++bq) od[count[cs[bq]]++] = bq;
  }
  c.order = od;

  parallel_for(nbq * a.Hq, a.num_threads, &attention_item, &c);
}

}  // namespace

void attention(const AttnArgs& a) { attention_impl(a); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
