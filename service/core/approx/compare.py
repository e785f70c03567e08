"""An approximation measured against exact attention on the same input ("compare")."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core import exact
from service.core.approx.pooling import pool_dense
from service.core.inputs import Peaks
from service.core.masking import native_masking
from service.core.options import AttentionOptions

EXACT_MAP_MAX_CELLS = 1 << 24  # the exact map is pooled from dense weights up to this


def _errors(approx: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(relative Frobenius error, max absolute error); rows NaN on both sides count as equal."""
    diff = approx.astype(np.float64) - reference.astype(np.float64)
    diff[np.isnan(approx) & np.isnan(reference)] = 0.0
    ref = np.nan_to_num(reference.astype(np.float64))
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(diff))
    return (err / norm if norm > 0 else err), float(np.abs(diff).max(initial=0.0))


def compare(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    peaks: Peaks,
    opts: AttentionOptions,
    output: np.ndarray,
    implied: np.ndarray,
    elapsed_ms: float,
) -> dict[str, Any]:
    """Run exact attention on the same input (the checked 4-D float32 arrays the approximation
    ran on, with their max|x| `peaks`) and measure the approximation against it.

    Returns {"method", "rel_error" (Frobenius, over all batches and heads), "max_abs_error",
    "rel_error_per_head" (B, Hq), "implied_map" (B, Hq, Pq, Pk) bin means of the implied
    matrix, "exact_map" (same bins; None when B*Hq*Lq*Lk > EXACT_MAP_MAX_CELLS, since it comes
    from the dense exact weights), "pooled" (bins larger than one cell), "map_kind",
    "exact_elapsed_ms", "approx_elapsed_ms"}.
    """
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    pq, pk = implied.shape[-2:]
    want_map = b * hq * lq * lk <= EXACT_MAP_MAX_CELLS
    reference = AttentionOptions(
        scale=opts.scale,
        causal=opts.causal,
        key_lengths=opts.key_lengths,
        empty_rows=opts.empty_rows,
        return_weights=want_map,
    )
    masking = native_masking(reference, (b, hq, lq, lk))
    out, _, weights, elapsed = exact.run(q, k, v, reference, masking, peaks=peaks, threads=0)
    rel, max_abs = _errors(output, out)
    diff = np.nan_to_num(output.astype(np.float64) - out)
    ref = np.linalg.norm(np.nan_to_num(out.astype(np.float64)), axis=(-2, -1))
    per_head = np.linalg.norm(diff, axis=(-2, -1)) / np.where(ref > 0, ref, 1)
    return {
        "method": opts.method,
        "rel_error": rel,
        "max_abs_error": max_abs,
        "rel_error_per_head": per_head,
        "implied_map": implied,
        "exact_map": pool_dense(weights, pq, pk) if weights is not None else None,
        "pooled": (pq, pk) != (lq, lk),
        "map_kind": "signed operator M with output = M V (rows need not sum to 1)"
        if opts.method == "linformer"
        else "attention probabilities (rows sum to 1)",
        "exact_elapsed_ms": elapsed,
        "approx_elapsed_ms": elapsed_ms,
    }
