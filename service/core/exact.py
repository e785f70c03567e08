"""Exact attention on checked 4-D float32 arrays: the kernel call behind `attention` and the
reference that the approximations are compared with."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service import _native
from service.core.inputs import absmax, check_magnitude
from service.core.native_call import call_native
from service.core.options import MaskingOptions


def checked_scale(opts: MaskingOptions, q4: np.ndarray, k4: np.ndarray) -> float:
    """The score scale (default 1/sqrt(D)), refused when scale * q.k could overflow float32."""
    d = q4.shape[3]
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
    check_magnitude("q", abs(scale) * d * absmax(q4) * absmax(k4), "scale * q.k")
    return float(scale)


def run(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    opts: MaskingOptions,
    masking: dict[str, Any],
    *,
    return_weights: bool,
    threads: int,
    weights_rows: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """(output, lse, weights or None, elapsed ms), 4-D; `masking` from masking.native_masking.
    With weights_rows, the weights are those rows' only (B, Hq, len(rows), Lk); lse stays whole.
    """
    scale = checked_scale(opts, q4, k4)
    rows = None if weights_rows is None else np.asarray(weights_rows, dtype=np.int64)
    (out, lse, weights), elapsed = call_native(
        _native.attention,
        q4,
        k4,
        v4,
        scale=scale,
        return_weights=return_weights,
        weights_rows=rows,
        num_threads=threads,
        **masking,
    )
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
