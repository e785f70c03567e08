"""Exact attention maps at any length, in O(L) memory: `attention_map`.

Two native passes (native/maps_api.cpp): pass 1 is the attention kernel, which gives each
query row's log-sum-exp; pass 2 recomputes the scores tile by tile with the same masking
semantics and reduces p = exp(s - lse) straight into the results below, so the Lq x Lk matrix
never exists. Inputs and options are normalised exactly as `service.attention` does.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from service import _native
from service.core.errors import InputError
from service.core.exact import nan_where_empty
from service.core.inputs import ArrayLike, caller_rank, parse_options, thread_count, to_output
from service.core.magnitudes import check_scores, scale_values, sum_growth
from service.core.masking import prepare
from service.core.native_call import call_native
from service.core.options import MaskingOptions
from service.core.results import AttentionMaps


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

    q, k, v and the masking options exactly as for `service.attention` (options given as
    an AttentionOptions keep only their masking fields). bins: Pq = Pk, or (Pq, Pk).
    """
    opts = parse_options(MaskingOptions, options, option_kwargs)
    pq, pk = _bins(bins)
    kk = _top_k(top_k)
    threads = thread_count(num_threads)
    q4, k4, v4, rank, kw, peaks = prepare(q, k, v, opts)
    b, hq, lq, d = q4.shape
    lk, dv = k4.shape[2], v4.shape[3]
    scale = check_scores(opts, q4, k4, peaks)
    values, scaling = scale_values(v4, sum_growth(opts, q4, k4, peaks), peaks.v)
    (out, lse, pooled, entropy, idx, weights, colsum), elapsed = call_native(
        _native.attention_maps,
        q4,
        k4,
        values,
        scale=scale,
        bins_q=pq,
        bins_k=pk,
        top_k=kk,
        num_threads=threads,
        **kw,
    )
    if scaling is not None:
        out = scaling.restore(out)
    if opts.empty_rows == "nan":
        nan_where_empty(lse, out, entropy, weights)

    def shaped(a: np.ndarray, dtype: type = np.float32) -> ArrayLike:
        return to_output(caller_rank(a.astype(dtype, copy=False), rank), q)

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
