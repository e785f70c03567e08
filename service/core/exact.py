"""Exact attention on checked 4-D arrays (float32, float16 or bfloat16): the kernel call behind
`attention` and the reference that the approximations are compared with."""

from __future__ import annotations

from typing import Any

import numpy as np

from service import _native
from service.core.frameworks import bfloat16_from_bits
from service.core.inputs import Peaks
from service.core.magnitudes import check_scores, scale_values, sum_growth
from service.core.native_call import call_native
from service.core.options import AttentionOptions


def run(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    opts: AttentionOptions,
    masking: dict[str, Any],
    *,
    peaks: Peaks,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """(output, lse, weights or None, elapsed ms), 4-D; `masking` from masking.native_masking,
    what to return and how to compute it from opts (return_weights, weights_rows, out_dtype,
    precision). out_dtype "input" answers in q's dtype (bfloat16 as ml_dtypes.bfloat16). With
    weights_rows, the weights are those rows' only (B, Hq, len(rows), Lk); lse stays whole.
    `peaks`: max|x| of q4, k4, v4 as the input checks found them (qkv_4d), for the magnitude
    rules.
    """
    scale = check_scores(opts, q4, k4, peaks)
    values, scaling = scale_values(v4, sum_growth(opts, q4, k4, peaks), peaks.v)
    rows = None if opts.weights_rows is None else np.asarray(opts.weights_rows, dtype=np.int64)
    (out, lse, weights), elapsed = call_native(
        _native.attention,
        q4,
        k4,
        values,
        scale=scale,
        return_weights=opts.return_weights,
        weights_rows=rows,
        num_threads=threads,
        out_dtype=opts.out_dtype,
        precision=opts.precision,
        **masking,
    )
    if out.dtype == np.uint16:  # the kernel hands bfloat16 back as its bits
        out = bfloat16_from_bits(out)
    if scaling is not None:
        out = scaling.restore(out)
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse)
        nan_where_empty(lse, out)
        if weights is not None:  # the weights hold the rows `rows` (all when None)
            weights[empty if rows is None else empty[:, :, rows]] = np.nan
    return out, lse, weights, elapsed


def nan_where_empty(lse: np.ndarray, *arrays: np.ndarray | None) -> None:
    """empty_rows="nan": NaN in every row (B, H, Lq, ...) whose lse is -inf (no allowed key)."""
    empty = np.isneginf(lse)
    for a in arrays:
        if a is not None:
            a[empty] = np.nan


def dense_flops(q4: np.ndarray, k4: np.ndarray, v4: np.ndarray) -> int:
    """2*B*Hq*Lq*Lk*(D + Dv): the two matrix products, masked-out tiles included."""
    b, hq, lq, d = q4.shape
    return 2 * b * hq * lq * k4.shape[2] * (d + v4.shape[3])
