// The element rule: may query row i see key j? The one place it is written. masking.cpp
// classifies key spans with it when it builds a MaskPlan, and the kernels apply it to the
// spans the plan marks partial.
//
// allowed(i, j) = ( ks <= j < kend                       (i's document, key_lengths)
//                 & j <= i + coff                        (causal; coff per document)
//                 & (window off | global key j | global row i
//                    | (-left <= j - c <= right & (j - c) % dil == 0)) )   with c = i + shift
//                 | xs <= j < xe                         (the document's extra keys)
//               & bool_mask[b, h, i, j] & layout[b, h, i / bq, j / bk]
//
// Included INSIDE the including file's namespace (a per-ISA anonymous namespace in kernels/,
// an anonymous one in masking.cpp), so no inline function is shared across instruction sets.
// Needs kernel_abi.h and <cstdint> included before.

// What the rule needs about a group of rows: their document, whether the window applies to
// them (not to global rows), and the batch and head for the masks.
struct RowCtx {
  const MaskRule* r;
  const MaskDoc* d;
  bool windowed;
  int64_t b, h;
};

inline RowCtx row_ctx(const MaskRule& r, const PlanGroup& g, int64_t h) {
  return RowCtx{&r, &r.docs[g.doc], r.window && !g.global_rows, g.b, h};
}

inline int64_t rule_min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t rule_max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Keys row i may see by its document, causality and the window bounds: [key_lo, key_hi]
// (dilation and global keys apart). Both are non-decreasing in i within a document, so the
// rows [i1, i2] together see no key outside [key_lo(i1), key_hi(i2)], and each of them sees
// every key of [key_lo(i2), key_hi(i1)].
inline int64_t key_lo(const RowCtx& x, int64_t i) {
  int64_t lo = x.d->ks;
  if (x.windowed && x.r->wl >= 0) lo = rule_max(lo, i + x.d->shift - x.r->wl);
  return lo;
}
inline int64_t key_hi(const RowCtx& x, int64_t i) {
  int64_t hi = x.d->kend - 1;
  if (x.r->causal) hi = rule_min(hi, i + x.d->coff);
  if (x.windowed && x.r->wr >= 0) hi = rule_min(hi, i + x.d->shift + x.r->wr);
  return hi;
}
// The last key a global key may be for row i (global keys ignore the window).
inline int64_t global_key_hi(const RowCtx& x, int64_t i) {
  int64_t hi = x.d->kend - 1;
  if (x.r->causal) hi = rule_min(hi, i + x.d->coff);
  return hi;
}
// The keys row i may see share the residue (i + shift) mod dil.
inline int64_t key_residue(const RowCtx& x, int64_t i) {
  const int64_t dil = x.r->dil;
  return ((i + x.d->shift) % dil + dil) % dil;
}

// An extra key of the rows' document (a compressed memory slot): every row sees it whole.
inline bool extra_key(const RowCtx& x, int64_t j) { return j >= x.d->xs && j < x.d->xe; }

// Index of the first global token >= pos.
inline int64_t first_global(const MaskRule& r, int64_t pos) {
  int64_t lo = 0, hi = r.n_globals;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (r.globals[mid] < pos)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}
inline bool is_global(const MaskRule& r, int64_t pos) {
  const int64_t g = first_global(r, pos);
  return g < r.n_globals && r.globals[g] == pos;
}
// Whether row i is a global row, which a group with global_rows set computes.
inline bool is_global_row(const MaskRule& r, const MaskDoc& d, int64_t i) {
  return r.n_globals > 0 && is_global(r, i + d.shift);
}

inline bool layout_at(const MaskRule& r, int64_t b, int64_t h, int64_t qb, int64_t kb) {
  const int64_t* s = r.layout_strides;
  return r.layout[b * s[0] + h * s[1] + qb * s[2] + kb * s[3]] != 0;
}

// The rule for one element, restricted to the parts in `checks` (the others hold for the
// whole span). global_key: j is a global token, exempt from the window.
inline bool allowed(const RowCtx& x, uint32_t checks, int64_t i, int64_t j, bool global_key) {
  const MaskRule& r = *x.r;
  if ((checks & kCheckRange) && !extra_key(x, j)) {
    if (j < x.d->ks || j >= x.d->kend) return false;
    if (r.causal && j > i + x.d->coff) return false;
    if (x.windowed && !global_key) {
      const int64_t delta = j - (i + x.d->shift);
      if (r.wl >= 0 && delta < -r.wl) return false;
      if (r.wr >= 0 && delta > r.wr) return false;
      if (r.dil > 1 && delta % r.dil != 0) return false;
    }
  }
  if (checks & kCheckMask) {
    const int64_t* s = r.mask_strides;
    if (r.bool_mask[x.b * s[0] + x.h * s[1] + i * s[2] + j * s[3]] == 0) return false;
  }
  if ((checks & kCheckLayout) && !layout_at(r, x.b, x.h, i / r.bq, j / r.bk)) return false;
  return true;
}

// A key the span leaves to the group's span of global keys.
inline bool skipped_here(uint32_t checks, bool global_key) {
  return global_key && (checks & kGlobalsElsewhere) != 0;
}

// The same rule as an interval of lanes, for rows i0 + l * rs (rs >= 1) and a key j that is
// not a global key of the group's window: narrows [lo, hi] to the lanes whose row allows j by
// the document, causality and the window bounds (empty when lo > hi). The dilation residue
// holds by construction: with dil > 1 the plan gives a windowed group rows and keys of one
// residue only (rs = kstride = dil).
inline void allowed_lanes(const RowCtx& x, int64_t i0, int64_t rs, int64_t j, int64_t& lo,
                          int64_t& hi) {
  const MaskRule& r = *x.r;
  if (extra_key(x, j)) return;
  if (j < x.d->ks || j >= x.d->kend) {
    lo = hi + 1;
    return;
  }
  if (r.causal) lo = rule_max(lo, ceil_div(j - x.d->coff - i0, rs));
  if (x.windowed) {
    const int64_t d0 = j - x.d->shift - i0;  // j - c of lane 0
    if (r.wl >= 0) hi = rule_min(hi, floor_div(d0 + r.wl, rs));
    if (r.wr >= 0) lo = rule_max(lo, ceil_div(d0 - r.wr, rs));
  }
}
