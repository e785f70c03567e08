"""The approximate methods end to end: `run` checks, sizes, computes and (with compare) measures.

BLAS runs on one thread here (see `_serial`), so `num_threads` of the API does not apply.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from service.core.approx.compare import compare
from service.core.approx.features import (
    default_num_features,
    features,
    key_valid,
    linformer_projections,
)
from service.core.approx.pooling import bin_edges, feature_map, pool_rows
from service.core.approx.products import feature_attention, row_counts
from service.core.approx.supported import check_options
from service.core.cancel import ELEMENTWISE, blocks
from service.core.errors import InputError
from service.core.inputs import Peaks
from service.core.magnitudes import check_scores, scale_values, sum_growth
from service.core.options import AttentionOptions

CHUNK = 64  # keys per causal chunk: small masked products, few Python iterations
DEFAULT_LINFORMER_K = 256
MAP_SIDE = 256  # implied maps are pooled to at most MAP_SIDE x MAP_SIDE bins
_BLAS = ThreadpoolController()  # inspects the loaded BLAS once, at import


def _serial() -> Any:
    """One BLAS thread for the whole computation.

    The products here are either small (the causal chunks) or long in their inner dimension
    ((F, Lk) @ (Lk, Dv)), where OpenBLAS synchronises its threads once per block of Lk: on a
    busy machine every barrier waits for a time slice. Measured under load on 2 cores: 1.1-4x
    faster with one thread (e.g. linear causal at L = 64k: 0.54 s instead of 1.14 s); on an
    idle machine two threads would win at most 2x on the products alone.
    """
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class ApproxResult:
    """4-D results of `run`: output (B, Hq, Lq, Dv); weights (B, Hq, Lq, Lk) and lse (B, Hq, Lq)
    when return_weights; comparison as described in `compare`."""

    output: np.ndarray
    weights: np.ndarray | None
    lse: np.ndarray | None
    elapsed_ms: float
    flops: int
    comparison: dict[str, Any] | None


def _finish(
    num: np.ndarray, den: np.ndarray, counts: np.ndarray, opts: AttentionOptions
) -> np.ndarray:
    """num / den, with rows without allowed keys set to 0 or NaN (counts (B, Lq)).

    A row with allowed keys whose features all underflowed (den = 0: elu(x) + 1 = e^x below
    x = -87 for linear; exp of far-apart scores for performer) has no answer in float32: the
    input is refused, naming q, rather than answered with a 0 the method does not give.
    """
    empty = (counts <= 0)[:, None, None, :]  # (B, 1, 1, Lq)
    if not (empty | (den > 0)).all():
        raise InputError(
            "q",
            f"values out of range for method {opts.method!r}: the feature products of some "
            "query with every allowed key underflow to 0 in float32 (the scores are too far "
            "apart); scale q and k down, or use method 'exact'",
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den[..., None]
    nan = np.nan if opts.empty_rows == "nan" else 0.0
    return np.where(empty[..., None], nan, out).astype(num.dtype)


def _linformer(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    pool: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Output (B, Hkv, G, Lq, Dv), the pooled implied map if `pool`, and the flops."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    kk = opts.linformer_k or min(lk, DEFAULT_LINFORMER_K)
    e, f = (p.astype(q.dtype, copy=False) for p in linformer_projections(lk, kk, opts.seed or 0))
    valid = key_valid(b, lk, opts)
    if valid is not None:  # padded keys and values projected as zeros
        k = k * valid[..., None]
        v = v * valid[..., None]
    # E K and F V (B, Hkv, 1, kk, .), summed over blocks of keys
    kp = np.zeros((b, hkv, 1, kk, d), q.dtype)
    vp = np.zeros((b, hkv, 1, kk, dv), q.dtype)
    for rows in blocks(lk, b * hkv * kk * (d + dv)):
        kp[:, :, 0] += e[:, rows] @ k[..., rows, :]
        vp[:, :, 0] += f[:, rows] @ v[..., rows, :]
    scale = q.dtype.type(opts.scale if opts.scale is not None else 1.0 / math.sqrt(d))
    qg = q.reshape(b, hkv, hq // hkv, lq, d)
    s = np.empty((*qg.shape[:-1], kk), q.dtype)  # the softmax weights over projected rows
    out = np.empty((*qg.shape[:-1], dv), q.dtype)
    for rows in blocks(lq, b * hq * kk * (d + dv + ELEMENTWISE)):
        w = qg[..., rows, :] @ kp.swapaxes(-1, -2)
        w *= scale
        w -= w.max(axis=-1, keepdims=True)
        np.exp(w, out=w)
        w /= w.sum(axis=-1, keepdims=True)
        s[..., rows, :] = w
        out[..., rows, :] = w @ vp
    flops = 2 * b * hkv * kk * lk * (d + dv) + 2 * b * hq * lq * kk * (d + dv)
    pooled = None
    if pool is not None:
        pq, pk = pool
        qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
        fb = np.broadcast_to(f, (b, 1, kk, lk)) if valid is None else f * valid[:, :, None, :]
        fbin = np.add.reduceat(fb, ke[:-1], axis=-1)[:, :, None]  # (B, 1, 1, kk, pk)
        sums = pool_rows(s @ fbin, qe, 0)
        pooled = sums / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(sums.dtype)
    return out, pooled, flops


def compute(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    pool: tuple[int, int] | None,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, int]:
    """(output, weights, lse, pooled implied map, flops), all 4-D with Hq heads."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if 0 in q.shape[:3] or lk == 0:  # nothing to attend to (or nobody asking): no O(L) work
        fill = np.nan if opts.empty_rows == "nan" and lk == 0 else 0.0
        out = np.full((b, hq, lq, dv), fill, dtype=q.dtype)
        weights = np.zeros((b, hq, lq, lk), q.dtype) if opts.return_weights else None
        lse = np.full((b, hq, lq), -np.inf, q.dtype) if opts.return_weights else None
        pooled = np.zeros((b, hq, *pool), q.dtype) if pool is not None else None
        return out, weights, lse, pooled, 0
    counts = row_counts(b, lq, lk, opts)
    if opts.method == "linformer":
        num, pooled, flops = _linformer(q, k, v, opts, pool)
        out = _finish(num, np.ones(num.shape[:-1], num.dtype), counts, opts)
        grouped: tuple[np.ndarray | None, ...] = (out, None, None, pooled)
    else:
        f, flops = features(q, k, opts)
        num, den = feature_attention(f.phiq, f.phik, v, f.last, chunk)
        nf = f.phik.shape[-1]
        flops += 2 * b * hkv * lk * nf * (dv + 1) + 2 * b * hq * lq * nf * (dv + 1)
        if f.last is not None:
            flops += 2 * b * hq * lq * min(chunk, lk) * (nf + dv + 1)
        out = _finish(num, den, counts, opts)
        weights = lse = None
        if opts.return_weights:
            weights = feature_map(f, den, lq, lk)
            with np.errstate(divide="ignore"):
                lse = np.log(den) + f.log_shift
            empty = (counts <= 0)[:, None, None, :]
            lse = np.where(empty, -np.inf, lse).astype(q.dtype)
            if opts.empty_rows == "nan":
                weights[np.broadcast_to(empty, weights.shape[:-1])] = np.nan
        pooled = feature_map(f, den, *pool) if pool is not None else None
        grouped = (out, weights, lse, pooled)
    out, weights, lse, pooled = (  # type: ignore[assignment]  # out is never None
        None if a is None else a.reshape(b, hq, *a.shape[3:]) for a in grouped
    )
    return out, weights, lse, pooled, flops


def run(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    *,
    peaks: Peaks | None = None,
    chunk: int = CHUNK,
) -> ApproxResult:
    """Approximate attention of 4-D float32 arrays q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) (already checked by the API: shapes, finiteness, key_lengths); `peaks`
    their max|x| as the API's checks found them (measured here when not given)."""
    check_options(opts)
    if opts.method == "exact":
        raise InputError("method", "run() computes the approximate methods only")
    peaks = peaks or Peaks.of(q, k, v)
    check_scores(opts, q, k, peaks)  # the magnitude rules exact attention applies, per method
    m = opts.num_features or default_num_features(q.shape[3])
    values, scaling = scale_values(v, sum_growth(opts, q, k, peaks, m), peaks.v)
    lq, lk = q.shape[2], k.shape[2]
    pool = (min(lq, MAP_SIDE), min(lk, MAP_SIDE)) if opts.compare else None
    start = time.perf_counter()
    with _serial(), np.errstate(over="ignore", under="ignore"):
        out, weights, lse, implied, flops = compute(q, k, values, opts, pool, chunk)
    if scaling is not None:
        out = scaling.restore(out)
    elapsed = (time.perf_counter() - start) * 1e3
    comparison = None
    if opts.compare:
        assert implied is not None
        comparison = compare(q, k, v, peaks, opts, out, implied, elapsed)
    return ApproxResult(out, weights, lse, elapsed, flops, comparison)
