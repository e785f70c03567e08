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
//
// Inputs are float32, bfloat16 or float16 (ElemType), read as they are: a tile is converted
// when it is loaded, never the whole tensor. Two compute modes (Precision):
//   fp32  Q is packed as floats, K and V chunks are read in place (float32 input) or converted
//         into float scratch; products and sums in float32 (FMA).
//   bf16  Q is packed as bf16 pairs along d (Qp[d/2][lane], unscaled: the scale multiplies the
//         float32 scores), K rows are read as bf16 pairs (in place for bfloat16 input), V is
//         repacked per chunk into pairs of consecutive keys (Vp[key/2][dv]) and P into pairs
//         along the keys (Pp[key/2][lane]); both products are VDPBF16PS (elements.h: the
//         instruction, or its exact emulation) accumulating in float32. The softmax statistics
//         (m, l, alpha) stay float32; P is rounded to bf16 only as the operand of P.V.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

#include "entries.h"
#include "thread_pool.h"

namespace attn {
namespace ATTN_ISA_NS {
namespace {

#include "mask_rule.h"
#include "tile_util.h"
#include "elements.h"

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

// The arithmetic of the compute modes (see the top of the file): the element types of the
// operands, and what the micro-kernels broadcast from a row. The micro-kernels are instantiated
// on these, not on the input type.
struct Fp32Math {
  static constexpr bool kPairs = false;
  using KElem = float;  // K chunk rows
  using VElem = float;  // V chunk rows
  using QElem = float;  // packed Q
  using Op = vf;        // an operand of dot (PairDot's counterpart)
  static Op split(vf x) { return x; }
  static vf dot(vf acc, Op a, Op b) { return simd::fma(b, a, acc); }
  static vf bcast(const float* p) { return simd::set1(*p); }
  static Op lanes(const QElem* p) { return split(simd::load(p)); }
};
struct Bf16Math : PairDot {
  static constexpr bool kPairs = true;
  using KElem = uint16_t;  // bf16 rows, read as 32-bit pairs along d
  using VElem = uint32_t;  // rows of (V[2q][dv], V[2q+1][dv]) pairs
  using QElem = uint32_t;  // (q[2p], q[2p+1]) pairs
  static vf bcast(const void* p) { return bcast32(p); }
  static Op lanes(const QElem* p) { return split(simd::load(reinterpret_cast<const float*>(p))); }
};

// out[r][lanes] = sum_s k[r][s] . q[s][lanes] for R keys and C vectors of query lanes (q and out
// rows are IB lanes apart), over n steps: elements of d (fp32), or pairs along d with k's bf16
// rows read as 32-bit pairs (bf16, whose sums are then scaled by sscale; fp32 has the scale in q).
template <class X, int R, int C>
void qk_micro(const typename X::KElem* k, int64_t ldk, const typename X::QElem* q, int64_t n,
              float* out, float sscale) {
  vf acc[R][C];
  const typename X::KElem* kr[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    kr[r] = k + r * ldk;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = simd::zero();
  }
  constexpr int step = X::kPairs ? 2 : 1;  // elements of a k row per step
#pragma GCC unroll 2
  for (int64_t s = 0; s < n; ++s) {
    typename X::Op qv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) qv[c] = X::lanes(q + s * IB + c * VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename X::Op kv = X::split(X::bcast(kr[r] + step * s));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = X::dot(acc[r][c], qv[c], kv);
    }
  }
  const vf sc = simd::set1(sscale);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c)
      simd::store(out + r * IB + c * VL, X::kPairs ? simd::mul(acc[r][c], sc) : acc[r][c]);
}

// ot[r][lanes] = alpha[lanes] * ot[r][lanes] + sum_s v[s][r] . p[s][lanes] for R value columns
// and C vectors of query lanes, over n steps: keys (fp32), or pairs of keys (bf16).
template <class X, int R, int C>
void pv_micro(const typename X::VElem* v, int64_t ldv, const typename X::QElem* p, int n,
              float* ot, const float* alpha) {
  vf acc[R][C];
  vf al[C];
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) al[c] = simd::load(alpha + c * VL);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = simd::mul(simd::load(ot + r * IB + c * VL), al[c]);
#pragma GCC unroll 2
  for (int s = 0; s < n; ++s) {
    typename X::Op pv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) pv[c] = X::lanes(p + s * IB + c * VL);
    const typename X::VElem* vr = v + s * ldv;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename X::Op vb = X::split(X::bcast(vr + r));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = X::dot(acc[r][c], pv[c], vb);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) simd::store(ot + r * IB + c * VL, acc[r][c]);
}

// Tables of every (R, C) instance, for the ragged edges of a tile.
template <class X, size_t... I>
struct MicroTables {
  using QkFn = void (*)(const typename X::KElem*, int64_t, const typename X::QElem*, int64_t,
                        float*, float);
  using PvFn = void (*)(const typename X::VElem*, int64_t, const typename X::QElem*, int, float*,
                        const float*);
  static constexpr QkFn qk[] = {&qk_micro<X, int(I) / RI + 1, int(I) % RI + 1>...};
  static constexpr PvFn pv[] = {&pv_micro<X, int(I) / RI + 1, int(I) % RI + 1>...};
};
template <class X, size_t... I>
MicroTables<X, I...> make_tables(std::index_sequence<I...>);
template <class X>
using Tables = decltype(make_tables<X>(std::make_index_sequence<RJ * RI>{}));
// ----------------------------------------------------------------------------------------
// Attention

// The compute modes, for inputs stored as In (see the top of the file).
template <class InT>
struct Fp32Mode : Fp32Math {
  using In = InT;
  using Math = Fp32Math;
};
template <class InT>
struct Bf16Mode : Bf16Math {
  using In = InT;
  using Math = Bf16Math;
};

// Per-call constants shared by all work items.
struct Ctx {
  const AttnArgs* a;
  const MaskRule* rule;
  const MaskPlan* plan;
  int64_t group;  // query heads per kv head
  bool natural;   // modifiers need scores in natural units before conversion to base 2
  float qscale;   // scale, times log2 e unless natural
  int64_t dk;     // elements of a converted K row: D (fp32), D rounded up to even (bf16)
};

// The rows of one plan group, one lane each.
struct Rows {
  RowCtx x;             // what the mask rule needs about them
  const int64_t* rows;  // query row of each lane
  int n;                // valid lanes
  int nvec;             // vectors covering the valid lanes
  int64_t rs;           // rows[l] = rows[0] + l * rs; 0: no such progression
};

// At most BC keys of a span: key m is at position key(m), its K row at kp + m * ldk (a dilated
// window's keys are strided; global tokens, and inputs the mode reads converted, are copied
// into scratch) and its V at vp + m * ldv (fp32), or in pair row m / 2 at vp + (m / 2) * ldv
// (bf16).
template <class M>
struct Chunk {
  int64_t j0, kstride;  // key(m) = j0 + m * kstride, unless keys
  const int64_t* keys;  // positions of gathered keys, or null
  int jn;
  uint32_t checks;  // the parts of the mask rule to apply (0: none, a full span)
  const typename M::KElem* kp;
  int64_t ldk;
  const typename M::VElem* vp;
  int64_t ldv;
  int64_t key(int m) const { return keys ? keys[m] : j0 + m * kstride; }
};

// Keys [js, je) of a chunk that some lane of a lane block may attend to.
struct KeyRange {
  int js, je;
};

struct Scratch {
  Buf<float> qt, st, ot, m, l, alpha, cpos, lsev, kg, vg;
  Buf<uint32_t> qp, vp, pp;
  Buf<uint16_t> kg16, qrow;
  Buf<int64_t> rows;

  // Grows the buffers mode M uses to this call's sizes.
  template <class M>
  void reserve(const Ctx& c) {
    const AttnArgs& a = *c.a;
    const size_t dv = size_t(a.Dv > 0 ? a.Dv : 1);
    if constexpr (M::kPairs) {
      qp.get(size_t(c.dk / 2) * BR);
      qrow.get(size_t(c.dk) * VL);
      kg16.get(size_t(c.dk) * BC);
      vp.get(dv * (BC / 2));
      pp.get(size_t(BC / 2) * IB);
    } else {
      qt.get(size_t(a.D) * BR);
      kg.get(size_t(a.D) * BC);
      vg.get(dv * BC);
    }
    st.get(size_t(BC) * IB);
    ot.get(dv * BR);
    m.get(BR);
    l.get(BR);
    alpha.get(BR);
    cpos.get(BR);
    lsev.get(BR);
    rows.get(BR);
  }
};
thread_local Scratch tls_scratch;

// A lane block: vectors [iv, iv + C) of the rows, i.e. one micro-tile width. Each chunk is
// processed block by block (scores, softmax, P.V); each block has its own contiguous slices of
// Qt [d][IB] and Ot [dv][IB], and all blocks share one St [key][IB] (a block's scores are used up
// before the next block's are computed), so that the working set of a step stays in L1/L2:
// separate St slices per block cost 15 % at N=8192.
template <class M>
struct Block {
  int iv, C;
  int l0, l1;  // valid lanes [l0, l1)
  typename M::QElem* q;
  float* st;
  float* ot;
};

// Keys [m0, m0 + BC) of span sp, for batch b and kv head hk.
template <class M>
Chunk<M> chunk(const Ctx& c, Scratch& s, const PlanSpan& sp, int64_t m0, int64_t b, int64_t hk) {
  using In = typename M::In;
  const AttnArgs& a = *c.a;
  const In* kb = static_cast<const In*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const In* vb = static_cast<const In*>(a.v) + b * a.sv[0] + hk * a.sv[1];
  Chunk<M> ch{};
  ch.jn = int(min64(BC, sp.n - m0));
  ch.checks = sp.checks;
  if (sp.kstride > 0) {
    ch.j0 = sp.j0 + m0 * sp.kstride;
    ch.kstride = sp.kstride;
  } else {
    ch.keys = c.rule->globals + sp.j0 + m0;  // global tokens
  }
  // K: in place when the input already has the mode's element type (and, for pairs, whole
  // pairs per row), else converted (and gathered) row by row.
  constexpr bool k_in_place =
      M::kPairs ? std::is_same_v<In, bf16_t> : std::is_same_v<In, float>;
  if (k_in_place && !ch.keys && (!M::kPairs || a.D % 2 == 0)) {
    ch.kp = reinterpret_cast<const typename M::KElem*>(kb + ch.j0 * a.sk[2]);
    ch.ldk = a.sk[2] * sp.kstride;
  } else {
    for (int m = 0; m < ch.jn; ++m) {
      const In* kr = kb + ch.key(m) * a.sk[2];
      if constexpr (M::kPairs)
        row_to_bf16(kr, s.kg16.p + m * c.dk, a.D, c.dk);
      else
        row_to_f32(kr, s.kg.p + m * c.dk, a.D);
    }
    if constexpr (M::kPairs)
      ch.kp = s.kg16.p;
    else
      ch.kp = s.kg.p;
    ch.ldk = c.dk;
  }
  // V: in place for fp32 from float32 input; pairs of consecutive keys for bf16 (the last one
  // padded with a zero key); else converted.
  if constexpr (M::kPairs) {
    for (int m = 0; m < ch.jn; m += 2)
      pair_rows(vb + ch.key(m) * a.sv[2], m + 1 < ch.jn ? vb + ch.key(m + 1) * a.sv[2] : nullptr,
                s.vp.p + (m / 2) * a.Dv, a.Dv);
    ch.vp = s.vp.p;
    ch.ldv = a.Dv;
  } else if (std::is_same_v<In, float> && !ch.keys) {
    ch.vp = reinterpret_cast<const float*>(vb + ch.j0 * a.sv[2]);
    ch.ldv = a.sv[2] * sp.kstride;
  } else {
    for (int m = 0; m < ch.jn; ++m) row_to_f32(vb + ch.key(m) * a.sv[2], s.vg.p + m * a.Dv, a.Dv);
    ch.vp = s.vg.p;
    ch.ldv = a.Dv;
  }
  return ch;
}

// Asks for the K and V rows of keys [m0, m0 + BC) of span sp in L2 while the current chunk is
// computed: a chunk copied or converted into scratch is then read from L2 instead of L3/memory
// (without this, the copy of the fp32 path for 16-bit inputs costs 5 % at N=2048).
template <class M>
void prefetch_chunk(const Ctx& c, const PlanSpan& sp, int64_t m0, int64_t b, int64_t hk) {
  using In = typename M::In;
  const AttnArgs& a = *c.a;
  const char* kb = reinterpret_cast<const char*>(static_cast<const In*>(a.k) + b * a.sk[0] +
                                                 hk * a.sk[1]);
  const char* vb = reinterpret_cast<const char*>(static_cast<const In*>(a.v) + b * a.sv[0] +
                                                 hk * a.sv[1]);
  const int64_t kbytes = a.D * int64_t(sizeof(In)), vbytes = a.Dv * int64_t(sizeof(In));
  const int jn = int(min64(BC, sp.n - m0));
  for (int m = 0; m < jn; ++m) {
    const int64_t j = sp.kstride > 0 ? sp.j0 + (m0 + m) * sp.kstride : c.rule->globals[sp.j0 + m0 + m];
    const char* kr = kb + j * a.sk[2] * int64_t(sizeof(In));
    const char* vr = vb + j * a.sv[2] * int64_t(sizeof(In));
    for (int64_t o = 0; o < kbytes; o += 64) _mm_prefetch(kr + o, _MM_HINT_T1);
    for (int64_t o = 0; o < vbytes; o += 64) _mm_prefetch(vr + o, _MM_HINT_T1);
  }
}

// The keys of chunk ch that some lane of block k may attend to: outside this range the block's
// scores are -inf and its P rows zero, so Q.K and P.V skip them. Along a causal diagonal or a
// window edge this saves a large part of a partial span.
template <class M>
KeyRange key_range(const Rows& rs, const Chunk<M>& ch, const Block<M>& k) {
  if (!(ch.checks & kCheckRange) || rs.rs == 0 || ch.keys) return {0, ch.jn};
  const int64_t lo = key_lo(rs.x, rs.rows[k.l0]), hi = key_hi(rs.x, rs.rows[k.l1 - 1]);
  const int64_t js = max64(0, ceil_div(lo - ch.j0, ch.kstride));
  const int64_t je = min64(ch.jn, floor_div(hi - ch.j0, ch.kstride) + 1);
  if (je <= js) return {0, 0};
  return {int(js), int(je)};
}

// Sets St to -inf where the mask rule disallows a key, for keys kr of chunk ch and the lanes
// of block k (partial spans only).
template <class M>
void apply_mask(const Ctx& c, const Rows& rs, const Chunk<M>& ch, const Block<M>& k,
                KeyRange kr) {
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

// St[j][lanes of block k] = the block's rows' scores against keys [js, je) of chunk ch.
template <class M>
void qk_tile(const Ctx& c, const Chunk<M>& ch, const Block<M>& k, KeyRange kr) {
  using X = typename M::Math;
  const int64_t ldk = ch.ldk;
  const int64_t n = M::kPairs ? c.dk / 2 : c.a->D;  // steps: pairs or elements of d
  float* st = k.st;
  int jj = kr.js;
  if (k.C == RI)
    for (; jj + RJ <= kr.je; jj += RJ)
      qk_micro<X, RJ, RI>(ch.kp + jj * ldk, ldk, k.q, n, st + jj * IB, c.qscale);
  for (; jj < kr.je; jj += RJ) {
    const int R = int(min64(RJ, kr.je - jj));
    Tables<X>::qk[(R - 1) * RI + (k.C - 1)](ch.kp + jj * ldk, ldk, k.q, n, st + jj * IB, c.qscale);
  }
}

// St[j][lanes of block k] for the keys of chunk ch: scores with every modifier and the mask
// applied, for the keys of the returned range only (the others are disallowed).
template <class M>
KeyRange scores(const Ctx& c, Scratch& s, const Rows& rs, const Chunk<M>& ch, int64_t b,
                int64_t h, const Block<M>& k) {
  const AttnArgs& a = *c.a;
  float* st = k.st;
  const KeyRange kr = key_range(rs, ch, k);
  qk_tile(c, ch, k, kr);
  if (a.softcap > 0.0f) {
    const vf cap = simd::set1(a.softcap), inv = simd::set1(1.0f / a.softcap);
    for (int jj = kr.js; jj < kr.je; ++jj)
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        simd::store(p, simd::mul(cap, simd::tanh(simd::mul(simd::load(p), inv))));
      }
  }
  if (a.alibi) {
    const vf slope = simd::set1(-a.alibi[h]);
    for (int jj = kr.js; jj < kr.je; ++jj) {
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
    for (int jj = kr.js; jj < kr.je; ++jj) {
      float* row = st + jj * IB - k.l0;  // indexed by lane
      const float* fmj = fm + ch.key(jj) * ms[3];
      for (int l = k.l0; l < k.l1; ++l) row[l] += fmj[rs.rows[l] * ms[2]];
    }
  }
  if (c.natural) {
    const vf log2e = simd::set1(LOG2E);
    for (int jj = kr.js; jj < kr.je; ++jj)
      for (int v = 0; v < k.C; ++v) {
        float* p = st + jj * IB + v * VL;
        simd::store(p, simd::mul(simd::load(p), log2e));
      }
  }
  if (ch.checks) apply_mask(c, rs, ch, k, kr);
  return kr;
}

// Online-softmax update of block k for the keys kr of one chunk: updates m and l, leaves the
// accumulator rescale factor in alpha, and P: in place of St (fp32), or (bf16) packed straight
// into pairs of keys [2 * (js / 2), 2 * ((je + 1) / 2)) in s.pp, the keys of those pairs
// outside kr (whose scores were never computed) with P = 0. Either way l sums the float32
// P in key order.
template <class M>
void softmax_update(Scratch& s, const Block<M>& k, KeyRange kr) {
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
    if constexpr (M::kPairs) {
      float* pp = reinterpret_cast<float*>(s.pp.p) + (v - k.iv) * VL;
      for (int q = kr.js / 2; q < (kr.je + 1) / 2; ++q) {
        const int j0 = 2 * q, j1 = 2 * q + 1;
        const vf e0 = j0 >= kr.js ? simd::exp2(simd::sub(simd::load(st + j0 * IB), mu)) : simd::zero();
        const vf e1 = j1 < kr.je ? simd::exp2(simd::sub(simd::load(st + j1 * IB), mu)) : simd::zero();
        sum = simd::add(simd::add(sum, e0), e1);
        simd::store(pp + q * IB, pack_pairs(e0, e1));
      }
    } else {
      for (int jj = kr.js; jj < kr.je; ++jj) {
        const vf e = simd::exp2(simd::sub(simd::load(st + jj * IB), mu));
        simd::store(st + jj * IB, e);
        sum = simd::add(sum, e);
      }
    }
    simd::store(s.l.p + v * VL, simd::fma(simd::load(s.l.p + v * VL), al, sum));
    simd::store(s.m.p + v * VL, mn);
    simd::store(s.alpha.p + v * VL, al);
  }
}

// Ot = alpha * Ot + V^T P for block k over the keys kr of chunk ch. Skipping an empty range is
// exact: its lanes saw only -inf in this chunk, so alpha is 1 (or Ot is still 0).
template <class M>
void pv_update(const AttnArgs& a, Scratch& s, const Chunk<M>& ch, const Block<M>& k,
               KeyRange kr) {
  using X = typename M::Math;
  if (kr.je <= kr.js) return;
  const float* al = s.alpha.p + k.iv * VL;
  float* ot = k.ot;
  // The steps [s0, s1): pairs of keys, with P packed in s.pp by softmax_update (bf16), or keys,
  // with P in St (fp32).
  const int s0 = M::kPairs ? kr.js / 2 : kr.js, s1 = M::kPairs ? (kr.je + 1) / 2 : kr.je;
  const int64_t ldv = ch.ldv;
  const typename M::VElem* vt = ch.vp + s0 * ldv;
  const typename M::QElem* pt;
  if constexpr (M::kPairs)
    pt = s.pp.p + s0 * IB;
  else
    pt = k.st + s0 * IB;
  const int n = s1 - s0;
  int64_t dv = 0;
  if (k.C == RI)
    for (; dv + RJ <= a.Dv; dv += RJ) pv_micro<X, RJ, RI>(vt + dv, ldv, pt, n, ot + dv * IB, al);
  for (; dv < a.Dv; dv += RJ) {
    const int R = int(min64(RJ, a.Dv - dv));
    Tables<X>::pv[(R - 1) * RI + (k.C - 1)](vt + dv, ldv, pt, n, ot + dv * IB, al);
  }
}

// The weights row of query row i, or -1.
int64_t weight_row(const AttnArgs& a, int64_t i) {
  return a.weight_index ? a.weight_index[i] : i;
}

// Writes the group's outputs Ot / l (0 for a row with l = 0): the accumulator is [dv][lane],
// the output [row][dv], so VL x VL tiles are transposed in registers on the way.
template <class T>
void write_outputs(const AttnArgs& a, Scratch& s, const int64_t* rows, int n, int64_t obase) {
  T* out = static_cast<T*>(a.out) + obase;
  for (int l0 = 0; l0 < n; l0 += VL) {
    const float* ot = s.ot.p + (l0 / IB) * a.Dv * IB + l0 % IB;
    const int m = int(min64(VL, n - l0));
    float inv[VL];
    T* orow[VL];
    for (int i = 0; i < m; ++i) {
      const float L = s.l.p[l0 + i];
      inv[i] = L > 0.0f ? 1.0f / L : 0.0f;
      orow[i] = out + rows[l0 + i] * a.so[2];
    }
    int64_t dv = 0;
    for (; dv + VL <= a.Dv; dv += VL) {
      vf r[VL];
      for (int i = 0; i < VL; ++i) r[i] = simd::load(ot + (dv + i) * IB);
      simd::transpose(r);
      for (int i = 0; i < m; ++i) store_vec(orow[i] + dv, simd::mul(r[i], simd::set1(inv[i])));
    }
    for (; dv < a.Dv; ++dv)
      for (int i = 0; i < m; ++i) store_elem(orow[i] + dv, ot[dv * IB + i] * inv[i]);
  }
}

// Packs the group's query rows for the mode, block by block, VL lanes at a time through
// register transposes; padding lanes are zero.
//   fp32: Qt[d][lane] = q[row][d] * qscale (floats);
//   bf16: Qp[p][lane] = (q[row][2p], q[row][2p + 1]) as bf16, unscaled (the scale multiplies
//         the scores), read in place from bfloat16 rows with whole pairs, else converted first.
template <class M>
void pack_queries(const Ctx& c, Scratch& s, const int64_t* rows, int n, int lanes,
                  const typename M::In* qb) {
  using In = typename M::In;
  const AttnArgs& a = *c.a;
  for (int l0 = 0; l0 < lanes; l0 += VL) {
    const int m = int(min64(VL, max64(0, n - l0)));  // rows of this vector of lanes
    if constexpr (M::kPairs) {
      const int64_t np = c.dk / 2;
      uint32_t* qp = s.qp.p + (l0 / IB) * np * IB + l0 % IB;
      const uint32_t* pr[VL];
      for (int i = 0; i < m; ++i) {
        const In* qr = qb + rows[l0 + i] * a.sq[2];
        if (std::is_same_v<In, bf16_t> && a.D % 2 == 0) {
          pr[i] = reinterpret_cast<const uint32_t*>(qr);
        } else {
          uint16_t* t = s.qrow.p + i * c.dk;
          row_to_bf16(qr, t, a.D, c.dk);
          pr[i] = reinterpret_cast<const uint32_t*>(t);
        }
      }
      int64_t p = 0;
      for (; p + VL <= np; p += VL) {
        vf r[VL];
        for (int i = 0; i < VL; ++i)
          r[i] = i < m ? simd::load(reinterpret_cast<const float*>(pr[i] + p)) : simd::zero();
        simd::transpose(r);
        for (int i = 0; i < VL; ++i) simd::store(reinterpret_cast<float*>(qp + (p + i) * IB), r[i]);
      }
      for (; p < np; ++p)
        for (int i = 0; i < VL; ++i) {
          uint32_t pair = 0;
          if (i < m) std::memcpy(&pair, pr[i] + p, 4);
          qp[p * IB + i] = pair;
        }
    } else {
      float* qt = s.qt.p + (l0 / IB) * a.D * IB + l0 % IB;
      const In* qr[VL];
      for (int i = 0; i < m; ++i) qr[i] = qb + rows[l0 + i] * a.sq[2];
      const vf scale = simd::set1(c.qscale);
      int64_t d = 0;
      for (; d + VL <= a.D; d += VL) {
        vf r[VL];
        for (int i = 0; i < VL; ++i) r[i] = i < m ? load_f32(qr[i] + d) : simd::zero();
        simd::transpose(r);
        for (int i = 0; i < VL; ++i) simd::store(qt + (d + i) * IB, simd::mul(r[i], scale));
      }
      for (; d < a.D; ++d)
        for (int i = 0; i < VL; ++i) qt[d * IB + i] = i < m ? to_f32(qr[i][d]) * c.qscale : 0.0f;
    }
  }
}

// Attention for one plan group of batch b, head h over its spans [sp0, sp1).
template <class M>
void process_group(const Ctx& c, Scratch& s, const PlanGroup& g, int64_t h, const PlanSpan* sp0,
                   const PlanSpan* sp1) {
  const AttnArgs& a = *c.a;
  const int64_t b = g.b, hk = h / c.group;
  const auto* qb = static_cast<const typename M::In*>(a.q) + b * a.sq[0] + h * a.sq[1];
  Rows rs{row_ctx(*c.rule, g, h), s.rows.p, g.n, (g.n + VL - 1) / VL, g.rstride};
  int64_t* rows = s.rows.p;
  for (int l = 0; l < g.n; ++l)
    rows[l] = g.rstride ? g.i0 + l * g.rstride : c.plan->rows[g.i0 + l];
  const int lanes = rs.nvec * VL;

  pack_queries<M>(c, s, rows, rs.n, lanes, qb);
  for (int l = 0; l < lanes; ++l) {
    s.cpos.p[l] = float((l < rs.n ? rows[l] : rows[0]) + rs.x.d->shift);  // for ALiBi
    s.m.p[l] = NEG_INF;
    s.l.p[l] = 0.0f;
  }

  const int64_t q_block = M::kPairs ? (c.dk / 2) * IB : a.D * IB;  // packed Q per block
  typename M::QElem* qbase;
  if constexpr (M::kPairs)
    qbase = s.qp.p;
  else
    qbase = s.qt.p;
  Block<M> blocks[NBLK];
  int nblocks = 0;
  for (int iv = 0; iv < rs.nvec; iv += RI, ++nblocks) {
    const int C = int(min64(RI, rs.nvec - iv));
    blocks[nblocks] = Block<M>{iv, C, iv * VL, int(min64(rs.n, (iv + C) * VL)),
                               qbase + nblocks * q_block, s.st.p, s.ot.p + nblocks * a.Dv * IB};
  }
  std::memset(s.ot.p, 0, sizeof(float) * size_t(a.Dv * IB * nblocks));

  for (const PlanSpan* sp = sp0; sp != sp1; ++sp)
    for (int64_t m0 = 0; m0 < sp->n; m0 += BC) {
      const Chunk<M> ch = chunk<M>(c, s, *sp, m0, b, hk);
      if (m0 + BC < sp->n)
        prefetch_chunk<M>(c, *sp, m0 + BC, b, hk);
      else if (sp + 1 != sp1)
        prefetch_chunk<M>(c, sp[1], 0, b, hk);
      for (int bi = 0; bi < nblocks; ++bi) {
        const Block<M>& k = blocks[bi];
        const KeyRange kr = scores(c, s, rs, ch, b, h, k);
        softmax_update(s, k, kr);
        pv_update(a, s, ch, k, kr);
      }
    }

  // out = Ot / l; lse = m + log(l) (m is in base 2). Rows with no allowed key get 0, -inf.
  const int64_t obase = b * a.so[0] + h * a.so[1];
  switch (a.out_type) {
    case ElemType::f32:
      write_outputs<float>(a, s, rows, rs.n, obase);
      break;
    case ElemType::bf16:
      write_outputs<bf16_t>(a, s, rows, rs.n, obase);
      break;
    case ElemType::f16:
      write_outputs<f16_t>(a, s, rows, rs.n, obase);
      break;
  }
  float* lb = a.lse + (b * a.Hq + h) * a.Lq;
  for (int l = 0; l < rs.n; ++l) {
    const float L = s.l.p[l];
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
      const Chunk<M> ch = chunk<M>(c, s, *sp, m0, b, hk);
      for (int bi = 0; bi < nblocks; ++bi) {
        if (!wanted[bi]) continue;
        const Block<M>& k = blocks[bi];
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

template <class M>
void attention_item(void* p, int64_t work) {
  const Ctx& c = *static_cast<const Ctx*>(p);
  const MaskPlan& plan = *c.plan;
  // Head-major: consecutive items (on one thread, and on the threads working side by side) read
  // the same head's K and V, which then stay in L2/L3 (interleaving heads cost 10 % at H=8).
  const int64_t h = work / plan.n_items;
  const PlanItem& item = plan.items[work % plan.n_items];

  Scratch& s = tls_scratch;
  s.reserve<M>(c);
  // Groups in order: a group of global rows overrides the results of the group before it
  // (same thread, so the overwrite cannot race).
  const int64_t hp = plan.n_heads > 1 ? h : 0;
  for (int64_t g = item.g0; g < item.g1; ++g) {
    const int64_t* sp = plan.span_ptr + hp * plan.n_groups + g;
    process_group<M>(c, s, plan.groups[g], h, plan.spans + sp[0], plan.spans + sp[1]);
  }
}

// bf16 work items flush denormals as VDPBF16PS does (elements.h), in every build alike.
template <class M>
void attention_item_flushed(void* p, int64_t work) {
  FlushDenormals ftz;
  attention_item<M>(p, work);
}

template <class M>
void run(const AttnArgs& a) {
  Ctx c{};
  c.a = &a;
  c.rule = a.rule;
  c.plan = a.plan;
  c.group = a.Hq / a.Hkv;
  c.natural = a.softcap > 0.0f || a.alibi != nullptr || a.float_mask != nullptr;
  c.qscale = c.natural ? a.scale : a.scale * LOG2E;
  c.dk = M::kPairs ? (a.D + 1) / 2 * 2 : a.D;
  if constexpr (M::kPairs)
    parallel_for(c.plan->n_items * a.Hq, a.num_threads, &attention_item_flushed<M>, &c);
  else
    parallel_for(c.plan->n_items * a.Hq, a.num_threads, &attention_item<M>, &c);
}

template <class In>
void run_input(const AttnArgs& a) {
  if (a.precision == Precision::bf16)
    run<Bf16Mode<In>>(a);
  else
    run<Fp32Mode<In>>(a);
}

void attention_impl(const AttnArgs& a) {
  if (a.B == 0 || a.Hq == 0 || a.Lq == 0) return;
  switch (a.in_type) {
    case ElemType::f32:
      return run_input<float>(a);
    case ElemType::bf16:
      return run_input<bf16_t>(a);
    case ElemType::f16:
      return run_input<f16_t>(a);
  }
}

}  // namespace

void attention(const AttnArgs& a) { attention_impl(a); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
