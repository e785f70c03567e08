"""What a computation will cost, known before it starts: its work and its memory.

One model per method of `attention` (exact, linear, performer, linformer; "compare" adds the
exact reference to the approximation), the exact maps (pooled heatmaps, stats) and multi-head
attention. Each follows its code: every product (exact attention: the keys each query may see,
so a window costs its width), every elementwise pass, the performer's random-feature set-up
(one QR decomposition per block of D features), and every array allocated at once at the peak,
set-up, intermediates and results included (not the caller's inputs, already in memory).

- `flops`: multiply-add-equivalent operations. An elementwise pass over one element counts as
  ELEMENTWISE (numpy's loops are that much slower than BLAS per element), a QR flop as QR_WEIGHT
  (LAPACK's QR runs that much slower than a matrix product).
- `bytes`: the peak of the memory it allocates. tests/core/test_cost.py checks the model
  against numpy's own accounting of its allocations (tracemalloc), method by method.
- `step`: the most work between two cancellation checkpoints (service.core.cancel): the
  approximations work in blocks of rows, so only the performer's set-up has a large step, one
  QR of a D x D matrix; MAX_STEP bounds it.

The HTTP service refuses what exceeds ATTN_MAX_FLOPS, ATTN_MAX_WORK_BYTES or MAX_STEP with 413,
naming the limit and `loc` (the option that drives the cost), before anything runs
(service.web.limits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from service.core.approx import CHUNK, DEFAULT_LINFORMER_K, MAP_SIDE, default_num_features
from service.core.approx.compare import EXACT_MAP_MAX_CELLS
from service.core.approx.pooling import ROW_BLOCK
from service.core.cancel import ELEMENTWISE, STEP
from service.core.options import AttentionOptions, MaskingOptions, MultiheadOptions

QR_WEIGHT = 8
F32, F64 = 4, 8
# The largest uncancellable step allowed: a QR of a 1024 x 1024 matrix (about 0.3 s here).
MAX_STEP = QR_WEIGHT * 4 * 1024**3 // 3

Shape = Sequence[int]


@dataclass(frozen=True)
class Cost:
    """flops, peak bytes and the largest uncancellable step (flops) of one computation; loc
    names the option (or input) that drives it, what the computation ("method 'performer'")."""

    flops: int
    bytes: int
    step: int
    loc: tuple[str | int, ...]
    what: str


def _n(*dims: int) -> int:
    return math.prod(dims)


def _as4(shape: Shape) -> tuple[int, int, int, int]:
    s = (1,) * (4 - len(shape)) + tuple(shape)
    return s[0], s[1], s[2], s[3]


def visible_keys(lq: int, lk: int, opts: MaskingOptions) -> int:
    """Keys the exact kernel visits for all Lq query rows together (an upper bound): every key
    for dense rows, a window's span (its skipped dilated keys included), causal rows up to
    their last key, global tokens for every row; packed documents only their own keys; under
    recurrent memory its raw memory and segment, plus at most C compressed slots."""
    if lq == 0 or lk == 0:
        return 0
    total = lq * lk
    if opts.window is not None:
        w = opts.window
        left = lk if w.left is None else w.left
        right = lq if w.right is None else w.right
        span = min(lk, (left + right) * w.dilation + 1)
        total = lq * span + lq * len(opts.global_tokens or ()) + len(opts.global_tokens or ()) * lk
    causal = opts.causal_mode
    if causal is not None:
        off = 0 if causal == "top_left" else lk - lq
        # sum over rows i of clamp(i + off + 1, 0, lk)
        lo, hi = max(0, -off), min(lq, lk - off)  # rows whose count i + off + 1 is in (0, lk]
        partial = (hi - lo) * (lo + hi + 1 + 2 * off) // 2 if hi > lo else 0
        full = max(0, lq - max(hi, lo)) * lk
        total = min(total, partial + full)
    cq = opts.cu_seqlens if opts.cu_seqlens is not None else opts.cu_seqlens_q
    ck = opts.cu_seqlens if opts.cu_seqlens is not None else opts.cu_seqlens_k
    if cq is not None and ck is not None and len(cq) == len(ck):  # documents apart
        pairs = zip(cq, cq[1:], ck, ck[1:], strict=False)  # (checked later: clamp what's odd)
        total = min(total, sum(max(q1 - q0, 0) * max(k1 - k0, 0) for q0, q1, k0, k1 in pairs))
    total = min(total, lq * lk)
    memory = getattr(opts, "memory", None)  # AttentionOptions only
    if memory is not None:  # its raw memory and segment, then at most C slots past the keys
        total = min(total, lq * (memory.length + memory.segment)) + lq * memory.compressed
    return total


def _exact(q: Shape, k: Shape, v: Shape, opts: MaskingOptions, *, weights: bool) -> tuple[int, int]:
    """(flops, bytes) of the exact kernel call (service.core.exact.run) on float32 copies."""
    b, hq, lq, d = _as4(q)
    _, hkv, lk, dv = _as4(k)[:3] + _as4(v)[3:]
    flops = 2 * b * hq * visible_keys(lq, lk, opts) * (d + dv)
    out = _n(b, hq, lq, dv)
    asked = getattr(opts, "weights_rows", None)  # AttentionOptions and MultiheadMasking have it
    rows = lq if asked is None else len(asked)
    memory = F32 * (out + _n(b, hq, lq) + (_n(b, hq, rows, lk) if weights else 0))
    # v scaled for range (the rare case counted anyway) and the output scaled back
    memory += F32 * (_n(b, hkv, lk, dv) + out)
    recurrent = getattr(opts, "memory", None)
    if recurrent is not None and recurrent.compressed:  # K and V copied with their slots after
        slots = -(-lk // recurrent.slot_rate)
        memory += F32 * _n(b, hkv, lk + slots, d + dv) + F32 * _n(b, hq, rows, slots) * weights
    if opts.mask is not None and opts.mask.dtype.kind == "f":
        memory += F32 * opts.mask.size  # a float mask converted to float32
    return flops, memory


def _inputs(q: Shape, k: Shape, v: Shape) -> int:
    """The float32 copies of q, k, v (inputs arrive as float64 from JSON)."""
    return F32 * (_n(*q) + _n(*k) + _n(*v))


def attention_cost(
    q: Shape,
    k: Shape,
    v: Shape,
    opts: AttentionOptions,
    *,
    weights: bool = False,
    maps: tuple[int, int, int] | None = None,
    threads: int = 1,
) -> Cost:
    """The cost of `attention(q, k, v, opts)` for arrays of these shapes: with `weights` (the
    probabilities returned), or with `maps` = (Pq, Pk, top_k) the exact maps of
    service.core.maps instead (pooled heatmaps, stats) on `threads` native threads."""
    base = _inputs(q, k, v)
    if opts.method != "exact":
        return _approximation(q, k, v, opts, base)
    flops, memory = _exact(q, k, v, opts, weights=weights)
    if maps is not None:
        b, hq, lq, d = _as4(q)
        _, hkv, lk, dv = _as4(k)[:3] + _as4(v)[3:]
        pq, pk, top_k = maps
        flops += 2 * b * hq * visible_keys(lq, lk, opts) * (d + ELEMENTWISE)  # the second pass
        kk = min(top_k, lk)
        tiles = -(-lk // 96) * 96
        # pooled map and column sums in float64, then float32; entropy, top-k weights, indices
        memory += (F64 + F32) * (_n(b, hq, pq, pk) + _n(b, hq, lk))
        memory += F32 * (_n(b, hq, lq) + _n(b, hq, lq, kk)) + F64 * _n(b, hq, lq, kk)
        memory += F32 * _n(b, hkv, tiles, d)  # K transposed tile by tile
        memory += F64 * _n(b, hq, lk) * max(threads, 1)  # per-thread column sums
    return Cost(flops, base + memory, 0, ("q",), "exact attention")


def _features(b: int, hq: int, hkv: int, lq: int, lk: int, dv: int, f: int) -> tuple[int, int]:
    """(flops, bytes) of feature attention (service.core.approx.products) with F features,
    non-causal or causal, and of _finish: num and den (B, Hq, Lq, Dv + 1), v with a column of
    ones, the division and its copies."""
    flops = 2 * b * hkv * lk * f * (dv + 1) + 2 * b * hq * lq * f * (dv + 1)
    flops += 2 * b * hq * lq * min(CHUNK, lk) * (f + dv + 1)  # causal: the diagonal chunks
    flops += 3 * _n(b, hq, lq, dv) * ELEMENTWISE
    memory = F32 * (_n(b, hkv, lk, dv + 2) + _n(b, hq, lq, dv + 1) + 3 * _n(b, hq, lq, dv))
    memory += F32 * _n(b, hq, min(lq, CHUNK), max(f, dv + 1)) * 2  # a chunk's products
    memory += F32 * 2 * _n(b, hkv, f, dv + 1)  # the running state
    return flops, memory


def _implied(
    b: int, hq: int, hkv: int, lq: int, lk: int, f: int, pq: int, pk: int, causal: bool
) -> tuple[int, int]:
    """(flops, bytes) of an implied map pooled to (pq, pk) bins (service.core.approx.pooling):
    the map twice (the sums and the means), a block of about ROW_BLOCK query rows against
    every key bin, the key bins' feature sums and, causal, float64 running sums of phi(K)."""
    rows = min(lq, max(1, ROW_BLOCK * pq // max(lq, 1)) * -(-lq // max(pq, 1)))
    flops = 2 * b * hq * lq * pk * f + b * hq * lq * pk * ELEMENTWISE
    memory = F32 * (2 * _n(b, hq, pq, pk) + 2 * _n(b, hq, rows, pk) + _n(b, hkv, pk, f))
    memory += (F64 + F32) * pq * pk  # the bins' cell counts
    if causal and lk > pk:
        memory += (3 * F64 + F32) * _n(b, hkv, lk, f)
    return flops, memory


def _approximation(q: Shape, k: Shape, v: Shape, opts: AttentionOptions, base: int) -> Cost:
    b, hq, lq, d = _as4(q)
    _, hkv, lk, dv = _as4(k)[:3] + _as4(v)[3:]
    pool = (min(lq, MAP_SIDE), min(lk, MAP_SIDE)) if opts.compare else None
    causal = opts.causal_mode is not None
    out = _n(b, hq, lq, dv)
    step = 0
    # v scaled for range (counted whatever the values) and the output scaled back
    memory = F32 * (_n(b, hkv, lk, dv) + out)
    if opts.method == "linformer":
        kk = opts.linformer_k or min(lk, DEFAULT_LINFORMER_K)
        proj = 2 * kk * lk  # E and F: random bits, unpacked, as float32
        flops = proj * ELEMENTWISE + 2 * b * hkv * kk * lk * (d + dv)
        flops += b * hq * lq * kk * (2 * (d + dv) + 3 * ELEMENTWISE) + 3 * out * ELEMENTWISE
        memory += proj // 8 + proj + F32 * proj
        if opts.key_lengths is not None:  # k and v with their padding zeroed
            memory += F32 * (_n(b, hkv, lk, d) + _n(b, hkv, lk, dv))
        memory += F32 * (_n(b, hq, lq, kk) + 5 * out + _n(b, hq, lq))
        block = min(lq, max(1, STEP // max(b * hq * kk * (d + dv + ELEMENTWISE), 1)))
        memory += F32 * _n(b, hq, block, kk + dv)  # a block of rows' weights and outputs
        if pool is not None:
            pq, pk = pool
            flops += 2 * b * hq * lq * kk * pk
            memory += F32 * (_n(b, kk, lk) + _n(b, kk, pk) + _n(b, hq, lq, pk) + _n(b, hq, pq, pk))
        loc: tuple[str | int, ...] = ("linformer_k",)
    else:
        m = d if opts.method == "linear" else (opts.num_features or default_num_features(d))
        rows_q, rows_k = _n(b, hq, lq), _n(b, hkv, lk)
        flops, memory_f = _features(b, hq, hkv, lq, lk, dv, m)
        memory += memory_f
        if opts.method == "linear":  # elu(x) + 1: three passes, a temporary each
            flops += 3 * (rows_q + rows_k) * d * ELEMENTWISE
            memory += F32 * 2 * (rows_q + rows_k) * d
            loc = ("q",)
        else:
            blocks = -(-m // d)
            qr = QR_WEIGHT * 4 * d**3 // 3
            step = qr
            flops += blocks * qr + m * d * (2 + ELEMENTWISE)  # set-up: QRs, row norms
            flops += 2 * (rows_q + rows_k) * d * m + (rows_q + rows_k) * m * 2 * ELEMENTWISE
            setup = F64 * (m * d + 4 * d * d)  # W, and a block's Gaussian, Q, R and norms
            features = F32 * ((rows_q + rows_k) * (m + d + 3) + m * d)  # phi, q and k scaled
            memory += max(setup, F64 * m * d + features)
            loc = ("num_features",)
        if opts.return_weights:
            fl, mem = _implied(b, hq, hkv, lq, lk, m, lq, lk, causal)
            flops += fl
            memory += mem + F32 * 2 * _n(b, hq, lq)
        if pool is not None:
            fl, mem = _implied(b, hq, hkv, lq, lk, m, *pool, causal)
            flops += fl
            memory += mem
    if pool is not None:  # the exact reference, its dense map when small, the errors
        cells = _n(b, hq, lq, lk)
        reference = opts.model_copy(update={"method": "exact", "compare": False})
        fl, mem = _exact(q, k, v, reference, weights=cells <= EXACT_MAP_MAX_CELLS)
        flops += fl + 8 * out * ELEMENTWISE
        memory += mem + F64 * 5 * out
        if cells <= EXACT_MAP_MAX_CELLS:
            memory += F32 * (_n(b, hq, lq, pool[1]) + _n(b, hq, *pool))
    return Cost(flops, base + memory, step, loc, f"method {opts.method!r}")


def multihead_cost(
    query: Shape,
    key: Shape,
    value: Shape,
    opts: MultiheadOptions,
    *,
    kv_dim: int,
    weights: bool,
    weight_elements: int,
) -> Cost:
    """The cost of multihead_attention: the four projections and attention per head (one
    native call), the float32 copies and the projections' buffers, the weights drawn or given
    (weight_elements) and the outputs (weights when asked, per head)."""
    b, lq, e = (1,) * (3 - len(query)) + tuple(query)
    lk, kdim, vdim = key[-2], key[-1], value[-1]
    h = opts.num_heads
    head = e // max(h, 1)
    masking = MaskingOptions.model_validate(
        {f: getattr(opts, f) for f in MaskingOptions.model_fields}
    )
    flops = 4 * b * lq * e * e + 2 * b * lk * kv_dim * (kdim + vdim)
    flops += 2 * b * h * visible_keys(lq, lk, masking) * 2 * head
    memory = _inputs(query, key, value) + F32 * weight_elements
    memory += F32 * (2 * b * lq * e + 2 * b * lk * kv_dim + b * lq * e + b * h * lq)
    if weights:
        rows = lq if opts.weights_rows is None else len(opts.weights_rows)
        memory += F32 * 2 * b * h * rows * lk  # per head, and their mean
    return Cost(flops, memory, 0, ("query",), "multi-head attention")
