"""The reference for recurrent memory (the `memory` option and sessions): float64 torch, the
visible set listed densely for each query straight from the definition in the README (and
issue 15), independent of the kernel, of its mask plan and of service.core.memory's pooling.

For a query at position p of segment s = p // S: the raw keys max(0, sS - M) <= j < sS, the
keys of its own segment (j <= p when causal), and, with C > 0, the slots t (slot t pools
positions [t c, (t + 1) c) elementwise by mean or max, keys and values apart) with
(t + 1) c <= sS - M, the C most recent of them. One softmax over the visible keys and slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tests.support.reference import f64


@dataclass
class MemoryReference:
    output: np.ndarray  # (B, Hq, L, Dv)
    lse: np.ndarray  # (B, Hq, L), -inf for a row with nothing visible
    weights: np.ndarray  # (B, Hq, L, L) over the raw keys
    slot_weights: np.ndarray  # (B, Hq, L, ceil(L / c)) over the slots (0 columns without)


def pooled(x: torch.Tensor, rate: int, pool: str) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / rate), D), slot by slot."""
    slots = []
    for t in range(-(-x.shape[2] // rate)):
        part = x[:, :, t * rate : (t + 1) * rate]
        slots.append(part.mean(dim=2) if pool == "mean" else part.amax(dim=2))
    if not slots:
        return x[:, :, :0]
    return torch.stack(slots, dim=2)


def visible(
    length: int, segment: int, memory: int, compressed: int, rate: int, causal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(raw (L, L), slots (L, ceil(L / rate))) bool: what each query sees, query by query."""
    slots = -(-length // rate) if compressed else 0
    raw = np.zeros((length, length), dtype=bool)
    seen = np.zeros((length, slots), dtype=bool)
    for p in range(length):
        start = (p // segment) * segment
        end = min(length, start + segment)
        for j in range(max(0, start - memory), start):
            raw[p, j] = True
        for j in range(start, p + 1 if causal else end):
            raw[p, j] = True
        candidates = [t for t in range(slots) if (t + 1) * rate <= start - memory]
        for t in candidates[max(0, len(candidates) - compressed) :] if compressed else []:
            seen[p, t] = True
    return raw, seen


def memory_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    segment: int,
    length: int,
    compressed: int = 0,
    rate: int = 1,
    pool: str = "mean",
    causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    key_lengths: list[int] | None = None,
) -> MemoryReference:
    """q (B, Hq, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), Hq a multiple of Hkv."""
    tq, tk, tv = f64(q), f64(k), f64(v)
    b, hq, n, d = tq.shape
    group = hq // tk.shape[1]
    tk, tv = tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1)
    raw, seen = visible(n, segment, length, compressed, rate, causal)
    keys, values = tk, tv
    if compressed:
        keys = torch.cat([tk, pooled(tk, rate, pool)], dim=2)
        values = torch.cat([tv, pooled(tv, rate, pool)], dim=2)
    allowed = torch.from_numpy(np.concatenate([raw, seen], axis=1))[None, None].repeat(b, hq, 1, 1)
    if key_lengths is not None:
        for i, kl in enumerate(key_lengths):
            allowed[i, :, :, kl:n] = False
    s = (d**-0.5 if scale is None else scale) * tq @ keys.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, -torch.inf)
    lse = torch.logsumexp(s, dim=-1)
    w = torch.where(allowed, torch.exp(s - lse[..., None].clamp(min=-1e300)), 0.0)
    w = torch.nan_to_num(w)  # rows with nothing visible: 0
    out = w @ values
    return MemoryReference(
        output=out.numpy(),
        lse=lse.numpy(),
        weights=w[..., :n].numpy(),
        slot_weights=w[..., n:].numpy(),
    )
