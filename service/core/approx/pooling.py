"""Implied attention maps pooled into bins of cell means, without forming Lq x Lk."""

from __future__ import annotations

import numpy as np

from service.core.approx.features import Features

_ROW_BLOCK = 4096  # query rows per block when pooling implied maps


def bin_edges(n: int, bins: int) -> np.ndarray:
    """bins + 1 edges splitting range(n) into near-equal bins (sizes differ by at most 1)."""
    return (np.arange(bins + 1) * n) // bins


def pool_rows(rows: np.ndarray, edges: np.ndarray, first: int) -> np.ndarray:
    """Sum consecutive rows (axis -2) into bins; `edges` are absolute, `first` is rows[0]'s."""
    return np.add.reduceat(rows, edges[:-1] - first, axis=-2)


def feature_map(f: Features, den: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """Implied map of a feature method pooled to (pq, pk) bins of cell means: (B, Hkv, G, pq, pk).

    Never forms Lq x Lk: per key bin, sum phi(k) over the bin; a query's mass in a bin is then
    phi(q) . (bin sum). Causal rows see only part of the bin holding their last key; that part
    comes from a within-bin cumulative sum.
    """
    lq, lk = f.phiq.shape[-2], f.phik.shape[-2]
    qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
    kbin = np.add.reduceat(f.phik, ke[:-1], axis=-2)[:, :, None]  # (B, Hkv, 1, pk, F)
    partial_sums = None
    if f.last is not None and lk > pk:
        # cumulative sums restarted at each bin, in float64 to avoid cancellation
        cum = np.cumsum(f.phik, axis=-2, dtype=np.float64)
        before = np.concatenate([np.zeros_like(cum[..., :1, :]), cum[..., ke[1:-1] - 1, :]], -2)
        starts = np.repeat(np.arange(pk), np.diff(ke))
        partial_sums = (cum - before[..., starts, :]).astype(f.phik.dtype)[:, :, None]
    inv = np.where(den > 0, 1 / np.where(den > 0, den, 1), 0).astype(f.phiq.dtype)
    out = np.zeros((*f.phiq.shape[:3], pq, pk), dtype=f.phiq.dtype)
    # blocks of whole query bins, about _ROW_BLOCK rows each
    per_block = max(1, _ROW_BLOCK * pq // max(lq, 1))
    for b0 in range(0, pq, per_block):
        b1 = min(pq, b0 + per_block)
        r0, r1 = qe[b0], qe[b1]
        mass = f.phiq[..., r0:r1, :] @ kbin.swapaxes(-1, -2)  # (B, Hkv, G, n, pk)
        if f.last is not None:
            last = f.last[r0:r1]
            mass *= ke[1:] - 1 <= last[:, None]  # whole bins at or before the last key
            bin_of_last = np.searchsorted(ke, last, side="right") - 1
            partial = (last >= 0) & (ke[bin_of_last + 1] - 1 > last)
            if partial_sums is not None and partial.any():
                rows = np.nonzero(partial)[0]
                ps = partial_sums[..., last[rows], :]  # (B, Hkv, 1, n', F)
                extra = np.einsum("...nf,...nf->...n", f.phiq[..., r0 + rows, :], ps)
                mass[..., rows, bin_of_last[rows]] += extra
        mass *= inv[..., r0:r1, None]
        out[..., b0:b1, :] = pool_rows(mass, qe[b0 : b1 + 1], r0)
    return out / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(out.dtype)


def pool_dense(w: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """(.., Lq, Lk) -> (.., pq, pk) bin means."""
    lq, lk = w.shape[-2:]
    if 0 in w.shape:
        return np.zeros((*w.shape[:-2], pq, pk), w.dtype)
    qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
    sums = np.add.reduceat(np.add.reduceat(w, ke[:-1], axis=-1), qe[:-1], axis=-2)
    return sums / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(sums.dtype)
