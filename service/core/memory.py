"""Recurrent memory over one sequence, the `memory` option: Transformer-XL's segments with their
raw memory (Dai et al. 2019, §3.2) and the Compressive Transformer's pooled slots (Rae et al.
2019, §3), in one exact kernel call.

The pattern is a producer of the native mask plan (native/masking.cpp): every segment is a
document whose keys start at its raw memory, so the call costs O(L (S + M)) and no L x L mask
exists. Compressed slots are pooled here, once per call (`pool_slots`), and appended after the
L raw keys; the plan gives each segment its window of slots as extra keys, seen whole. The
weights come back split: over the raw keys (B, H, L, L) and over the slots (B, H, L, ceil(L/c)).
Sessions (service.core.sessions) stream the same semantics segment by segment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.errors import InputError
from service.core.options import AttentionOptions, Memory, MemorySpec

# Options the memory pattern cannot be combined with, and why (the README lists them).
_REFUSED: dict[str, str] = {
    "mask": "the memory pattern decides which keys each query sees, and an (Lq, Lk) mask has "
    "no place for the compressed slots",
    "window": "the raw memory already is a window: its length plus the segment",
    "global_tokens": "the memory pattern decides which keys each query sees",
    "alibi_slopes": "a compressed slot has no position to measure a distance from",
    "block_mask": "the memory pattern decides which blocks each query visits",
    "cu_seqlens": "memory runs over one sequence; run each document as a call of its own",
    "cu_seqlens_q": "memory runs over one sequence; run each document as a call of its own",
    "cu_seqlens_k": "memory runs over one sequence; run each document as a call of its own",
}


def check_options(opts: AttentionOptions, lq: int, lk: int) -> None:
    """InputError naming the option when it cannot go with `memory`, or the lengths differ."""
    mem = opts.memory
    if mem is None:
        return
    for name, loc in opts.active_options().items():
        if name in _REFUSED:
            raise InputError(loc, f"cannot be combined with memory ({_REFUSED[name]})")
    if mem.compressed > 0 and opts.key_lengths is not None:
        raise InputError(
            "key_lengths", "cannot be combined with compressed memory (a slot would pool padding)"
        )
    if lq != lk:
        raise InputError(
            "k",
            f"memory is self-attention over one sequence: k has {lk} positions and q {lq}",
        )


def slot_count(length: int, spec: MemorySpec) -> int:
    """Slots of a sequence of `length` positions: ceil(length / c), 0 without compression."""
    return -(-length // spec.slot_rate) if spec.compressed > 0 else 0


def pool_slots(x4: np.ndarray, rate: int, pool: str) -> np.ndarray:
    """(B, H, L, D) -> (B, H, ceil(L / rate), D): slot t pools positions [t c, (t + 1) c) (the
    last one fewer when c does not divide L), elementwise mean (in float64) or max, float32."""
    b, h, n, d = x4.shape
    full = n // rate
    parts = []
    for block, count in ((x4[:, :, : full * rate], full), (x4[:, :, full * rate :], 1)):
        if block.shape[2] == 0:
            continue
        grouped = block.reshape(b, h, count, -1, d)
        if pool == "max":
            parts.append(grouped.max(axis=3))
        else:
            parts.append(grouped.mean(axis=3, dtype=np.float64).astype(np.float32))
    if not parts:
        return np.empty((b, h, 0, d), dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def native_memory(mem: Memory) -> dict[str, Any]:
    """The kernel's keyword arguments for `mem` (service/_native.pyi)."""
    return {
        "memory_segment": mem.segment,
        "memory_length": mem.length,
        "memory_compressed": mem.compressed,
        "memory_rate": mem.slot_rate,
    }


def with_slots(
    k4: np.ndarray, v4: np.ndarray, mem: Memory, masking: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """k and v with the slots after the raw positions (as they are without compression), and
    the masking arguments with the memory's. max|x| of k and v stays what it was (the checks'
    Peaks still hold): a slot is a max of raw values, or their mean, which in float64 and
    rounded to float32 cannot pass the float32 max|x| of the values it pools."""
    kw = {**masking, **native_memory(mem)}
    if mem.compressed == 0:
        return k4, v4, kw
    c = mem.slot_rate
    k_ext = np.concatenate([k4, pool_slots(k4, c, mem.pool)], axis=2)
    v_ext = np.concatenate([v4, pool_slots(v4, c, mem.pool)], axis=2)
    return k_ext, v_ext, kw


def split_weights(weights: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights over [raw keys | slots] as (weights (.., L), slot_weights (.., slots))."""
    return (
        np.ascontiguousarray(weights[..., :length]),
        np.ascontiguousarray(weights[..., length:]),
    )
