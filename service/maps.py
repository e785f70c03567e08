"""Exact attention maps at any length, in O(L) memory: `attention_map`.

Two native passes (native/maps_api.cpp): pass 1 is the attention kernel, which gives each
query row's log-sum-exp; pass 2 recomputes the scores tile by tile with the same masking
semantics and reduces p = exp(s - lse) straight into the results below, so the Lq x Lk matrix
never exists. Inputs and options are normalised exactly as `service.api.attention` does.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import _native
from service.api import (
    ArrayLike,
    _absmax,
    _as_4d,
    _as_float32,
    _call_native,
    _check_magnitude,
    _native_masking,
    _num_threads,
    _parse_options,
    _to_output,
)
from service.errors import InputError
from service.options import MaskingOptions


@dataclass(frozen=True)
class AttentionMaps:
    """Result of `attention_map`; leading dims (B, Hq) follow q's rank as in `attention`.

    output (.., Lq, Dv) and lse (.., Lq): as `attention` gives them.
    pooled (.., Pq, Pk): query rows and keys split into near-equal contiguous bins (edges
    (arange(P+1) * L) // P, sizes differing by at most 1); each bin holds the MEAN probability
    of its cells. So for a query bin of non-empty rows, sum over key bins of
    pooled * key-bin width = 1 (with equal widths w: each pooled row sums to 1/w). Rows with no
    allowed key add 0. Pq, Pk are clamped to Lq, Lk (bins = (Lq, Lk) is the dense matrix).
    entropy (.., Lq): -sum_j p log p in nats of each attention row (0 for a row with no allowed
    key, NaN with empty_rows="nan").
    top_k_indices (.., Lq, K) int64 and top_k_weights (.., Lq, K): the K largest probabilities
    of each row, largest first, ties broken by the smaller key index; past a row's allowed keys
    index -1 and weight 0 (NaN with empty_rows="nan" for an empty row). K = min(top_k, Lk).
    column_sums (.., Lk): total attention each key receives, summed over query rows.
    """

    output: ArrayLike
    lse: ArrayLike
    pooled: ArrayLike
    entropy: ArrayLike
    top_k_indices: ArrayLike
    top_k_weights: ArrayLike
    column_sums: ArrayLike
    bins: tuple[int, int]
    elapsed_ms: float
    flops: int


def _bins(bins: Any) -> tuple[int, int]:
    """(Pq, Pk) from an int (both sides) or a pair of ints >= 1."""
    pair = (bins, bins) if not isinstance(bins, list | tuple) else tuple(bins)
    if len(pair) != 2:
        raise InputError("bins", f"expected an int or (query bins, key bins), got {bins!r}")
    out = []
    for i, n in enumerate(pair):
        try:
            value = operator.index(n)
        except TypeError:
            raise InputError(("bins", i), f"must be an integer, got {n!r}") from None
        if isinstance(n, bool) or value < 1:
            raise InputError(("bins", i), f"must be >= 1, got {n!r}")
        out.append(value)
    return out[0], out[1]


def _top_k(top_k: Any) -> int:
    try:
        value = operator.index(top_k)
    except TypeError:
        raise InputError("top_k", f"must be an integer, got {top_k!r}") from None
    if isinstance(top_k, bool) or value < 0:
        raise InputError("top_k", f"must be >= 0, got {top_k!r}")
    return value


def attention_map(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    options: MaskingOptions | None = None,
    *,
    bins: int | tuple[int, int] = 256,
    top_k: int = 8,
    num_threads: int | None = None,
    **option_kwargs: Any,
) -> AttentionMaps:
    """Exact attention summarised without the L x L matrix (see `AttentionMaps`).

    q, k, v and the masking options exactly as for `service.api.attention` (options given as
    an AttentionOptions keep only their masking fields). bins: Pq = Pk, or (Pq, Pk).
    """
    opts = _parse_options(MaskingOptions, options, option_kwargs)
    pq, pk = _bins(bins)
    kk = _top_k(top_k)
    threads = _num_threads(num_threads)
    arrays = [_as_float32(name, x) for name, x in (("q", q), ("k", k), ("v", v))]
    rank = arrays[0].ndim
    q4, k4, v4 = _as_4d(*arrays)
    b, hq, lq, d = q4.shape
    lk, dv = k4.shape[2], v4.shape[3]
    kw = _native_masking(opts, (b, hq, lq, lk))
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
    _check_magnitude("q", abs(scale) * d * _absmax(q4) * _absmax(k4), "scale * q.k")
    (out, lse, pooled, entropy, idx, weights, colsum), elapsed = _call_native(
        _native.attention_maps,
        q4,
        k4,
        v4,
        scale=float(scale),
        bins_q=pq,
        bins_k=pk,
        top_k=kk,
        num_threads=threads,
        **kw,
    )
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse)
        out[empty] = np.nan
        entropy[empty] = np.nan
        weights[empty] = np.nan
    lead = (b, hq)[4 - rank :]

    def shaped(a: np.ndarray, dtype: type = np.float32) -> ArrayLike:
        return _to_output(a.astype(dtype, copy=False).reshape(lead + a.shape[2:]), q)

    return AttentionMaps(
        output=shaped(out),
        lse=shaped(lse),
        pooled=shaped(pooled),
        entropy=shaped(entropy),
        top_k_indices=shaped(idx, np.int64),
        top_k_weights=shaped(weights),
        column_sums=shaped(colsum),
        bins=(pooled.shape[2], pooled.shape[3]),
        elapsed_ms=elapsed,
        flops=2 * b * hq * lq * lk * (2 * d + dv),
    )
