// Masking, in one module: every masking option is checked here (std::invalid_argument whose
// message starts with the option's name) and becomes a MaskRule; build_plan turns the rule
// into the MaskPlan the kernels follow. The element rule itself is mask_rule.h.
//
// The plan (the idea of FlexAttention's BlockMask, for a CPU kernel with SIMD lanes over query
// rows): query rows are cut into groups (a tile of consecutive rows of one document; with a
// dilated window, rows of one residue class, strided; the rows aligned to global tokens, which
// ignore the window, as a group of their own right after the group holding them), and each
// group gets the list of key spans it must visit: the band its rows may see (from the document,
// causality and the window) cut into a core every row sees whole and the edges, intersected
// with the block layout's kept blocks, plus the global keys, plus the document's extra keys.
// A span with no check is full (no per-element work); the others name the parts of the rule
// the kernel applies to them.
//
// Recurrent memory is one more producer: each segment is a document whose keys start at its
// raw memory (so a query sees O(S + M) raw keys, never an L x L mask), and whose compressed
// memory slots, pooled by the caller and placed after the raw keys on the key axis, are the
// document's extra keys: one full span per group.
#include "masking.h"

#include <chrono>
#include <cmath>
#include <string>

namespace attn {
namespace {

#include "mask_rule.h"

// Gaps between kept layout blocks shorter than this (in keys) are visited and masked per
// element instead of cutting the span: many tiny spans cost more than the masked keys.
constexpr int64_t kMinGap = 16;

// Empty packed documents beyond one per token that are still accepted.
constexpr int64_t kSpareDocs = 1024;

std::string str(int64_t v) { return std::to_string(v); }

// window_left/right in keys, clamped: beyond Lq + Lk they change nothing (|j - c| < Lq + Lk).
int64_t window_side(int64_t w, int64_t dilation, int64_t lim) {
  if (w < 0) return -1;
  int64_t keys = 0;
  if (__builtin_mul_overflow(w, dilation, &keys) || keys > lim) return lim;
  return keys;
}

// Offsets of packed sequences: 1-D int, at least 2, 0 first, non-decreasing, total last.
// At most Lq + Lk + kSpareDocs documents (empty ones allowed): bounds the cost of reading the
// offsets before anything else.
std::vector<int64_t> check_offsets(const ArrayRef& a, const char* name, int64_t total,
                                   const char* total_name, int64_t max_docs) {
  check_1d(a, name, DType::i32, -1, "(documents + 1,)");
  if (a.shape[0] < 2)
    fail(std::string(name) + ": expected at least 2 offsets (one document), got " +
         str(a.shape[0]));
  if (a.shape[0] - 1 > max_docs)
    fail(std::string(name) + ": " + str(a.shape[0] - 1) + " documents are more than Lq + Lk + " +
         str(kSpareDocs) + " = " + str(max_docs));
  std::vector<int64_t> v = read_ints(a);
  if (v[0] != 0) fail(std::string(name) + ": must start at 0, got " + str(v[0]));
  for (size_t d = 1; d < v.size(); ++d)
    if (v[d] < v[d - 1])
      fail(std::string(name) + ": must be non-decreasing, but offset " + str(v[d]) +
           " at index " + str(int64_t(d)) + " follows " + str(v[d - 1]));
  if (v.back() != total)
    fail(std::string(name) + ": must end at the packed length " + total_name + "=" + str(total) +
         ", got " + str(v.back()));
  return v;
}

// Recurrent memory's own parameters, and the options it cannot be combined with: those that
// decide per (query, key) which keys a query sees, which the memory pattern decides here.
void check_memory(const MaskOptions& o) {
  const std::string why = ": cannot be combined with memory (the memory pattern decides which "
                          "keys each query sees)";
  if (o.mask.given) fail("mask" + why);
  if (o.window_left >= 0 || o.window_right >= 0 || o.dilation > 1)
    fail(std::string(o.window_left >= 0 ? "window_left" : o.window_right >= 0 ? "window_right"
                                                                            : "dilation") +
         why);
  if (o.global_tokens.given) fail("global_tokens" + why);
  if (o.block_layout.given) fail("block_layout" + why);
  if (o.cu_seqlens_q.given || o.cu_seqlens_k.given)
    fail(std::string(o.cu_seqlens_shared || !o.cu_seqlens_k.given ? "cu_seqlens" : "cu_seqlens_k") +
         why);
  if (o.memory_length < 0) fail("memory_length: must be >= 0, got " + str(o.memory_length));
  if (o.memory_compressed < 0)
    fail("memory_compressed: must be >= 0 (0: no compression), got " + str(o.memory_compressed));
  if (o.memory_rate < 1) fail("memory_rate: must be >= 1, got " + str(o.memory_rate));
  if (o.memory_compressed == 0) return;
  const int64_t c = o.memory_rate;
  if (o.memory_segment % c != 0)
    fail("memory_rate: " + str(c) + " must divide memory_segment=" + str(o.memory_segment) +
         " (slots are pooled from whole segments)");
  if (o.memory_length % c != 0)
    fail("memory_rate: " + str(c) + " must divide memory_length=" + str(o.memory_length) +
         " (slots are pooled from whole segments)");
  if (o.key_lengths.given)
    fail("key_lengths: cannot be combined with compressed memory (a slot would pool padding)");
}

}  // namespace

Masking::Masking(const MaskOptions& o, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk) {
  MaskRule& r = rule_;
  r.n_segments = 1;
  const bool memory = o.memory_segment != 0;
  if (o.memory_segment < 0)
    fail("memory_segment: must be >= 1 (0: no memory), got " + str(o.memory_segment));
  if (memory) {
    check_memory(o);
  } else if (o.memory_length != 0 || o.memory_compressed != 0 || o.memory_rate != 1) {
    fail(std::string(o.memory_length != 0       ? "memory_length"
                     : o.memory_compressed != 0 ? "memory_compressed"
                                                : "memory_rate") +
         ": given without memory_segment");
  }
  if (o.causal < 0 || o.causal > 2)
    fail("causal: expected 0 (none), 1 (top_left) or 2 (bottom_right), got " + str(o.causal));
  r.causal = o.causal;
  if (o.window_left < -1)
    fail("window_left: must be >= 0, or -1 for unbounded, got " + str(o.window_left));
  if (o.window_right < -1)
    fail("window_right: must be >= 0, or -1 for unbounded, got " + str(o.window_right));
  if (o.dilation < 1) fail("dilation: must be >= 1, got " + str(o.dilation));
  const int64_t lim = Lq + Lk + 1;
  r.window = o.window_left >= 0 || o.window_right >= 0 || o.dilation > 1;
  r.dil = o.dilation < lim ? o.dilation : lim;
  r.wl = window_side(o.window_left, o.dilation, lim);
  r.wr = window_side(o.window_right, o.dilation, lim);

  const std::vector<int64_t> mshape{B, Hq, Lq, Lk};
  if (o.mask.given) {
    const ArrayRef& m = o.mask;
    if (m.ndim() != 4 || m.shape != mshape)
      fail("mask: shape must be (B, Hq, Lq, Lk) = " + shape_str(mshape) + ", got " +
           shape_str(m.shape));
    if (m.dtype == DType::b8) {
      check_layout(m, "mask", 1, false);
      r.bool_mask = static_cast<const uint8_t*>(m.data);
      for (int d = 0; d < 4; ++d) r.mask_strides[d] = m.strides[d];
    } else if (m.dtype == DType::f32) {
      check_layout(m, "mask", 4, false);
      float_mask_ = static_cast<const float*>(m.data);
      for (int d = 0; d < 4; ++d) float_mask_strides_[d] = m.strides[d] / 4;
    } else {
      fail("mask: expected dtype bool or float32, got " + m.dtype_name);
    }
  }

  const bool packed = o.cu_seqlens_q.given || o.cu_seqlens_k.given;
  r.packed = packed;
  if (packed) {
    const char* qname = o.cu_seqlens_shared ? "cu_seqlens" : "cu_seqlens_q";
    const char* kname = o.cu_seqlens_shared ? "cu_seqlens" : "cu_seqlens_k";
    if (!o.cu_seqlens_q.given) fail("cu_seqlens_q: required with cu_seqlens_k");
    if (!o.cu_seqlens_k.given) fail("cu_seqlens_k: required with cu_seqlens_q");
    const int64_t max_docs = Lq + Lk + kSpareDocs;
    const std::vector<int64_t> cq = check_offsets(o.cu_seqlens_q, qname, Lq, "Lq", max_docs);
    const std::vector<int64_t> ck = check_offsets(o.cu_seqlens_k, kname, Lk, "Lk", max_docs);
    if (ck.size() != cq.size())
      fail("cu_seqlens_k: has " + str(int64_t(ck.size()) - 1) + " documents, cu_seqlens_q " +
           str(int64_t(cq.size()) - 1));
    if (B != 1)
      fail(std::string(qname) +
           ": packed sequences need a batch axis of 1 (documents back to back along the "
           "sequence axis), got B=" + str(B));
    if (o.key_lengths.given)
      fail("key_lengths: cannot be combined with cu_seqlens (each packed document has its own "
           "keys)");
    if (o.global_tokens.given)
      fail("global_tokens: cannot be combined with cu_seqlens (packed sequences)");
    for (size_t d = 0; d + 1 < cq.size(); ++d) {
      MaskDoc doc{};
      doc.qs = cq[d];
      doc.qe = cq[d + 1];
      doc.ks = ck[d];
      doc.kend = ck[d + 1];
      // Aligned as if the document ran alone: bottom-right by its own lengths.
      doc.shift = doc.ks - doc.qs + (doc.kend - doc.ks) - (doc.qe - doc.qs);
      doc.coff = r.causal == 2 ? doc.shift : doc.ks - doc.qs;
      docs_.push_back(doc);
    }
  } else {
    std::vector<int64_t> lengths;
    if (o.key_lengths.given) {
      check_1d(o.key_lengths, "key_lengths", DType::i64, B, "(B,)");
      lengths = read_ints(o.key_lengths);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = lengths[size_t(b)];
        if (n < 0) fail("key_lengths: value " + str(n) + " at index " + str(b) + " is negative");
        if (n > Lk)
          fail("key_lengths: value " + str(n) + " at index " + str(b) + " exceeds Lk=" + str(Lk));
      }
    }
    if (memory) memory_docs(o, B, Lq, Lk, lengths);
    // One document per batch with key_lengths, else one shared by every batch.
    for (int64_t b = 0; b < (lengths.empty() ? 1 : B) && !memory; ++b) {
      MaskDoc doc{};
      doc.qe = Lq;
      doc.kend = lengths.empty() ? Lk : lengths[size_t(b)];
      doc.shift = Lk - Lq;  // key_lengths cut the keys but keep the alignment
      doc.coff = r.causal == 2 ? doc.shift : 0;
      docs_.push_back(doc);
    }
  }
  // A key range narrows every document's keys; positions (alignment, causality, the window,
  // ALiBi, global tokens, masks and layouts) stay those of the whole call.
  if (o.key_begin < 0 || o.key_begin > Lk)
    fail("key_begin: must be in [0, Lk=" + str(Lk) + "], got " + str(o.key_begin));
  if (o.key_end < -1 || o.key_end > Lk || (o.key_end >= 0 && o.key_end < o.key_begin))
    fail("key_end: must be in [key_begin=" + str(o.key_begin) + ", Lk=" + str(Lk) +
         "], or -1 for Lk, got " + str(o.key_end));
  const int64_t kb = o.key_begin, ke = o.key_end < 0 ? Lk : o.key_end;
  for (MaskDoc& doc : docs_) {
    doc.ks = rule_max(doc.ks, kb);
    doc.kend = rule_max(doc.ks, rule_min(doc.kend, ke));
    doc.xs = rule_max(doc.xs, kb);  // a document's extra keys (compressed memory) as well
    doc.xe = rule_max(doc.xs, rule_min(doc.xe, ke));
  }
  r.n_docs = int64_t(docs_.size());

  if (o.global_tokens.given) {
    const ArrayRef& g = o.global_tokens;
    check_ndim(g, "global_tokens", 1, "(n,)");
    check_dtype(g, "global_tokens", DType::i64);
    check_layout(g, "global_tokens", 8, false);
    globals_ = read_ints(g);
    for (size_t i = 0; i < globals_.size(); ++i) {
      const int64_t pos = globals_[i];
      if (pos < 0 || pos >= Lk)
        fail("global_tokens: position " + str(pos) + " outside [0, " + str(Lk) + ")");
      if (i > 0 && pos <= globals_[i - 1])
        fail("global_tokens: must be sorted and unique (position " + str(pos) + " at index " +
             str(int64_t(i)) + " follows " + str(globals_[i - 1]) + ")");
    }
  }
  if (!r.window) globals_.clear();  // global tokens only matter with a window

  if (o.block_layout.given) {
    const ArrayRef& l = o.block_layout;
    if (o.block_q < 1) fail("block_q: must be >= 1, got " + str(o.block_q));
    if (o.block_k < 0) fail("block_k: must be >= 1 (or 0 for block_q), got " + str(o.block_k));
    const int64_t bq = o.block_q, bk = o.block_k > 0 ? o.block_k : o.block_q;
    const std::vector<int64_t> want{B, Hq, (Lq + bq - 1) / bq, (Lk + bk - 1) / bk};
    check_ndim(l, "block_layout", 4, "(B, Hq, ceil(Lq / block_q), ceil(Lk / block_k))");
    check_dtype(l, "block_layout", DType::b8);
    check_layout(l, "block_layout", 1, false);
    for (int d = 0; d < 4; ++d)
      if (l.shape[d] != want[size_t(d)] && l.shape[d] != 1)
        fail("block_layout: shape " + shape_str(l.shape) +
             " is not broadcastable to (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k)) = " +
             shape_str(want));
    r.layout = static_cast<const uint8_t*>(l.data);
    for (int d = 0; d < 4; ++d) r.layout_strides[d] = l.shape[d] == 1 ? 0 : l.strides[d];
    // Blocks longer than the sequence hold all of it; clamping keeps block arithmetic small.
    r.bq = bq < Lq ? bq : (Lq > 0 ? Lq : 1);
    r.bk = bk < Lk ? bk : (Lk > 0 ? Lk : 1);
  } else if (o.block_q != 0 || o.block_k != 0) {
    fail(std::string(o.block_q != 0 ? "block_q" : "block_k") + ": given without a block_layout");
  }
}

void Masking::memory_docs(const MaskOptions& o, int64_t B, int64_t Lq, int64_t Lk,
                          const std::vector<int64_t>& lengths) {
  MaskRule& r = rule_;
  const int64_t S = o.memory_segment, M = o.memory_length, C = o.memory_compressed;
  const int64_t c = o.memory_rate, L = Lq;
  const int64_t slots = C > 0 ? L / c + (L % c != 0) : 0;  // ceil(L / c), the last one partial
  if (Lk != L + slots) {
    if (C > 0)
      fail("k: with compressed memory the keys are the Lq=" + str(L) +
           " raw keys followed by ceil(Lq / memory_rate)=" + str(slots) +
           " pooled slots, so Lk must be " + str(L + slots) + ", got " + str(Lk));
    fail("k: recurrent memory is self-attention over one sequence: Lk must equal Lq=" + str(L) +
         ", got " + str(Lk));
  }
  const int64_t segments = L == 0 ? 0 : (L - 1) / S + 1;
  r.n_segments = segments;
  for (int64_t b = 0; b < (lengths.empty() ? 1 : B); ++b)
    for (int64_t s = 0; s < segments; ++s) {
      MaskDoc d{};
      d.qs = s * S;
      d.qe = L - d.qs > S ? d.qs + S : L;
      d.ks = d.qs > M ? d.qs - M : 0;  // the raw memory, then the segment itself
      d.kend = lengths.empty() ? d.qe : rule_min(d.qe, lengths[size_t(b)]);
      // Lq = Lk on the raw keys: both causal alignments are j <= i.
      d.shift = 0;
      d.coff = 0;
      if (C > 0) {
        // Slot t pools positions [t c, (t + 1) c); the segment sees the C most recent slots
        // that end at or before its raw memory's start (c divides S and M: no partial slot).
        const int64_t before = d.qs > M ? (d.qs - M) / c : 0;
        d.xs = L + (before > C ? before - C : 0);
        d.xe = L + before;
      }
      docs_.push_back(d);
    }
}

MaskRule Masking::rule() const {
  MaskRule r = rule_;
  r.docs = docs_.data();
  r.globals = globals_.empty() ? nullptr : globals_.data();
  r.n_globals = int64_t(globals_.size());
  return r;
}

MaskPlan PlanStorage::view() const {
  return MaskPlan{groups.data(), int64_t(groups.size()), items.data(), int64_t(items.size()),
                  span_ptr.data(), spans.data(), n_heads, rows.data()};
}

namespace {

// A stretch of keys the block layout keeps for some row of a group: for all of them (full)
// or only some (mixed: the layout is checked per element).
struct Run {
  int64_t a, b;
  bool mixed;
};

class Builder {
 public:
  Builder(const MaskRule& r, TileGeometry t, int64_t B, int64_t Hq, int64_t Lq)
      : r_(r), t_(t), B_(B), Hq_(Hq), Lq_(Lq) {}

  PlanStorage build() {
    if (B_ > 0 && Hq_ > 0 && Lq_ > 0) {
      if (r_.packed)
        for (int64_t d = 0; d < r_.n_docs; ++d) doc_groups(0, d);
      else
        for (int64_t b = 0; b < B_; ++b) {
          // Each batch's documents (segments under recurrent memory), or the shared ones.
          const int64_t per = r_.n_segments, first = r_.n_docs == B_ * per ? b * per : 0;
          for (int64_t s = 0; s < per; ++s) doc_groups(b, first + s);
        }
    }
    p_.n_heads = (r_.layout && Hq_ > 1 && r_.layout_strides[1] != 0) ? Hq_ : 1;
    const int64_t ng = int64_t(p_.groups.size());
    p_.span_ptr.assign(size_t(p_.n_heads * ng + 1), 0);
    std::vector<int64_t> keys(size_t(ng), 0);  // keys visited per group, over the heads
    for (int64_t hp = 0; hp < p_.n_heads; ++hp)
      for (int64_t g = 0; g < ng; ++g) {
        const size_t first = p_.spans.size();
        group_spans(p_.groups[size_t(g)], hp);
        for (size_t s = first; s < p_.spans.size(); ++s) keys[size_t(g)] += p_.spans[s].n;
        p_.span_ptr[size_t(hp * ng + g + 1)] = int64_t(p_.spans.size());
      }
    order_items(keys);
    return std::move(p_);
  }

 private:
  // ---- groups ----

  void doc_groups(int64_t b, int64_t d) {
    const MaskDoc& doc = r_.docs[d];
    if (doc.qs >= doc.qe) return;
    const int64_t rows = t_.rows;
    if (r_.window && r_.dil > 1) {
      // A dilated window: rows of one residue class of c = i + shift see keys of that class
      // only, so a group holds rows i, i + dil, ... and visits keys j, j + dil, ...
      const int64_t dil = r_.dil, classes = rule_min(dil, doc.qe - doc.qs);
      for (int64_t t = 0; t < classes; ++t) {
        const int64_t first = doc.qs + t, count = (doc.qe - 1 - first) / dil + 1;
        for (int64_t c = 0; c < count; c += rows)
          add_item(b, d, first + c * dil, rule_min(rows, count - c), dil);
      }
      return;
    }
    for (int64_t i = doc.qs; i < doc.qe;) {
      const int64_t e = rule_min(doc.qe, r_.layout ? layout_edge(i) : i + rows);
      add_item(b, d, i, e - i, 1);
      i = e;
    }
  }

  // With a block layout, groups follow its query blocks: whole blocks up to max_rows rows, or
  // equal pieces of a longer block, so the layout is the same for every row of a group.
  int64_t layout_edge(int64_t i) const {
    const int64_t bq = r_.bq, mx = t_.max_rows;
    if (bq <= mx) {
      const int64_t step = (mx / bq) * bq;
      return (i / step + 1) * step;
    }
    const int64_t pieces = (bq + mx - 1) / mx, piece = (bq + pieces - 1) / pieces;
    const int64_t base = (i / bq) * bq;
    return rule_min(base + ((i - base) / piece + 1) * piece, base + bq);
  }

  // One work item: the group, then its global rows (which override the group's results).
  void add_item(int64_t b, int64_t d, int64_t i0, int64_t n, int64_t rs) {
    if (n == 1) rs = 1;  // (a dilation beyond 2^31 would not fit the int32 stride)
    const int64_t g0 = int64_t(p_.groups.size());
    p_.groups.push_back(PlanGroup{b, d, i0, int32_t(n), int32_t(rs), 0});
    if (r_.n_globals > 0) {
      const int64_t shift = r_.docs[d].shift, last = i0 + (n - 1) * rs;
      const int64_t start = int64_t(p_.rows.size());
      for (int64_t g = first_global(r_, i0 + shift);
           g < r_.n_globals && r_.globals[g] - shift <= last; ++g) {
        const int64_t i = r_.globals[g] - shift;
        if ((i - i0) % rs == 0) p_.rows.push_back(i);
      }
      const int64_t cnt = int64_t(p_.rows.size()) - start;
      if (cnt > 0) p_.groups.push_back(PlanGroup{b, d, start, int32_t(cnt), 0, 1});
    }
    p_.items.push_back(PlanItem{g0, int64_t(p_.groups.size())});
  }

  // ---- spans ----

  void group_spans(const PlanGroup& g, int64_t hp) {
    const RowCtx x = row_ctx(r_, g, hp);
    const int64_t imin = g.rstride ? g.i0 : p_.rows[size_t(g.i0)];
    const int64_t imax = g.rstride ? g.i0 + int64_t(g.n - 1) * g.rstride
                                   : p_.rows[size_t(g.i0 + g.n - 1)];
    const uint32_t base = r_.bool_mask ? uint32_t(kCheckMask) : 0u;
    // The document's extra keys (compressed memory slots), which every row sees whole.
    if (x.d->xe > x.d->xs)
      p_.spans.push_back(PlanSpan{x.d->xs, int32_t(x.d->xe - x.d->xs), 1, base});
    // Keys some row may see [h0, h1]; keys every row sees [c0, c1] (window and causality).
    const int64_t h0 = key_lo(x, imin), h1 = key_hi(x, imax);
    const int64_t c0 = key_lo(x, imax), c1 = key_hi(x, imin);
    if (h0 <= h1) {
      layout_runs(x, imin, imax, h0, h1);
      for (const Run& run : runs_) {
        const uint32_t checks = base | (run.mixed ? kCheckLayout : 0u);
        if (c0 > c1) {
          band_span(x, imin, run.a, run.b, checks | kCheckRange);
        } else {
          band_span(x, imin, run.a, rule_min(run.b, c0 - 1), checks | kCheckRange);
          band_span(x, imin, rule_max(run.a, c0), rule_min(run.b, c1), checks);
          band_span(x, imin, rule_max(run.a, c1 + 1), run.b, checks | kCheckRange);
        }
      }
    }
    if (x.windowed && r_.n_globals > 0) global_span(x, imin, imax, base);
  }

  // Keys [a, b] of the band (those of the rows' residue class under a dilated window).
  void band_span(const RowCtx& x, int64_t imin, int64_t a, int64_t b, uint32_t checks) {
    int64_t stride = 1;
    if (x.windowed && r_.dil > 1) {
      stride = r_.dil;
      const int64_t rho = key_residue(x, imin);
      a += ((rho - a) % stride + stride) % stride;
      b -= ((b - rho) % stride + stride) % stride;
    }
    if (a > b) return;
    if (a == b) stride = 1;  // (a dilation beyond 2^31 would not fit the int32 stride)
    if (x.windowed && r_.n_globals > 0)
      for (int64_t g = first_global(r_, a); g < r_.n_globals && r_.globals[g] <= b; ++g)
        if ((r_.globals[g] - a) % stride == 0) {
          checks |= kGlobalsElsewhere;
          break;
        }
    p_.spans.push_back(PlanSpan{a, int32_t((b - a) / stride + 1), int32_t(stride), checks});
  }

  // The global keys a windowed group may see (the window does not apply to them).
  void global_span(const RowCtx& x, int64_t imin, int64_t imax, uint32_t checks) {
    const int64_t ga = first_global(r_, x.d->ks);
    const int64_t gb = first_global(r_, global_key_hi(x, imax) + 1);
    if (ga >= gb) return;
    if (r_.globals[gb - 1] > global_key_hi(x, imin)) checks |= kCheckRange;
    if (r_.layout)
      for (int64_t g = ga; g < gb && !(checks & kCheckLayout); ++g) {
        const int64_t kb = r_.globals[g] / r_.bk;
        if (block_state(x, imin, imax, kb) != 1) checks |= kCheckLayout;
      }
    p_.spans.push_back(PlanSpan{ga, int32_t(gb - ga), 0, checks});
  }

  // 0: no row of [imin, imax] keeps key block kb; 1: every row does; 2: some do.
  int block_state(const RowCtx& x, int64_t imin, int64_t imax, int64_t kb) const {
    bool any = false, all = true;
    for (int64_t qb = imin / r_.bq; qb <= imax / r_.bq; ++qb) {
      const bool keep = layout_at(r_, x.b, x.h, qb, kb);
      any = any || keep;
      all = all && keep;
    }
    return all ? 1 : any ? 2 : 0;
  }

  // runs_: the stretches of [h0, h1] the block layout keeps for some row (all of it without a
  // layout), gaps shorter than kMinGap merged into mixed runs.
  void layout_runs(const RowCtx& x, int64_t imin, int64_t imax, int64_t h0, int64_t h1) {
    runs_.clear();
    if (!r_.layout) {
      runs_.push_back(Run{h0, h1, false});
      return;
    }
    const int64_t bk = r_.bk;
    for (int64_t kb = h0 / bk; kb <= h1 / bk; ++kb) {
      const int state = block_state(x, imin, imax, kb);
      if (state == 0) continue;
      const int64_t a = rule_max(kb * bk, h0), b = rule_min(kb * bk + bk - 1, h1);
      const bool mixed = state == 2;
      if (!runs_.empty()) {
        Run& last = runs_.back();
        const int64_t gap = a - last.b - 1;
        if ((gap == 0 && last.mixed == mixed) || (gap > 0 && gap < kMinGap)) {
          last.b = b;
          last.mixed = last.mixed || mixed || gap > 0;
          continue;
        }
      }
      runs_.push_back(Run{a, b, mixed});
    }
  }

  // ---- order ----

  // Items with the most work first (causal masks, key lengths and layouts make it uneven); a
  // counting sort on a coarse cost keeps this O(items).
  void order_items(const std::vector<int64_t>& keys) {
    const size_t n = p_.items.size();
    std::vector<int64_t> cost(n, 0);
    int64_t maxc = 0;
    for (size_t k = 0; k < n; ++k) {
      for (int64_t g = p_.items[k].g0; g < p_.items[k].g1; ++g)
        cost[k] += keys[size_t(g)] * p_.groups[size_t(g)].n;
      maxc = rule_max(maxc, cost[k]);
    }
    constexpr int NB = 256;
    std::vector<int64_t> count(NB + 1, 0);
    for (size_t k = 0; k < n; ++k) {
      cost[k] = maxc > 0 ? (NB - 1) - int64_t(double(cost[k]) / double(maxc) * (NB - 1)) : 0;
      ++count[size_t(cost[k] + 1)];
    }
    for (int i = 0; i < NB; ++i) count[size_t(i + 1)] += count[size_t(i)];
    std::vector<PlanItem> sorted(n);
    for (size_t k = 0; k < n; ++k) sorted[size_t(count[size_t(cost[k])]++)] = p_.items[k];
    p_.items.swap(sorted);
  }

  const MaskRule& r_;
  TileGeometry t_;
  int64_t B_, Hq_, Lq_;
  PlanStorage p_;
  std::vector<Run> runs_;
};

}  // namespace

PlanStorage build_plan(const MaskRule& rule, TileGeometry tiles, int64_t B, int64_t Hq,
                       int64_t Lq) {
  return Builder(rule, tiles, B, Hq, Lq).build();
}

PlanStats plan_stats(const MaskOptions& o, TileGeometry tiles, int64_t B, int64_t Hq, int64_t Lq,
                     int64_t Lk) {
  const auto start = std::chrono::steady_clock::now();
  const Masking masking(o, B, Hq, Lq, Lk);
  const MaskRule rule = masking.rule();
  const PlanStorage p = build_plan(rule, tiles, B, Hq, Lq);
  PlanStats s;
  s.build_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.groups = int64_t(p.groups.size());
  s.items = int64_t(p.items.size());
  s.spans = int64_t(p.spans.size());
  s.head_dependent = p.n_heads > 1;
  for (const PlanSpan& sp : p.spans) s.full_spans += sp.checks == 0;
  const int64_t ng = s.groups;
  for (int64_t hp = 0; hp < p.n_heads; ++hp)
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t x = p.span_ptr[size_t(hp * ng + g)]; x < p.span_ptr[size_t(hp * ng + g + 1)];
           ++x)
        s.pairs += int64_t(p.spans[size_t(x)].n) * p.groups[size_t(g)].n;
  if (p.n_heads == 1) s.pairs *= Hq;
  return s;
}

}  // namespace attn
