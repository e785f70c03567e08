"""Feature attention as chains of dense (BLAS) products; causal masking by key chunks."""

from __future__ import annotations

import numpy as np

from service.core.approx.features import last_keys
from service.core.options import AttentionOptions


def feature_attention(
    phiq: np.ndarray, phik: np.ndarray, v: np.ndarray, last: np.ndarray | None, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Numerator (B, Hkv, G, Lq, Dv) and denominator (B, Hkv, G, Lq) of feature attention.

    phiq (B, Hkv, G, Lq, F); phik (B, Hkv, Lk, F) with padded keys zeroed; v (B, Hkv, Lk, Dv).
    v gets a column of ones, so every product yields the denominator as its last column.
    """
    ones = np.ones((*v.shape[:-1], 1), dtype=v.dtype)
    v1 = np.concatenate([v, ones], axis=-1)[:, :, None]  # (B, Hkv, 1, Lk, Dv + 1)
    phik = phik[:, :, None]  # (B, Hkv, 1, Lk, F)
    if last is None:
        nd = phiq @ (phik.swapaxes(-1, -2) @ v1)
        return nd[..., :-1], nd[..., -1]
    nd = np.zeros((*phiq.shape[:-1], v1.shape[-1]), dtype=phiq.dtype)
    state = np.zeros((*phik.shape[:3], phik.shape[-1], v1.shape[-1]), dtype=phiq.dtype)
    _chunk_loop(phiq, phik, v1, last, chunk, nd, state)
    return nd[..., :-1], nd[..., -1]


def _chunk_loop(
    phiq: np.ndarray,
    phik: np.ndarray,
    v1: np.ndarray,
    last: np.ndarray,
    chunk: int,
    nd: np.ndarray,
    state: np.ndarray,
) -> None:
    """The causal scan of `feature_attention`, filling nd in place."""
    lk = v1.shape[-2]
    # `last` is non-decreasing, so the queries whose last key lies in chunk c are contiguous.
    owner = np.where(last >= 0, last // chunk, -1)
    folded = 0  # keys [0, folded) are summed into state
    for c in range(-(-lk // chunk)):
        i0, i1 = np.searchsorted(owner, [c, c + 1])
        if i0 == i1:
            continue
        s, e = c * chunk, min((c + 1) * chunk, lk)
        if s > folded:
            state += phik[..., folded:s, :].swapaxes(-1, -2) @ v1[..., folded:s, :]
            folded = s
        pq = phiq[..., i0:i1, :]
        a = pq @ phik[..., s:e, :].swapaxes(-1, -2)  # (B, Hkv, G, n, e - s)
        a *= np.arange(s, e) <= last[i0:i1, None]
        nd[..., i0:i1, :] = pq @ state + a @ v1[..., s:e, :]


def row_counts(b: int, lq: int, lk: int, opts: AttentionOptions) -> np.ndarray:
    """Allowed keys per (batch, query): (B, Lq)."""
    lengths = np.asarray(opts.key_lengths if opts.key_lengths is not None else [lk] * b)
    last = last_keys(lq, lk, opts.causal_mode)
    per_query = np.full(lq, lk) if last is None else last + 1
    return np.minimum(per_query[None, :], lengths[:, None])
