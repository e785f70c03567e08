// The attention kernel. Like every file in kernels/, it is compiled once per instruction set
// (CMake passes -DATTN_ISA_NS=isa_xxx plus that ISA's -m flags), so everything lives in a
// per-ISA namespace, mostly an anonymous one: no inline function or template instance may be
// shared with another TU (the linker could otherwise keep an AVX copy for baseline callers).
//
// Algorithm (FlashAttention with an online softmax, laid out like ggml's tiled CPU kernel):
// a work item is one (plan item, head): a group of query rows (at most BR, one SIMD lane
// each) and the key spans the mask plan (masking.h) lists for it. The rows are packed
// transposed and pre-scaled (Qt[d][lane]); the score tile is computed transposed,
// St[key][lane], so that the softmax statistics of a query row live in one SIMD lane: the row
// max, the rescale factor and the row sum are plain vertical vector ops, and the accumulator
// Ot[dv][lane] is updated by broadcasting V[key][dv] against P rows. K and V are read in their
// natural layout (with a stride for a dilated window's keys; global tokens are gathered).
// For each chunk of at most BC keys of a span, and each lane block (one micro-tile width of
// query rows):
//   St   = K_chunk . Qt                     (register-blocked RJ x RI-vector micro-kernel)
//   St   = softcap / ALiBi / float mask / -inf for disallowed keys (partial spans only)
//   m'   = max(m, max_j St[j])              (row max)
//   a    = 2^(m - m'),  P = 2^(St - m')     (vectorised 2^x, 2^-inf = 0)
//   l    = a * l + sum_j P[j]               (row sum)
//   Ot   = a * Ot + V_chunk^T . P           (rescale folded into the P.V micro-kernel)
// and at the end out = Ot / l, lse = (m + log2 l) * ln 2. Scores are kept in base-2 units
// (s * log2 e, folded into the packed Q unless a modifier needs natural units), which makes the
// exponentials cheaper. Only the keys the plan lists are visited, and within a partial span
// each lane block only computes the keys some of its rows may see, so a window of width W
// costs O(L * W) and a causal mask about half the dense work. Extra memory is O(tile) per
// thread.
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

#include "mask_rule.h"
#include "tile_util.h"

#if defined(__AVX512F__)
constexpr int RJ = 8;  // micro-tile rows: keys (Q.K) or value columns (P.V)
constexpr int RI = 3;  // micro-tile width in vectors of query lanes
#else
constexpr int RJ = 4;
constexpr int RI = 3;
#endif
constexpr int IB = RI * VL;                      // lanes (query rows) per lane block
constexpr int BR = kAttentionTiles.max_rows;     // query rows per group, at most
constexpr int BC = 128;                          // keys per chunk
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

// Per-call constants shared by all work items.
struct Ctx {
  const AttnArgs* a;
  const MaskRule* rule;
  const MaskPlan* plan;
  int64_t group;  // query heads per kv head
  bool natural;   // modifiers need scores in natural units before conversion to base 2
};

// The rows of one plan group, one lane each.
struct Rows {
  RowCtx x;             // what the mask rule needs about them
  const int64_t* rows;  // query row of each lane
  int n;                // valid lanes
  int nvec;             // vectors covering the valid lanes
  int64_t rs;           // rows[l] = rows[0] + l * rs; 0: no such progression
};

// At most BC keys of a span: key m is at position key(m), its K and V rows at kp + m * ldk and
// vp + m * ldv (a dilated window's keys are strided, global tokens gathered into scratch).
struct Chunk {
  int64_t j0, kstride;  // key(m) = j0 + m * kstride, unless keys
  const int64_t* keys;  // positions of gathered keys, or null
  int jn;
  uint32_t checks;  // the parts of the mask rule to apply (0: none, a full span)
  const float* kp;
  int64_t ldk;
  const float* vp;
  int64_t ldv;
  int64_t key(int m) const { return keys ? keys[m] : j0 + m * kstride; }
};

// Keys [js, je) of a chunk that some lane of a lane block may attend to.
struct KeyRange {
  int js, je;
};

struct Scratch {
  Buf<float> qt, st, ot, m, l, alpha, cpos, lsev, kg, vg;
  Buf<int64_t> rows;
};
thread_local Scratch tls_scratch;

// A lane block: vectors [iv, iv + C) of the rows, i.e. one micro-tile width. Each chunk is
// processed block by block (scores, softmax, P.V); each block has its own contiguous slices of
// Qt [d][IB], St [key][IB] and Ot [dv][IB], which stay in L1 between the steps.
struct Block {
  int iv, C;
  int l0, l1;  // valid lanes [l0, l1)
  float* qt;
  float* st;
  float* ot;
};

// Keys [m0, m0 + BC) of span sp, for batch b and kv head hk.
Chunk chunk(const Ctx& c, Scratch& s, const PlanSpan& sp, int64_t m0, int64_t b, int64_t hk) {
  const AttnArgs& a = *c.a;
  const float* kb = a.k + b * a.sk[0] + hk * a.sk[1];
  const float* vb = a.v + b * a.sv[0] + hk * a.sv[1];
  Chunk ch{};
  ch.jn = int(min64(BC, sp.n - m0));
  ch.checks = sp.checks;
  if (sp.kstride > 0) {
    ch.j0 = sp.j0 + m0 * sp.kstride;
    ch.kstride = sp.kstride;
    ch.kp = kb + ch.j0 * a.sk[2];
    ch.ldk = a.sk[2] * sp.kstride;
    ch.vp = vb + ch.j0 * a.sv[2];
    ch.ldv = a.sv[2] * sp.kstride;
    return ch;
  }
  // Global tokens: gather their K and V rows into dense scratch.
  ch.keys = c.rule->globals + sp.j0 + m0;
  float* kg = s.kg.p;
  float* vg = s.vg.p;
  for (int m = 0; m < ch.jn; ++m) {
    std::memcpy(kg + m * a.D, kb + ch.keys[m] * a.sk[2], sizeof(float) * size_t(a.D));
    std::memcpy(vg + m * a.Dv, vb + ch.keys[m] * a.sv[2], sizeof(float) * size_t(a.Dv));
  }
  ch.kp = kg;
  ch.ldk = a.D;
  ch.vp = vg;
  ch.ldv = a.Dv;
  return ch;
}

// The keys of chunk ch that some lane of block k may attend to: outside this range the block's
// scores are -inf and its P rows zero, so Q.K and P.V skip them. Along a causal diagonal or a
// window edge this saves a large part of a partial span.
KeyRange key_range(const Rows& rs, const Chunk& ch, const Block& k) {
  if (!(ch.checks & kCheckRange) || rs.rs == 0 || ch.keys) return {0, ch.jn};
  const int64_t lo = key_lo(rs.x, rs.rows[k.l0]), hi = key_hi(rs.x, rs.rows[k.l1 - 1]);
  const int64_t js = max64(0, ceil_div(lo - ch.j0, ch.kstride));
  const int64_t je = min64(ch.jn, floor_div(hi - ch.j0, ch.kstride) + 1);
  if (je <= js) return {0, 0};
  return {int(js), int(je)};
}

// Sets St to -inf where the mask rule disallows a key, for keys kr of chunk ch and the lanes
// of block k (partial spans only).
void apply_mask(const Ctx& c, const Rows& rs, const Chunk& ch, const Block& k, KeyRange kr) {
  const MaskRule& r = *c.rule;
  const uint32_t checks = ch.checks;
  // Rows and keys in arithmetic progression and only the interval parts of the rule: each key
  // allows an interval of lanes.
  const bool lanes = rs.rs > 0 && !ch.keys && !(checks & (kCheckMask | kCheckLayout));
  const bool skips = (checks & kGlobalsElsewhere) != 0;
  int64_t g = skips ? first_global(r, ch.key(kr.js)) : 0;  // cursor over the global tokens
  for (int jj = kr.js; jj < kr.je; ++jj) {
    const int64_t j = ch.key(jj);
    float* row = k.st + jj * IB - k.l0;  // indexed by lane
    bool global = ch.keys != nullptr;
    if (skips) {
      while (g < r.n_globals && r.globals[g] < j) ++g;
      global = g < r.n_globals && r.globals[g] == j;
    }
    if (skipped_here(checks, global)) {
      for (int l = k.l0; l < k.l1; ++l) row[l] = NEG_INF;
    } else if (lanes) {
      if (!(checks & kCheckRange)) continue;
      int64_t lo = k.l0, hi = k.l1 - 1;
      allowed_lanes(rs.x, rs.rows[0], rs.rs, j, lo, hi);
      if (lo > hi) lo = hi = k.l1;  // nothing allowed
      for (int64_t l = k.l0; l < lo; ++l) row[l] = NEG_INF;
      for (int64_t l = hi + 1; l < k.l1; ++l) row[l] = NEG_INF;
    } else {
      for (int l = k.l0; l < k.l1; ++l)
        if (!allowed(rs.x, checks, rs.rows[l], j, global)) row[l] = NEG_INF;
    }
  }
}

// St[j][lanes of block k] for the keys of chunk ch: scores with every modifier and the mask
// applied, for the keys of the returned range only (the others are disallowed).
KeyRange scores(const Ctx& c, Scratch& s, const Rows& rs, const Chunk& ch, int64_t b, int64_t h,
                const Block& k) {
  const AttnArgs& a = *c.a;
  const int64_t ldk = ch.ldk;
  float* st = k.st;
  const float* qt = k.qt;
  const KeyRange kr = key_range(rs, ch, k);
  int jj = kr.js;
  if (k.C == RI)
    for (; jj + RJ <= kr.je; jj += RJ) qk_micro<RJ, RI>(ch.kp + jj * ldk, ldk, qt, a.D, st + jj * IB);
  for (; jj < kr.je; jj += RJ) {
    const int R = int(min64(RJ, kr.je - jj));
    Tables::qk[(R - 1) * RI + (k.C - 1)](ch.kp + jj * ldk, ldk, qt, a.D, st + jj * IB);
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
      const vf jf = simd::set1(float(ch.key(jj)));
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        const vf dist = simd::abs(simd::sub(simd::load(s.cpos.p + (k.iv + v) * VL), jf));
        simd::store(p, simd::fma(slope, dist, simd::load(p)));
      }
    }
  }
  if (a.float_mask) {
    const int64_t* ms = a.float_mask_strides;
    const float* fm = a.float_mask + b * ms[0] + h * ms[1];
    for (jj = kr.js; jj < kr.je; ++jj) {
      float* row = st + jj * IB - k.l0;  // indexed by lane
      const float* fmj = fm + ch.key(jj) * ms[3];
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
  if (ch.checks) apply_mask(c, rs, ch, k, kr);
  return kr;
}

// Online-softmax update of block k for the keys kr of one chunk: turns St into P in place,
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

// Ot = alpha * Ot + V^T P for block k over the keys kr of chunk ch. Skipping an empty range is
// exact: its lanes saw only -inf in this chunk, so alpha is 1 (or Ot is still 0).
void pv_update(const AttnArgs& a, Scratch& s, const Chunk& ch, const Block& k, KeyRange kr) {
  if (kr.je <= kr.js) return;
  const int64_t ldv = ch.ldv;
  const float* vt = ch.vp + kr.js * ldv;
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

// The weights row of query row i, or -1.
int64_t weight_row(const AttnArgs& a, int64_t i) {
  return a.weight_index ? a.weight_index[i] : i;
}

// Attention for one plan group of batch b, head h over its spans [sp0, sp1).
void process_group(const Ctx& c, Scratch& s, const PlanGroup& g, int64_t h, const PlanSpan* sp0,
                   const PlanSpan* sp1) {
  const AttnArgs& a = *c.a;
  const int64_t b = g.b, hk = h / c.group;
  const float* qb = a.q + b * a.sq[0] + h * a.sq[1];
  Rows rs{row_ctx(*c.rule, g, h), s.rows.p, g.n, (g.n + VL - 1) / VL, g.rstride};
  int64_t* rows = s.rows.p;
  for (int l = 0; l < g.n; ++l)
    rows[l] = g.rstride ? g.i0 + l * g.rstride : c.plan->rows[g.i0 + l];
  const int lanes = rs.nvec * VL;

  // Pack the query rows transposed and pre-scaled, block by block; padding lanes are zero.
  const float qscale = c.natural ? a.scale : a.scale * LOG2E;
  for (int l = 0; l < lanes; ++l) {
    float* qt = s.qt.p + (l / IB) * a.D * IB + l % IB;
    if (l < rs.n) {
      const float* qr = qb + rows[l] * a.sq[2];
      for (int64_t d = 0; d < a.D; ++d) qt[d * IB] = qr[d] * qscale;
    } else {
      for (int64_t d = 0; d < a.D; ++d) qt[d * IB] = 0.0f;
    }
  }
  for (int l = 0; l < lanes; ++l) {
    s.cpos.p[l] = float((l < rs.n ? rows[l] : rows[0]) + rs.x.d->shift);  // for ALiBi
    s.m.p[l] = NEG_INF;
    s.l.p[l] = 0.0f;
  }

  Block blocks[NBLK];
  int nblocks = 0;
  for (int iv = 0; iv < rs.nvec; iv += RI, ++nblocks) {
    const int C = int(min64(RI, rs.nvec - iv));
    blocks[nblocks] = Block{iv, C, iv * VL, int(min64(rs.n, (iv + C) * VL)),
                            s.qt.p + nblocks * a.D * IB, s.st.p + nblocks * BC * IB,
                            s.ot.p + nblocks * a.Dv * IB};
  }
  std::memset(s.ot.p, 0, sizeof(float) * size_t(a.Dv * IB * nblocks));

  for (const PlanSpan* sp = sp0; sp != sp1; ++sp)
    for (int64_t m0 = 0; m0 < sp->n; m0 += BC) {
      const Chunk ch = chunk(c, s, *sp, m0, b, hk);
      for (int bi = 0; bi < nblocks; ++bi) {
        const Block& k = blocks[bi];
        const KeyRange kr = scores(c, s, rs, ch, b, h, k);
        softmax_update(s, k, kr);
        pv_update(a, s, ch, k, kr);
      }
    }

  // out = Ot / l; lse = m + log(l) (m is in base 2). Rows with no allowed key get 0, -inf.
  float* ob = a.out + b * a.so[0] + h * a.so[1];
  float* lb = a.lse + (b * a.Hq + h) * a.Lq;
  for (int l = 0; l < rs.n; ++l) {
    const float L = s.l.p[l];
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    float* orow = ob + rows[l] * a.so[2];
    const float* ot = s.ot.p + (l / IB) * a.Dv * IB + l % IB;
    for (int64_t dv = 0; dv < a.Dv; ++dv) orow[dv] = ot[dv * IB] * inv;
    lb[rows[l]] = L > 0.0f ? s.m.p[l] * LN2 + std::log(L) : NEG_INF;
    // Base-2 shift for the weights pass; +inf makes every weight of an empty row 2^-inf = 0.
    s.lsev.p[l] = L > 0.0f ? s.m.p[l] + std::log2(L) : INFINITY;
  }
  for (int l = rs.n; l < lanes; ++l) s.lsev.p[l] = INFINITY;

  if (!a.weights) return;
  // Second pass, for the blocks holding rows whose weights were asked for: recompute each
  // visited chunk and write exp(s - lse) with the final lse.
  float* wb = a.weights + (b * a.Hq + h) * a.n_weight_rows * a.Lk;
  bool wanted[NBLK] = {};
  bool any = false;
  for (int bi = 0; bi < nblocks; ++bi)
    for (int l = blocks[bi].l0; l < blocks[bi].l1; ++l)
      if (weight_row(a, rows[l]) >= 0) {
        std::memset(wb + weight_row(a, rows[l]) * a.Lk, 0, sizeof(float) * size_t(a.Lk));
        wanted[bi] = any = true;
      }
  if (!any) return;
  for (const PlanSpan* sp = sp0; sp != sp1; ++sp)
    for (int64_t m0 = 0; m0 < sp->n; m0 += BC) {
      const Chunk ch = chunk(c, s, *sp, m0, b, hk);
      for (int bi = 0; bi < nblocks; ++bi) {
        if (!wanted[bi]) continue;
        const Block& k = blocks[bi];
        const KeyRange kr = scores(c, s, rs, ch, b, h, k);
        for (int v = k.iv; v < k.iv + k.C; ++v) {
          const vf shift = simd::load(s.lsev.p + v * VL);
          float* st = k.st + (v - k.iv) * VL;
          for (int jj = kr.js; jj < kr.je; ++jj)
            simd::store(st + jj * IB, simd::exp2(simd::sub(simd::load(st + jj * IB), shift)));
        }
        for (int l = k.l0; l < k.l1; ++l) {
          const int64_t w = weight_row(a, rows[l]);
          if (w < 0) continue;
          const float* st = k.st + (l - k.l0);
          float* wrow = wb + w * a.Lk;
          for (int jj = kr.js; jj < kr.je; ++jj) wrow[ch.key(jj)] = st[jj * IB];
        }
      }
    }
}

void attention_item(void* p, int64_t work) {
  const Ctx& c = *static_cast<const Ctx*>(p);
  const AttnArgs& a = *c.a;
  const MaskPlan& plan = *c.plan;
  const int64_t h = work % a.Hq;
  const PlanItem& item = plan.items[work / a.Hq];

  Scratch& s = tls_scratch;
  s.qt.get(size_t(a.D) * BR);
  s.st.get(size_t(BC) * BR);
  s.ot.get(size_t(a.Dv > 0 ? a.Dv : 1) * BR);
  s.m.get(BR);
  s.l.get(BR);
  s.alpha.get(BR);
  s.cpos.get(BR);
  s.lsev.get(BR);
  s.kg.get(size_t(a.D) * BC);
  s.vg.get(size_t(a.Dv > 0 ? a.Dv : 1) * BC);
  s.rows.get(BR);

  // Groups in order: a group of global rows overrides the results of the group before it
  // (same thread, so the overwrite cannot race).
  const int64_t hp = plan.n_heads > 1 ? h : 0;
  for (int64_t g = item.g0; g < item.g1; ++g) {
    const int64_t* sp = plan.span_ptr + hp * plan.n_groups + g;
    process_group(c, s, plan.groups[g], h, plan.spans + sp[0], plan.spans + sp[1]);
  }
}

void attention_impl(const AttnArgs& a) {
  if (a.B == 0 || a.Hq == 0 || a.Lq == 0) return;
  Ctx c{};
  c.a = &a;
  c.rule = a.rule;
  c.plan = a.plan;
  c.group = a.Hq / a.Hkv;
  c.natural = a.softcap > 0.0f || a.alibi != nullptr || a.float_mask != nullptr;
  parallel_for(c.plan->n_items * a.Hq, a.num_threads, &attention_item, &c);
}

}  // namespace

void attention(const AttnArgs& a) { attention_impl(a); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
