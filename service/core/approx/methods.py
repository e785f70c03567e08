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
from service.core.errors import InputError, LimitError
from service.core.options import AttentionOptions

CHUNK = 64  # keys per causal chunk: small masked products, few Python iterations
DEFAULT_LINFORMER_K = 256
MAP_SIDE = 256  # implied maps are pooled to at most MAP_SIDE x MAP_SIDE bins
MAX_FEATURE_ELEMENTS = 1 << 28  # feature matrices held at once (1 GiB in float32)
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


def check_memory(q: np.ndarray, k: np.ndarray, opts: AttentionOptions) -> None:
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1:3]
    if opts.method == "linformer":
        kk = opts.linformer_k or min(lk, DEFAULT_LINFORMER_K)
        n, field = (2 * kk * lk + b * hq * lq * kk), "linformer_k"
    else:
        m = d if opts.method == "linear" else (opts.num_features or default_num_features(d))
        n, field = b * (hq * lq + hkv * lk) * m, "num_features"
    if n > MAX_FEATURE_ELEMENTS:
        raise LimitError(
            field,
            f"method {opts.method!r} would hold {n} feature elements at once for these shapes "
            f"(limit {MAX_FEATURE_ELEMENTS}); use fewer features or shorter sequences",
        )


def _finish(num: np.ndarray, den: np.ndarray, counts: np.ndarray, empty_rows: str) -> np.ndarray:
    """num / den, with rows without allowed keys set to 0 or NaN (counts (B, Lq))."""
    empty = (counts <= 0)[:, None, None, :]  # (B, 1, 1, Lq)
    tiny = np.finfo(den.dtype).tiny  # features underflowed to 0 in a non-empty row: output 0
    out = num / np.maximum(den, tiny)[..., None]
    return np.where(empty[..., None], np.nan if empty_rows == "nan" else 0.0, out).astype(num.dtype)


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
    e, f = (p.astype(q.dtype) for p in linformer_projections(lk, kk, opts.seed or 0))
    valid = key_valid(b, lk, opts)
    if valid is not None:  # padded keys and values projected as zeros
        k = k * valid[..., None]
        v = v * valid[..., None]
    kp, vp = (e @ k)[:, :, None], (f @ v)[:, :, None]  # (B, Hkv, 1, kk, .)
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
    s = (q.reshape(b, hkv, hq // hkv, lq, d) @ kp.swapaxes(-1, -2)) * q.dtype.type(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out = s @ vp
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
    counts = row_counts(b, lq, lk, opts)
    if 0 in q.shape[:3] or lk == 0:  # nothing to attend to (or nobody asking)
        fill = np.nan if opts.empty_rows == "nan" and lk == 0 else 0.0
        out = np.full((b, hq, lq, dv), fill, dtype=q.dtype)
        weights = np.zeros((b, hq, lq, lk), q.dtype) if opts.return_weights else None
        lse = np.full((b, hq, lq), -np.inf, q.dtype) if opts.return_weights else None
        pooled = np.zeros((b, hq, *pool), q.dtype) if pool is not None else None
        return out, weights, lse, pooled, 0
    if opts.method == "linformer":
        num, pooled, flops = _linformer(q, k, v, opts, pool)
        out = _finish(num, np.ones(num.shape[:-1], num.dtype), counts, opts.empty_rows)
        grouped: tuple[np.ndarray | None, ...] = (out, None, None, pooled)
    else:
        f, flops = features(q, k, opts)
        num, den = feature_attention(f.phiq, f.phik, v, f.last, chunk)
        nf = f.phik.shape[-1]
        flops += 2 * b * hkv * lk * nf * (dv + 1) + 2 * b * hq * lq * nf * (dv + 1)
        if f.last is not None:
            flops += 2 * b * hq * lq * min(chunk, lk) * (nf + dv + 1)
        out = _finish(num, den, counts, opts.empty_rows)
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
    chunk: int = CHUNK,
) -> ApproxResult:
    """Approximate attention of 4-D float arrays q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) (already checked by the API: shapes, finiteness, key_lengths)."""
    check_options(opts)
    if opts.method == "exact":
        raise InputError("method", "run() computes the approximate methods only")
    check_memory(q, k, opts)
    lq, lk = q.shape[2], k.shape[2]
    pool = (min(lq, MAP_SIDE), min(lk, MAP_SIDE)) if opts.compare else None
    start = time.perf_counter()
    with _serial(), np.errstate(over="ignore", under="ignore"):
        out, weights, lse, implied, flops = compute(q, k, v, opts, pool, chunk)
    elapsed = (time.perf_counter() - start) * 1e3
    comparison = None
    if opts.compare:
        assert implied is not None
        comparison = compare(q, k, v, opts, out, implied, elapsed)
    return ApproxResult(out, weights, lse, elapsed, flops, comparison)
